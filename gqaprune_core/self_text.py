"""Calibration windows the dense model writes itself, beside the real ones.

Whatever calibration text is chosen, the pruned model keeps that kind of text best and loses
most on kinds it never saw (held out, 30 % removed: news left out of the calibration mix
reads 3.18x dense, news in it 1.93x; BENCHMARKS.md, "Eighth round"). Text sampled from the
model itself is drawn from everything it learned, so a share of it makes the cuts and the
re-fit answer to text in general, not only to the calibration corpus.

Each written window starts at a document break (:data:`DOCUMENT_BREAK`, the blank line the
corpora join their documents with: :func:`prompts_for`), so the model alone chooses what to
write, and is sampled at :data:`TEMPERATURE` (1) from the nucleus :data:`TOP_P` (the whole
distribution by default) with end-of-text tokens suppressed, so every window has the real
ones' length. Sampling uses its own seeded generator: the same model, prompts and seed give
the same windows on every run. The windows are cached on disk (``cache_dir()/self_text``),
keyed by the weights' fingerprint, the prompts and the settings; they do not depend on the
calibration text, so the quality gate's prunes, the app's reruns, other calibration mixes and
a repeated command write them once per model and window count.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import DynamicCache

from gqaprune_core.layer_importance import weights_fingerprint
from gqaprune_core.models import cache_dir
from gqaprune_core.outputs import write_atomic

# 0: every window starts at a document break (DOCUMENT_BREAK), so what it writes depends on the
# model alone; N > 0: on the first N tokens of a real window. Each kind of text left out of the
# calibration in turn, 30 % removed, the unseen sets' geometric mean: 4 tokens 2.80, 1 token
# 2.65, 0 2.67 (a tie within 1 %; 0 writes one set of windows per model whatever the
# calibration text; BENCHMARKS.md, "Ninth round")
PROMPT_TOKENS = 0
DOCUMENT_BREAK = "\n\n"  # how the corpora join their documents (data.calibration_batch)
# the nucleus the written tokens are sampled from; 1: the model's whole distribution. The same
# protocol: top-p 0.95 2.67, 1 2.61; with every kind fitted at 20 % a tie on the mean, the
# unseen licenses 2 % worse (BENCHMARKS.md, "Tenth round")
TOP_P = 1.0
# the logits are divided by it before sampling; 1: the model's own distribution. 1.2 writes
# mostly word salad and loses 7 % on the unseen sets of two folds of the same protocol
# (BENCHMARKS.md, "Eleventh round")
TEMPERATURE = 1.0
BATCH_ROWS = 32

Progress = Callable[[int, int], None]


def written_count(share: float, real: int) -> int:
    """How many windows ``share`` (written windows per real one) asks for beside ``real``."""
    return round(share * real)


def prompts_for(real: torch.Tensor, tokenizer) -> torch.Tensor:
    """The written windows' prompts, one per real window: its first :data:`PROMPT_TOKENS` ids,
    or with 0 the ids of :data:`DOCUMENT_BREAK` (the same for every row: where a new document of
    any kind may begin, so the model alone chooses what to write)."""
    if PROMPT_TOKENS > 0:
        return real[:, :PROMPT_TOKENS]
    ids = tokenizer(DOCUMENT_BREAK, add_special_tokens=False)["input_ids"]
    if not ids:  # a tokenizer that drops blank lines: the first token of each real window
        return real[:, :1]
    return torch.tensor(ids, dtype=torch.long).expand(real.shape[0], -1)


def _end_ids(model: nn.Module) -> list[int]:
    ids: set[int] = set()
    for source in (model.config, getattr(model, "generation_config", None)):
        value = getattr(source, "eos_token_id", None)
        ids.update([value] if isinstance(value, int) else (value or []))
    return sorted(i for i in ids if 0 <= i < model.config.vocab_size)


def _sample(logits: torch.Tensor, top_p: float, generator: torch.Generator,
            temperature: float = 1.0) -> torch.Tensor:
    """One token per row from the smallest set of tokens whose probability (after dividing the
    logits by ``temperature``) reaches ``top_p``."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    probs, order = torch.sort(probs, dim=-1, descending=True)
    outside = probs.cumsum(-1) - probs >= top_p  # the top token always stays
    probs = probs.masked_fill(outside, 0.0)
    picks = torch.multinomial(probs, 1, generator=generator)
    return order.gather(-1, picks)


@torch.no_grad()
def write_windows(model: nn.Module, prompts: torch.Tensor, count: int, seq_len: int,
                  seed: int = 0, top_p: float | None = None, temperature: float | None = None,
                  progress: Progress | None = None) -> torch.Tensor:
    """``(count, seq_len)`` token ids the model writes, each continuing a row of ``prompts``
    (rows cycled; see :func:`prompts_for`), on the CPU; ``top_p`` / ``temperature`` None:
    :data:`TOP_P` / :data:`TEMPERATURE` as they are at the call (the cache key reads them
    there too)."""
    top_p = TOP_P if top_p is None else top_p
    temperature = TEMPERATURE if temperature is None else temperature
    if not temperature > 0:
        raise ValueError(f"the written windows' temperature must be above 0; got {temperature}")
    if prompts.dim() != 2 or prompts.shape[1] < 1 or seq_len <= prompts.shape[1]:
        raise ValueError(f"self-written windows need prompts of at least 1 token and seq_len "
                         f"above the prompt length; got prompts {tuple(prompts.shape)}, "
                         f"seq_len {seq_len}")
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    banned = _end_ids(model)
    starts = prompts[torch.arange(count) % prompts.shape[0]].cpu()
    was_training = model.training
    model.eval()
    rows, steps = [], seq_len - prompts.shape[1]
    try:
        for batch, chunk in enumerate(starts.split(BATCH_ROWS)):
            tokens, step_input, cache = [chunk], chunk.to(device), DynamicCache()
            for step in range(steps):
                logits = model(step_input, past_key_values=cache, use_cache=True).logits[:, -1]
                logits = logits.float().cpu()
                logits[:, banned] = float("-inf")
                token = _sample(logits, top_p, generator, temperature)
                tokens.append(token)
                step_input = token.to(device)
                if progress is not None:
                    progress(batch * steps + step + 1, -(-count // BATCH_ROWS) * steps)
            rows.append(torch.cat(tokens, dim=1))
    finally:
        model.train(was_training)
    return torch.cat(rows) if rows else torch.empty(0, seq_len, dtype=torch.long)


def cache_path(model: nn.Module, prompts: torch.Tensor, count: int, seq_len: int, seed: int,
               model_id: str = "", cache_root: Path | None = None) -> Path:
    """``<cache_root or cache_dir()>/self_text/<hash>.safetensors`` for these inputs."""
    starts = prompts.contiguous().cpu().numpy().tobytes()
    fields = {"model": model_id, "weights": weights_fingerprint(model), "count": count,
              "seq_len": seq_len, "seed": seed, "top_p": TOP_P,
              "prompts": [list(prompts.shape), hashlib.sha256(starts).hexdigest()]}
    if TEMPERATURE != 1.0:  # absent at 1, so the windows written before it existed stay valid
        fields["temperature"] = TEMPERATURE
    key = json.dumps(fields, sort_keys=True)
    root = cache_dir() if cache_root is None else Path(cache_root)
    return root / "self_text" / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.safetensors"


def self_written(model: nn.Module, prompts: torch.Tensor, count: int, seq_len: int,
                 seed: int = 0, model_id: str = "", use_cache: bool = True,
                 progress: Progress | None = None) -> torch.Tensor:
    """:func:`write_windows`, read from the disk cache when these inputs wrote it before (a
    file that cannot be read or has the wrong shape is written again)."""
    if count == 0:
        return torch.empty(0, seq_len, dtype=torch.long)
    path = cache_path(model, prompts, count, seq_len, seed, model_id) if use_cache else None
    if path is not None and path.is_file():
        try:
            ids = load_file(path)["ids"]
            if tuple(ids.shape) == (count, seq_len):
                return ids
        except Exception:  # noqa: BLE001 - a damaged cache file is only rewritten
            pass
    ids = write_windows(model, prompts, count, seq_len, seed, progress=progress)
    if path is not None:
        write_atomic(path, lambda staging: save_file({"ids": ids.contiguous()}, staging))
    return ids
