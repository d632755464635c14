"""How much each decoder layer matters, measured on calibration text, cached on disk.

Notation: L layers, N calibration windows of T tokens, B windows per batch, E hidden size.
Every method returns L scores, higher = more important:

- ``removal`` (default): perplexity with the layer bypassed (its input passed on unchanged)
  minus the base perplexity. The hidden state entering layer i does not depend on later
  layers, so one forward pass records the input of every layer, and bypassing layer i restarts
  from the input of layer i through layers i+1..L-1, the final norm and the LM head: about half
  the layer evaluations of L full passes.
- ``activation``: the mean L2 norm of each layer's output hidden state, per token.
- ``block_influence``: ShortGPT's 1 - cos(layer input, layer output), averaged over tokens.

Layers are re-run with the very arguments the model passed them (captured by a pre-hook:
attention mask, rotary position embeddings, ...; :mod:`gqaprune_core.layer_calls`), so the same
code serves Llama, Mistral and Qwen2 and restarting at layer 0 reproduces
``model(ids).logits`` exactly.

Results are cached as JSON files in the original project's ``layer_importance_config.json``
format, keyed by everything that determines them (see :func:`layer_importance`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torch.nn import functional as F

from gqaprune_core.data import calibration_batch
from gqaprune_core.evaluate import nll_from_hidden
from gqaprune_core.layer_calls import hidden_input, record_calls
from gqaprune_core.models import cache_dir, decoder_layers, layer_output
from gqaprune_core.outputs import write_atomic

Method = Literal["removal", "activation", "block_influence"]
METHODS: tuple[str, ...] = ("removal", "activation", "block_influence")
FORMAT_VERSION = 1
Progress = Callable[[int, int], None]  # (done, total)


@dataclass(frozen=True)
class LayerImportance:
    """L layer scores (higher = more important) and how they were obtained.

    ``inputs``: everything that determined the scores (model id, weights fingerprint, corpus,
    samples, seq_len, seed, calibration token digest, method, format version). ``statistics``:
    mean/std/min/max of the scores, and for ``removal`` the base and per-layer perplexities.
    ``seconds``: compute time of the scores (a cache hit reports the original time).
    """

    method: str
    scores: tuple[float, ...]
    inputs: dict[str, Any] = field(default_factory=dict)
    statistics: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


def _nll_sum(model: nn.Module, hidden: torch.Tensor, ids: torch.Tensor, normalized: bool = False
             ) -> float:
    """Summed next-token NLL of a batch from hidden states (final norm unless ``normalized``,
    then the LM head in chunks; see :func:`gqaprune_core.evaluate.nll_from_hidden`)."""
    return float(nll_from_hidden(model, hidden, ids, normalized=normalized).sum())


def _removal_batch(model: nn.Module, ids: torch.Tensor, tick: Callable[[], None]
                   ) -> tuple[float, list[float]]:
    """Summed NLL of ``ids`` (B, T) with all layers, and with each layer bypassed in turn."""
    layers = decoder_layers(model)
    calls, final = record_calls(model, ids)
    base = _nll_sum(model, final, ids, normalized=True)
    bypassed = []
    for skipped in range(len(layers)):
        hidden = calls[skipped].hidden
        for later in range(skipped + 1, len(layers)):
            hidden = calls[later].run(layers[later], hidden)
        bypassed.append(_nll_sum(model, hidden, ids))
        tick()
    return base, bypassed


def _removal(model: nn.Module, batches: Sequence[torch.Tensor], tick: Callable[[], None]
             ) -> tuple[list[float], dict]:
    count = len(decoder_layers(model))
    base_total, totals = 0.0, [0.0] * count
    for ids in batches:
        base, bypassed = _removal_batch(model, ids, tick)
        base_total += base
        totals = [t + b for t, b in zip(totals, bypassed)]
    tokens = sum(ids.shape[0] * (ids.shape[1] - 1) for ids in batches)
    base_ppl = math.exp(base_total / tokens)
    layer_ppl = [math.exp(t / tokens) for t in totals]
    return [p - base_ppl for p in layer_ppl], {"base_ppl": base_ppl, "layer_ppl": layer_ppl}


def _hooked_means(model: nn.Module, batches: Sequence[torch.Tensor], method: Method,
                  tick: Callable[[], None]) -> list[float]:
    """Per-layer mean over tokens of ``|output|`` (activation) or ``1 - cos(input, output)``
    (block_influence), from forward hooks that are always removed afterwards."""
    layers = decoder_layers(model)
    sums = [0.0] * len(layers)

    def make_hook(index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            out = layer_output(output).float()
            if method == "activation":
                per_token = torch.linalg.vector_norm(out, dim=-1)
            else:
                inp = hidden_input(args, kwargs).float()
                per_token = 1.0 - F.cosine_similarity(inp, out, dim=-1)
            sums[index] += float(per_token.double().sum())
        return hook

    handles = [layer.register_forward_hook(make_hook(i), with_kwargs=True)
               for i, layer in enumerate(layers)]
    try:
        for ids in batches:
            model(ids, use_cache=False)
            tick()
    finally:
        for handle in handles:
            handle.remove()
    tokens = sum(ids.numel() for ids in batches)
    return [s / tokens for s in sums]


@torch.no_grad()
def compute_layer_importance(model: nn.Module, calibration: torch.Tensor,
                             method: Method = "removal", batch_size: int = 8,
                             progress: Progress | None = None) -> tuple[list[float], dict]:
    """L layer scores (higher = more important) of ``model`` on ``calibration`` (N, T) ids.

    Runs in eval mode (the previous mode is restored) and in batches of ``batch_size`` windows,
    so memory is bounded by one batch (``removal`` keeps L hidden states of (B, T, E)). NLL is
    computed in float32 whatever the model's dtype. ``progress(done, total)`` counts bypassed
    layers over all batches (``removal``) or batches (the other methods).

    Returns:
        ``(scores, statistics)``: statistics hold mean/std/min/max of the scores and, for
        ``removal``, ``base_ppl`` and ``layer_ppl`` (L perplexities with each layer bypassed).

    Raises:
        ValueError: an unknown method, ``calibration`` not (N, T) with T >= 2, or batch_size < 1.
    """
    if method not in METHODS:
        raise ValueError(f"unknown layer importance method {method!r}; choose one of {METHODS}")
    if calibration.dim() != 2 or calibration.shape[1] < 2 or calibration.shape[0] < 1:
        raise ValueError(f"calibration must be (N, T) with N >= 1 and T >= 2, got "
                         f"{tuple(calibration.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = next(model.parameters()).device
    batches = [b.to(device) for b in calibration.split(batch_size)]
    steps_per_batch = len(decoder_layers(model)) if method == "removal" else 1
    done, total = [0], len(batches) * steps_per_batch

    def tick() -> None:
        done[0] += 1
        if progress is not None:
            progress(done[0], total)

    was_training = model.training
    model.eval()
    try:
        if method == "removal":
            scores, statistics = _removal(model, batches, tick)
        else:
            scores, statistics = _hooked_means(model, batches, method, tick), {}
    finally:
        model.train(was_training)
    values = torch.tensor(scores, dtype=torch.float64)
    statistics |= {"mean": float(values.mean()), "std": float(values.std(unbiased=False)),
                   "min": float(values.min()), "max": float(values.max())}
    return scores, statistics


# ---------------------------------------------------------------------------------------------
# identity of the inputs, file format, cache


@torch.no_grad()
def weights_fingerprint(model: nn.Module, samples_per_tensor: int = 1024,
                        dtype: torch.dtype | None = None) -> str:
    """A hex digest of the model class and every parameter's name, shape and dtype, the L2 norm
    of each row of every matrix (whole vectors for 1-D parameters) and an evenly strided sample
    of its values.

    Pruning changes the shapes; scaling, zeroing or perturbing weights changes row norms. Edits
    that keep every row norm and miss the sampled entries (a permutation within rows, say) go
    unseen: give such a model another ``model_id``. Reads every weight once (~0.2 s for 135M
    parameters on one CPU thread); per-row reductions do not depend on the thread count.
    ``dtype``: the digest of the model as if loaded in that dtype (floating weights cast one
    tensor at a time), to recognise the same model loaded at another precision.
    """
    digest = hashlib.sha256(type(model).__name__.encode())
    for name, param in model.named_parameters():
        values = param.detach()
        if dtype is not None and values.is_floating_point():
            values = values.to(dtype)
        digest.update(f"|{name}:{tuple(values.shape)}:{values.dtype}|".encode())
        if values.dim() >= 2:
            rows = values.reshape(-1, values.shape[-1])
            summary = torch.linalg.vector_norm(rows, dim=-1, dtype=torch.float32)
        else:
            summary = values.float()
        flat = values.reshape(-1)
        sample = flat[::max(1, flat.numel() // samples_per_tensor)][:samples_per_tensor]
        digest.update(summary.cpu().numpy().tobytes())
        digest.update(sample.float().cpu().numpy().tobytes())
    return digest.hexdigest()


def matches_weights(model: nn.Module, fingerprint: str) -> bool:
    """Whether ``fingerprint`` is :func:`weights_fingerprint` of ``model`` as it is, or of the
    same weights loaded at another common precision (scores computed in bfloat16 on a GPU,
    reused in float32 on a CPU). Extra dtypes are tried only when the first check fails."""
    if weights_fingerprint(model) == fingerprint:
        return True
    own = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    return any(weights_fingerprint(model, dtype=dtype) == fingerprint
               for dtype in (torch.float32, torch.bfloat16, torch.float16) if dtype != own)


def _tokens_digest(ids: torch.Tensor) -> str:
    return hashlib.sha256(ids.to(torch.int64).cpu().numpy().tobytes()).hexdigest()[:16]


def save_importance_config(path: str | os.PathLike, importance: LayerImportance,
                           rates: Sequence[float] | None = None) -> Path:
    """Write ``importance`` (and per-layer ``rates``, if known) as ``layer_importance_config.json``
    atomically (temporary file, then ``os.replace``). Returns the path."""
    path = Path(path)
    if rates is not None and len(rates) != len(importance.scores):
        raise ValueError(f"got {len(rates)} rates for {len(importance.scores)} layers")
    content = {
        "layer_importance": {str(i): s for i, s in enumerate(importance.scores)},
        "layer_pruning_rates": {} if rates is None else {str(i): float(r)
                                                         for i, r in enumerate(rates)},
        "statistics": importance.statistics, "inputs": importance.inputs,
        "method": importance.method, "seconds": importance.seconds,
        "format_version": FORMAT_VERSION,
    }
    return write_atomic(path, lambda staging: staging.write_text(json.dumps(content, indent=1),
                                                                 encoding="utf-8"))


def _layer_dict(content: dict, key: str, path: Path) -> list[float]:
    table = content.get(key)
    if not isinstance(table, dict):
        raise ValueError(f"{path}: {key!r} is missing or not a mapping of layer -> value")
    try:
        entries = {int(k): float(v) for k, v in table.items()}
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: {key!r} holds a non-numeric layer or value ({err})") from err
    if sorted(entries) != list(range(len(entries))):
        raise ValueError(f"{path}: {key!r} layers {sorted(entries)} are not 0..{len(entries) - 1}")
    return [entries[i] for i in range(len(entries))]


def load_importance_config(path: str | os.PathLike, expected_layers: int | None = None
                           ) -> LayerImportance:
    """Read a ``layer_importance_config.json`` (also the original project's files, which lack
    ``inputs``, ``method`` and ``format_version``). Stored rates are not part of the result.

    Raises:
        ValueError: a missing or unreadable file, bad JSON, a newer format version, scores that
            are not finite or not numbered 0..L-1, or L != ``expected_layers``.
    """
    path = Path(path)
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ValueError(f"cannot read layer importance file {path}: {err}") from err
    except UnicodeDecodeError as err:  # before JSONDecodeError: both are ValueErrors
        raise ValueError(f"layer importance file {path} is not a JSON text file (binary data "
                         f"at byte {err.start}); pass the layer_importance_config.json of an "
                         "earlier run") from err
    except json.JSONDecodeError as err:
        raise ValueError(f"layer importance file {path} is not valid JSON: {err}") from err
    if not isinstance(content, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(content).__name__}")
    version = content.get("format_version", FORMAT_VERSION)
    if version != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {version!r} is not supported "
                         f"(this version reads {FORMAT_VERSION})")
    scores = _layer_dict(content, "layer_importance", path)
    if not scores or not all(math.isfinite(s) for s in scores):
        raise ValueError(f"{path}: layer scores must be finite and non-empty, got {scores}")
    if expected_layers is not None and len(scores) != expected_layers:
        raise ValueError(f"{path} scores {len(scores)} layers, the model has {expected_layers}")
    return LayerImportance(str(content.get("method", "unknown")), tuple(scores),
                           dict(content.get("inputs") or {}),
                           dict(content.get("statistics") or {}),
                           float(content.get("seconds", 0.0)))


def cache_path(inputs: dict[str, Any], cache_root: Path | None = None) -> Path:
    """``<cache_root or cache_dir()>/importance/<model>-<method>-<hash of inputs>.json``."""
    key = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:24]
    model = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(inputs.get("model_id") or "model"))[-48:]
    root = cache_dir() if cache_root is None else Path(cache_root)
    return root / "importance" / f"{model}-{inputs['method']}-{key}.json"


def _cached(path: Path, inputs: dict[str, Any], layers: int) -> LayerImportance | None:
    """The cached result at ``path`` if it exists, is readable and was made from ``inputs``."""
    if not path.is_file():
        return None
    try:
        found = load_importance_config(path, expected_layers=layers)
    except ValueError:
        return None  # a damaged entry is recomputed and overwritten
    return found if found.inputs == inputs else None


def layer_importance(model: nn.Module, tokenizer, method: Method = "removal",
                     corpus: str = "demo", samples: int = 50, seq_len: int = 128, seed: int = 0,
                     model_id: str = "", use_cache: bool = True, cache_root: Path | None = None,
                     progress: Progress | None = None, batch_size: int = 8) -> LayerImportance:
    """Layer importance on ``samples`` calibration windows of ``seq_len`` tokens of ``corpus``
    (drawn by :func:`gqaprune_core.data.calibration_batch` with ``seed``), cached on disk.

    The cache key holds ``model_id``, :func:`weights_fingerprint` of the model as it is now,
    corpus, samples, seq_len, seed, a digest of the calibration tokens (so an edited text file
    or another tokenizer misses too), method and format version; a hit must match all of them.
    Files live under ``cache_root/importance`` (default :func:`cache_dir`, which honours
    ``GQAPRUNE_CACHE``) and are written atomically. ``use_cache=False`` neither reads nor writes.
    """
    if method not in METHODS:
        raise ValueError(f"unknown layer importance method {method!r}; choose one of {METHODS}")
    calibration = calibration_batch(tokenizer, corpus, samples, seq_len, seed)
    inputs = {"model_id": model_id, "weights": weights_fingerprint(model), "corpus": corpus,
              "samples": samples, "seq_len": seq_len, "seed": seed,
              "tokens": _tokens_digest(calibration), "method": method,
              "format_version": FORMAT_VERSION}
    layers = len(decoder_layers(model))
    path = cache_path(inputs, cache_root)
    if use_cache and (hit := _cached(path, inputs, layers)) is not None:
        return hit
    start = time.perf_counter()
    scores, statistics = compute_layer_importance(model, calibration, method, batch_size,
                                                  progress)
    result = LayerImportance(method, tuple(scores), inputs, statistics,
                             time.perf_counter() - start)
    if use_cache:
        save_importance_config(path, result)
    return result
