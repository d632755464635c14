"""Compare an original and a pruned model: parameters by component, per-layer shapes, disk size.

Notation: H query heads, G KV heads (groups), I MLP width.

Library: :func:`component_parameters` and :func:`compare` compute plain dicts; :func:`format_report`
turns one into text. The CLI is a thin shell over them::

    python -m gqaprune_core.analyze --original_model demo --pruned_model prune_log/x/model [--json]

A checkpoint's files are checked against its SHA-256 manifest first (``--no_verify`` skips it).

Both models may be anything :func:`gqaprune_core.models.load_model` accepts ("demo", "tiny", a
Hugging Face directory, a ``.gguf`` file) or a directory written by
:func:`gqaprune_core.checkpoint.save_pruned`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from torch import nn

from gqaprune_core.export.shards import format_size
from gqaprune_core.models import LayerLayout, count_parameters, layout

COMPONENTS = ("embeddings", "attention", "mlp", "norms", "lm_head", "other", "total")


def component_of(name: str) -> str:
    """The component a parameter name belongs to (Llama-family naming)."""
    parts = name.split(".")
    if "embed_tokens" in parts:
        return "embeddings"
    if "self_attn" in parts:
        return "attention"
    if "mlp" in parts:
        return "mlp"
    if parts[0] == "lm_head":
        return "lm_head"
    if any("norm" in part for part in parts):
        return "norms"
    return "other"


def component_parameters(model: nn.Module) -> dict[str, int]:
    """Distinct parameters per component, keyed as :data:`COMPONENTS`.

    A tied ``lm_head`` is the embedding matrix: it is counted once, under ``embeddings``, and
    ``lm_head`` is 0. ``total`` equals :func:`gqaprune_core.models.count_parameters`.
    """
    counts = dict.fromkeys(COMPONENTS, 0)
    for name, param in model.named_parameters():  # remove_duplicate=True: tied tensors once
        counts[component_of(name)] += param.numel()
    counts["total"] = sum(counts[c] for c in COMPONENTS if c != "total")
    assert counts["total"] == count_parameters(model)
    return counts


def _layer_row(before: LayerLayout, after: LayerLayout) -> dict:
    ok = (after.q_per_kv == before.q_per_kv and after.head_dim == before.head_dim
          and after.q_heads == after.kv_heads * before.q_per_kv)
    return {"layer": before.layer,
            "q_heads_before": before.q_heads, "q_heads_after": after.q_heads,
            "kv_heads_before": before.kv_heads, "kv_heads_after": after.kv_heads,
            "q_per_kv_before": before.q_per_kv, "q_per_kv_after": after.q_per_kv,
            "mlp_before": before.mlp_width, "mlp_after": after.mlp_width, "ok": ok}


def compare(original: nn.Module, pruned: nn.Module) -> dict:
    """Parameter counts and per-layer shapes of ``original`` and ``pruned``; pure (no I/O).

    Returns:
        ``{"parameters": {component: {"before", "after", "removed", "reduction_pct"}},
        "layers": [one row per layer: H, G, q_per_kv, I before and after, "ok"], "all_ok"}``.
        A layer is ok when q_per_kv and head_dim are unchanged and H == G * q_per_kv.

    Raises:
        ValueError: the two models have different numbers of layers.
    """
    shapes_before, shapes_after = layout(original), layout(pruned)
    if len(shapes_before) != len(shapes_after):
        raise ValueError(f"original has {len(shapes_before)} layers, pruned has "
                         f"{len(shapes_after)}: not the same model")
    before, after = component_parameters(original), component_parameters(pruned)
    parameters = {}
    for component in COMPONENTS:
        removed = before[component] - after[component]
        share = 100.0 * removed / before[component] if before[component] else 0.0
        parameters[component] = {"before": before[component], "after": after[component],
                                 "removed": removed, "reduction_pct": round(share, 3)}
    layers = [_layer_row(b, a) for b, a in zip(shapes_before, shapes_after, strict=True)]
    return {"parameters": parameters, "layers": layers,
            "all_ok": all(row["ok"] for row in layers)}


def disk_size(source: str | os.PathLike) -> int | None:
    """Bytes on disk of a model file or directory (recursive); ``None`` for named sources."""
    if str(source) in ("demo", "tiny"):  # load_model reads these names before any path
        return None
    path = Path(source).expanduser()
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return None


def _human(size: int | None) -> str:
    return "-" if size is None else format_size(size)


def format_report(report: dict) -> str:
    """Human-readable text of a :func:`compare` report (plus optional ``"disk"`` sizes)."""
    lines = [f"{'component':<12}{'before':>14}{'after':>14}{'reduction':>11}"]
    for component, row in report["parameters"].items():
        if component in ("lm_head", "other") and not row["before"] and not row["after"]:
            continue  # tied head / nothing unclassified: not worth a row
        lines.append(f"{component:<12}{row['before']:>14,}{row['after']:>14,}"
                     f"{row['reduction_pct']:>10.2f}%")
    lines += ["", f"{'layer':>5}  {'Q heads':>9}  {'KV heads':>9}  {'q_per_kv':>9}  "
              f"{'MLP width':>13}  ok"]
    for row in report["layers"]:
        lines.append(
            f"{row['layer']:>5}  {row['q_heads_before']:>3} -> {row['q_heads_after']:<2}"
            f"  {row['kv_heads_before']:>3} -> {row['kv_heads_after']:<2}"
            f"  {row['q_per_kv_before']:>3} -> {row['q_per_kv_after']:<2}"
            f"  {row['mlp_before']:>5} -> {row['mlp_after']:<5}  {'ok' if row['ok'] else 'FAIL'}")
    lines.append(f"GQA structure intact in every layer: {'yes' if report['all_ok'] else 'NO'}")
    for role, size in report.get("disk", {}).items():
        if size is not None:
            lines.append(f"size on disk ({role}): {_human(size)}")
    return "\n".join(lines)


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m gqaprune_core.analyze",
        description="Compare parameter counts and per-layer GQA shapes of two models.")
    parser.add_argument("--original_model", required=True,
                        help='"demo", "tiny", a model directory, a .gguf file or a checkpoint')
    parser.add_argument("--pruned_model", required=True, help="same kinds of source")
    parser.add_argument("--device", default="cpu", help='"cpu", "cuda", "auto" (default cpu)')
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--no_verify", action="store_true", help=(
        "do not check a checkpoint's files against gqaprune_manifest.json (SHA-256); for very "
        "large models (also: GQAPRUNE_NO_VERIFY=1)"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status (2 with a one-line reason on unreadable input)."""
    from gqaprune_core.checkpoint import load_any

    args = _arguments(argv)
    for source in (args.original_model, args.pruned_model):
        if source not in ("demo", "tiny") and not Path(source).expanduser().exists():
            print(f"error: model path {source!r} does not exist", file=sys.stderr)
            return 2  # before spending seconds loading the other model
    try:
        verify = not args.no_verify
        original, _ = load_any(args.original_model, device=args.device, verify=verify)
        pruned, _ = load_any(args.pruned_model, device=args.device, verify=verify)
        report = compare(original, pruned)
    except (ValueError, OSError, RuntimeError) as err:  # ModelLoadError, CheckpointError too
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    report["disk"] = {"original": disk_size(args.original_model),
                      "pruned": disk_size(args.pruned_model)}
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
