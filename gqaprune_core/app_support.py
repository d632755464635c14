"""Pure helpers behind the Streamlit app: model facts, tables, GQA teaching, pruning runs.

Nothing here imports streamlit (nor plotly: the figures live in ``pages/_charts.py``), so the
app's logic is testable without a UI and importing ``gqaprune_core`` never pulls in the UI.
The rate preview of Rate tuning lives in :mod:`gqaprune_core.app_rates`, the layer-wise prune job
in :mod:`gqaprune_core.app_layerwise`, the Export actions (save, GGUF) in
:mod:`gqaprune_core.app_export`.
Notation: L layers, H query heads, G KV heads (groups), D head_dim, I MLP width.

The model a page works on is shared by every user of the app (``st.cache_resource``), so:

- nothing here cuts or edits it; a pruning job deep-copies it first;
- work that registers hooks on it or flips ``requires_grad`` (layer importance, Taylor scores)
  or copies it holds :data:`SHARED_MODEL_LOCK`, so that one user's hooks never fire during, or
  get copied into, another user's job.
"""

from __future__ import annotations

import copy
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from gqaprune_core.app_rates import BudgetSplit, plan_split
from gqaprune_core.config import PruneConfig
from gqaprune_core.export.shards import format_size as human_bytes  # noqa: F401 (pages)
from gqaprune_core.geometry import kv_head_of
from gqaprune_core.layer_importance import LayerImportance
from gqaprune_core.models import count_parameters, layout
from gqaprune_core.schedule import unit_costs

SHARED_MODEL_LOCK = threading.RLock()
# The preset a new session starts from: gqaprune's recommended settings (config.DEFAULT);
# "original" (the original project's algorithm) stays one click away on Rate tuning.
START_PRESET = "default"


def default_source() -> str:
    """The model source the app starts with: ``$GQAPRUNE_APP_MODEL`` or the demo model."""
    return os.environ.get("GQAPRUNE_APP_MODEL", "demo").strip() or "demo"


# ---- the model --------------------------------------------------------------------------------

def memory_bytes(model: nn.Module) -> int:
    """Bytes held by the model's distinct parameters and buffers."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def model_summary(model: nn.Module) -> dict[str, Any]:
    """Headline facts for the Model page; per-layer values shown as ``min–max`` when they vary."""
    shapes = layout(model)

    def span(values: list[int]) -> str:
        low, high = min(values), max(values)
        return f"{low}" if low == high else f"{low}–{high}"

    first = next(model.parameters())
    return {"layers": len(shapes), "query heads": span([s.q_heads for s in shapes]),
            "KV heads": span([s.kv_heads for s in shapes]),
            "q_per_kv": span([s.q_per_kv for s in shapes]),
            "head_dim": span([s.head_dim for s in shapes]),
            "MLP width": span([s.mlp_width for s in shapes]),
            "parameters": count_parameters(model), "memory_bytes": memory_bytes(model),
            "dtype": str(first.dtype).removeprefix("torch."), "device": str(first.device)}


def architecture_table(model: nn.Module) -> pd.DataFrame:
    """One row per layer: H, G, q_per_kv, D, I and the parameters of attention and MLP."""
    rows = [{"layer": s.layer, "query heads": s.q_heads, "KV heads": s.kv_heads,
             "q_per_kv": s.q_per_kv, "head_dim": s.head_dim, "MLP width": s.mlp_width,
             "attention params": c.attention, "MLP params": c.mlp,
             "params per GQA group": c.group, "params per MLP channel": c.channel}
            for s, c in zip(layout(model), unit_costs(model))]
    return pd.DataFrame(rows)


def component_table(model: nn.Module) -> pd.DataFrame:
    """Parameters and memory by component (embeddings, attention, MLP, norms, ...)."""
    from gqaprune_core.analyze import component_parameters

    counts = component_parameters(model)
    bytes_per = next(model.parameters()).element_size()
    total = counts["total"]
    rows = [{"component": name, "parameters": n, "share %": round(100 * n / total, 2),
             "memory MiB": round(n * bytes_per / 2**20, 2)}
            for name, n in counts.items() if name != "total" and n]
    rows.append({"component": "total", "parameters": total, "share %": 100.0,
                 "memory MiB": round(total * bytes_per / 2**20, 2)})
    return pd.DataFrame(rows)


def human_count(count: int) -> str:
    """``134.5 M``, ``45.2 k``, ``812``."""
    for scale, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(count) >= scale:
            return f"{count / scale:.1f} {unit}"
    return str(count)


def greedy_generate(model: nn.Module, tokenizer, prompt: str, max_new_tokens: int = 24) -> str:
    """The greedy continuation of ``prompt`` (new text only; empty for no prompt or tokens)."""
    if not prompt or max_new_tokens <= 0:
        return ""
    device = next(model.parameters()).device
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"].to(device)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


# ---- GQA teaching -----------------------------------------------------------------------------

def head_mapping(q_heads: int, kv_heads: int, kept_q: Sequence[int], kept_kv: Sequence[int]
                 ) -> pd.DataFrame:
    """Which KV head each remaining query head reads after a cut.

    The attention module pairs query head at *position* ``i`` with KV head at position
    ``i // (len(kept_q) / len(kept_kv))``, whatever it was trained with. A row is ``intact`` when
    that KV head is the one the query head was trained with.
    """
    if not kept_kv or len(kept_q) % len(kept_kv):
        raise ValueError(f"{len(kept_q)} query heads cannot share {len(kept_kv)} KV heads evenly")
    q_per_kv, new_q_per_kv = q_heads // kv_heads, len(kept_q) // len(kept_kv)
    rows = []
    for position, head in enumerate(kept_q):
        trained = kv_head_of(head, q_per_kv)
        reads = kept_kv[kv_head_of(position, new_q_per_kv)]
        rows.append({"position": position, "query head": head, "trained with KV head": trained,
                     "reads KV head": reads, "intact": trained == reads})
    return pd.DataFrame(rows)


def group_cut(q_heads: int, kv_heads: int, removed_groups: Sequence[int]
              ) -> tuple[list[int], list[int]]:
    """(kept query heads, kept KV heads) when whole groups are removed."""
    q_per_kv = q_heads // kv_heads
    kept_kv = [g for g in range(kv_heads) if g not in set(removed_groups)]
    return [h for h in range(q_heads) if kv_head_of(h, q_per_kv) in kept_kv], kept_kv


def example_naive_heads(q_heads: int, kv_heads: int) -> list[int]:
    """q_per_kv query heads spread over the groups: what scoring heads one by one may pick."""
    q_per_kv = q_heads // kv_heads
    picked: list[int] = []
    for i in range(q_heads * 2):
        head = (i * (q_per_kv + 1)) % q_heads
        if head not in picked:
            picked.append(head)
        if len(picked) == q_per_kv:
            break
    return sorted(picked)


@dataclass(frozen=True)
class HeadScores:
    """Taylor scores per layer: per GQA group (G,), per query head (H,), per KV head (G,)."""

    groups: list[list[float]]
    query_heads: list[list[float]]
    kv_heads: list[list[float]]
    samples: int
    seq_len: int

    def table(self) -> pd.DataFrame:
        rows = []
        for layer, scores in enumerate(self.groups):
            total = sum(scores) or 1.0
            rows += [{"layer": layer, "group": g, "score": s, "share %": 100 * s / total}
                     for g, s in enumerate(scores)]
        return pd.DataFrame(rows)


def taylor_head_scores(model: nn.Module, tokenizer, corpus: str = "demo", samples: int = 8,
                       seq_len: int = 64, seed: int = 0,
                       progress: Callable[[int, int], None] | None = None) -> HeadScores:
    """First-order Taylor scores of every group, query head and KV head (holds the model lock)."""
    from gqaprune_core.data import calibration_batch
    from gqaprune_core.unit_importance import (group_scores, kv_head_scores, layer_saliency,
                                               query_head_scores)

    batches = calibration_batch(tokenizer, corpus, samples, seq_len, seed)
    with SHARED_MODEL_LOCK:
        saliency = layer_saliency(model, "taylor", batches, chunk_size=4, progress=progress)
    shapes = layout(model)
    groups, queries, kvs = [], [], []
    for s in shapes:
        sal = saliency[s.layer]
        groups.append(group_scores(sal, s.q_per_kv, s.head_dim).tolist())
        queries.append(query_head_scores(sal, s.head_dim).tolist())
        kvs.append(kv_head_scores(sal, s.head_dim).tolist())
    return HeadScores(groups, queries, kvs, samples, seq_len)


# ---- pruning runs -----------------------------------------------------------------------------

@dataclass
class PruneRun:
    """A finished pruning run as the app keeps it (``model`` may be dropped to free memory)."""

    config: PruneConfig
    report: dict
    plan: Any
    model: nn.Module | None
    tokenizer: Any
    prompt: str
    text_before: str
    text_after: str
    seconds: float
    number: int = 0
    split: BudgetSplit | None = None  # the removed parameters by part (see plan_split)
    # a layer-wise run's checkpoint on disk (its ``model`` is then None: never in memory); its
    # run folder stays locked against clean-up while this object lives (app_layerwise)
    checkpoint: Path | None = None

    @property
    def label(self) -> str:
        c = self.config
        parts = "attn+MLP" if c.prune_attention and c.prune_mlp else (
            "attn" if c.prune_attention else "MLP")
        recovery = "" if c.recovery == "none" else f" + {c.recovery} recovery"
        return (f"run {self.number}: {c.pruning_ratio:.0%} {c.pruning_strategy} α={c.alpha:g} "
                f"{parts} {c.unit_importance}{recovery}")


def prune_job(config: PruneConfig, model: nn.Module, tokenizer, importance: LayerImportance | None,
              prompt: str, max_new_tokens: int, progress: Callable[[str, int, int], None],
              profile=None) -> PruneRun:
    """Copy the shared model, prune and evaluate the copy, and generate before and after; or,
    when a copy would not fit (:func:`~gqaprune_core.app_layerwise.prune_layerwise_instead`),
    prune layer-wise from disk.
    With a sensitivity ``profile`` the report also holds the predicted perplexity."""
    from gqaprune_core.app_layerwise import layerwise_job, prune_layerwise_instead
    from gqaprune_core.pipeline import run_pipeline

    if prune_layerwise_instead(config, model):
        return layerwise_job(config, model, tokenizer, importance, prompt, max_new_tokens,
                              progress)
    start = time.perf_counter()
    progress("copy model", 0, 1)
    with SHARED_MODEL_LOCK:  # never copy while another job's hooks sit on the shared model
        working = copy.deepcopy(model)
    costs = unit_costs(working)  # before the cut
    tokenizer = copy.deepcopy(tokenizer)  # a private one: fast tokenizers dislike sharing
    progress("generate before", 0, 1)
    text_before = greedy_generate(working, tokenizer, prompt, max_new_tokens)
    # Missing layer scores are computed on the copy: same weights, so the same disk cache entry.
    result = run_pipeline(config, working, tokenizer, importance=importance, copy_model=False,
                          progress=progress, profile=profile)
    progress("generate after", 0, 1)
    text_after = greedy_generate(result.model, tokenizer, prompt, max_new_tokens)
    return PruneRun(config, result.report, result.plan, result.model, tokenizer, prompt,
                    text_before, text_after, time.perf_counter() - start,
                    split=plan_split(result.plan, costs))


def layer_counts_table(report: dict) -> pd.DataFrame:
    rows = [{"layer": r["layer"], "rate %": round(100 * r["rate"], 1),
             "Q heads before": r["q_heads_before"], "Q heads after": r["q_heads"],
             "KV heads before": r["kv_heads_before"], "KV heads after": r["kv_heads"],
             "MLP before": r["mlp_before"], "MLP after": r["mlp"]} for r in report["layers"]]
    return pd.DataFrame(rows)


def perplexity_table(report: dict) -> pd.DataFrame:
    rows = []
    for corpus, before in report.get("ppl_before", {}).items():
        after = report.get("ppl_after", {}).get(corpus)
        if after is None:
            continue
        rows.append({"corpus": corpus, "perplexity before": before["value"],
                     "perplexity after": after["value"],
                     "delta": after["value"] - before["value"],
                     "delta %": 100 * (after["value"] / before["value"] - 1),
                     "windows × tokens": f"{after['windows']} × {after['seq_len']}"})
    return pd.DataFrame(rows)


RECOVERY_NAMES = {"lora": "LoRA", "full": "full fine-tuning"}


def recovery_table(report: dict) -> pd.DataFrame:
    """Per corpus: perplexity before pruning, after pruning, after recovery, and the share of
    the pruning's perplexity increase that recovery won back. Empty without recovery."""
    recovery = report.get("recovery")
    if not recovery:
        return pd.DataFrame()
    rows = []
    for corpus, pruned in recovery["ppl_after_pruning"].items():
        recovered = recovery["ppl_after_recovery"].get(corpus)
        dense = report.get("ppl_before", {}).get(corpus, {}).get("value")
        if recovered is None or dense is None:
            continue
        lost = pruned - dense
        rows.append({"corpus": corpus, "before pruning": dense, "after pruning": pruned,
                     "after recovery": recovered,
                     "won back %": 100 * (pruned - recovered) / lost if lost > 0 else None})
    return pd.DataFrame(rows)


def recovery_cost(report: dict) -> str:
    """One line on what recovery did and cost ("" without recovery)."""
    r = report.get("recovery")
    if not r:
        return ""
    losses = ("" if r["loss_first"] is None else
              f", distillation loss {r['loss_first']:.4f} → {r['loss_last']:.4f}")
    why = "all steps ran" if r["stopped_by"] == "steps" else "stopped by the time budget"
    return (f"{RECOVERY_NAMES.get(r['method'], r['method'])}: {r['steps_done']} of "
            f"{r['steps_requested']} steps in {r['seconds']:.1f} s ({why}), "
            f"{r['tokens_seen']:,} tokens, {human_count(r['trainable_params'])} trainable "
            f"parameters, lr {r['lr']:g}{losses}")


def runs_table(runs: Sequence[PruneRun]) -> pd.DataFrame:
    """One row per run: settings, parameters and perplexity per corpus, side by side."""
    rows = []
    for run in runs:
        c, r = run.config, run.report
        row = {"run": run.number, "target %": 100 * c.pruning_ratio, "of": c.ratio_of,
               "strategy": c.pruning_strategy, "alpha": c.alpha,
               "parts": "+".join(p for p, on in (("attn", c.prune_attention), ("MLP", c.prune_mlp))
                                 if on),
               "units": c.unit_importance, "mode": c.mode, "recovery": c.recovery,
               "quality gate": f"ppl ≤ x{r['gate']['limit']:.3g}" if r.get("gate") else "",
               "params after": r["params_after"],
               "removed % of all": round(100 * r["ratio_achieved_total"], 2)}
        if run.split is not None:
            row["attn share of removed %"] = round(100 * run.split.attention_share, 1)
            row["MLP share of removed %"] = round(100 * run.split.mlp_share, 1)
        for corpus, after in r.get("ppl_after", {}).items():
            before = r["ppl_before"].get(corpus, {}).get("value")
            row[f"ppl {corpus}"] = round(after["value"], 2)
            if before:
                row[f"Δ% {corpus}"] = round(100 * (after["value"] / before - 1), 1)
        row["seconds"] = round(run.seconds, 1)
        rows.append(row)
    return pd.DataFrame(rows)
