"""The command line's flags and how they become a :class:`PruneConfig`.

The original script's flags keep their names and meanings; every config flag defaults to None
("not given"), so that a preset's value stands unless the flag overrides it. Without
``--preset`` a run starts from the ``original`` preset with the MLP left whole unless
``--prune_mlp`` (the original pruned attention only). The run itself: :mod:`gqaprune_core.cli`.
"""

from __future__ import annotations

import argparse
from typing import Any

from gqaprune_core.config import (CHANNEL_SELECTIONS, GROUP_ROUNDINGS, IMPORTANCE_METHODS,
                                  LAYERWISE_CHOICES, MODES, PRESETS, RECOVERY_DEFAULT_LR,
                                  RECOVERY_METHODS, STRATEGIES, UNIT_METHODS, PruneConfig)

DEFAULT_PRESET = "original"
DTYPES = ("auto", "float32", "bfloat16", "float16")
# Flags whose destination is a PruneConfig field of the same name.
CONFIG_FLAGS = (
    "base_model", "pruning_ratio", "ratio_of", "importance_method", "pruning_strategy", "alpha",
    "min_pruning_rate", "max_pruning_rate", "layer_start", "layer_end", "importance_samples",
    "importance_seq_len", "num_examples", "seq_len", "prune_mlp", "prune_attention",
    "group_rounding", "channel_multiple", "mode", "unit_importance", "compensate", "refit_ridge",
    "refit_feedback", "channel_selection", "self_text_share",
    "calibration_dataset", "eval_datasets", "eval_seq_len", "max_eval_windows", "seed", "device",
    "dtype", "recovery", "recovery_steps", "recovery_time_s", "recovery_lr", "recovery_batch_size",
    "recovery_seq_len", "recovery_samples", "layerwise", "device_map", "max_memory",
    "max_ppl_increase", "sensitivity_samples", "sensitivity_seq_len", "sensitivity_fit_samples",
    "sensitivity_mode",
)


class UsageError(ValueError):
    """A flag that argparse rejects (exit status 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse prints usage + message; we want one line
        raise UsageError(f"{message} (see --help)")


def _eval_windows(text: str) -> int | str:
    if text == "all":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'all', got {text!r}")
    return value


def _shard_size(text: str) -> int:
    from gqaprune_core.export.shards import parse_size

    try:
        return parse_size(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def _corpus_list(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())


def _add_model_flags(parser: argparse.ArgumentParser, d: PruneConfig) -> None:
    group = parser.add_argument_group("model and device")
    group.add_argument("--base_model", metavar="MODEL", help=(
        "model to prune: 'demo' (SmolLM2-135M), 'tiny' (random 3-layer test model), a Hugging "
        f"Face model directory or a .gguf file (default: {d.base_model})"))
    group.add_argument("--head_dim", type=int, help=(
        "expected head dimension; detected from the model, a different value is an error"))
    group.add_argument("--gqa_ratio", type=int, help=(
        "expected query heads per KV head; detected from the model, a different value is an error"))
    group.add_argument("--device", help=f"'auto' (the GPU with most free memory, else CPU), "
                       f"'cpu', 'cuda', 'cuda:1', ... (default: {d.device})")
    group.add_argument("--dtype", choices=DTYPES, help=(
        "weight dtype; 'auto' is bfloat16 on GPU, float32 on CPU (default: auto)"))
    group.add_argument("--layerwise", choices=LAYERWISE_CHOICES, help=(
        "'on': prune one decoder layer at a time from the weights on disk into the output "
        "shards (models larger than the device; forward-only settings such as the default "
        "preset); 'off': load the whole model; 'auto': layer-wise when the weights would not "
        f"fit the device's free memory (default: {d.layerwise})"))
    group.add_argument("--device_map", choices=("auto",), help=(
        "in memory: spread the model over all GPUs (then CPU, then disk) with accelerate, "
        "instead of one --device (default: one device)"))
    group.add_argument("--max_memory", metavar="DEV=SIZE,...", help=(
        "with --device_map: memory per device, e.g. '0=20GiB,1=20GiB,cpu=64GiB'"))
    group.add_argument("--seed", type=int, help=f"seed of calibration sampling and random "
                       f"scores (default: {d.seed})")
    group.add_argument("--allow_pickle", action="store_true", help=(
        "read a model directory whose only weights are pickled (pytorch_model.bin), with "
        "torch's restricted (weights-only) unpickler; without it such a directory is refused "
        "(convert it to safetensors)"))
    group.add_argument("--preset", choices=sorted(PRESETS), help=(
        f"start from this preset's settings; explicit flags override them (default: "
        f"{DEFAULT_PRESET}, with the MLP left whole unless --prune_mlp)"))


def _add_pruning_flags(parser: argparse.ArgumentParser, d: PruneConfig) -> None:
    group = parser.add_argument_group("how much to prune, and where")
    group.add_argument("--pruning_ratio", type=float, help=(
        f"fraction of parameters to remove, see --ratio_of (default: {d.pruning_ratio})"))
    group.add_argument("--ratio_of", choices=("prunable", "total"), help=(
        "'prunable': the ratio is of the attention (+ MLP with --prune_mlp) parameters of the "
        f"layers in range; 'total': of all parameters (default: {d.ratio_of})"))
    group.add_argument("--pruning_strategy", choices=STRATEGIES, help=(
        "per-layer rates: 'inverse' prunes important layers less, 'proportional' more, "
        "'uniform' the same everywhere; 'optimized': per layer the groups and channels with "
        "the least predicted loss from the sensitivity profile (computed once, cached) "
        f"(default: {d.pruning_strategy})"))
    group.add_argument("--alpha", type=float, help=(
        f"sharpness of the per-layer rates, >= 0; 0 is uniform (default: {d.alpha})"))
    group.add_argument("--min_pruning_rate", type=float, help=(
        f"lowest rate of any layer in range (default: {d.min_pruning_rate})"))
    group.add_argument("--max_pruning_rate", type=float, help=(
        f"highest rate of any layer in range (default: {d.max_pruning_rate})"))
    group.add_argument("--layer_start", type=int, help=(
        f"first layer to prune (default: {d.layer_start})"))
    group.add_argument("--layer_end", type=int, help=(
        "layer after the last one to prune (default: the number of layers)"))
    group.add_argument("--prune_mlp", action=argparse.BooleanOptionalAction, help=(
        "also prune MLP channels; without it only attention (whole GQA groups) is pruned, as "
        "in the original script (with --preset: the preset's choice)"))
    group.add_argument("--prune_attention", action=argparse.BooleanOptionalAction, help=(
        "prune whole GQA groups (default: on; --no-prune_attention prunes MLP channels only)"))
    group.add_argument("--group_rounding", choices=GROUP_ROUNDINGS, help=(
        "whole groups per layer: 'per_layer' removes floor(rate x groups) in each layer, as the "
        "original script; 'across' rounds group counts across layers so attention pays its share "
        f"of the budget (MLP channels take up the rest either way) (default: {d.group_rounding})"))
    group.add_argument("--channel_multiple", type=int, help=(
        "every pruned layer keeps a multiple of this many MLP channels; GPU matrix kernels are "
        f"slower on widths that are not multiples of 8 (default: {d.channel_multiple})"))


def _add_importance_flags(parser: argparse.ArgumentParser, d: PruneConfig) -> None:
    group = parser.add_argument_group("layer importance and unit selection")
    group.add_argument("--importance_method", choices=IMPORTANCE_METHODS, help=(
        "layer scores: 'removal' (perplexity increase with the layer bypassed), 'activation' "
        f"(output norm), 'block_influence' (1 - cos(in, out)) (default: {d.importance_method})"))
    group.add_argument("--importance_samples", type=int, help=(
        f"calibration windows for layer importance (default: {d.importance_samples})"))
    group.add_argument("--importance_seq_len", type=int, help=(
        f"tokens per layer-importance window (default: {d.importance_seq_len})"))
    group.add_argument("--skip_importance_analysis", action="store_true", help=(
        "do not compute layer importance; read it from --importance_config (required)"))
    group.add_argument("--importance_config", metavar="PATH", help=(
        "a layer_importance_config.json of an earlier run whose scores are reused (its stored "
        "rates are not: they are recomputed for this run's ratio and bounds)"))
    group.add_argument("--allow_foreign_importance", action="store_true", help=(
        "use --importance_config scores although their stored weights fingerprint is not this "
        "model's (by default such scores are refused)"))
    group.add_argument("--unit_importance", choices=UNIT_METHODS, help=(
        "how GQA groups and MLP channels are scored; 'naive-heads' is the per-head anti-example "
        f"(default: {d.unit_importance})"))
    group.add_argument("--num_examples", type=int, help=(
        f"calibration windows for scoring groups and channels (default: {d.num_examples})"))
    group.add_argument("--seq_len", type=int, help=(
        f"tokens per unit-scoring window (default: {d.seq_len})"))
    group.add_argument("--self_text_share", type=float, help=(
        "windows the dense model writes itself, added to the real calibration windows of the "
        "prune stage, per real window (0..4; 0 = none; cached on disk; not in layer-wise runs) "
        f"(default: {d.self_text_share}; {PRESETS['default'].self_text_share} in the 'default' "
        "preset)"))
    group.add_argument("--mode", choices=MODES, help=(
        "'sequential' rescores each layer after cutting the previous ones, 'one-shot' scores "
        f"all layers once (default: {d.mode})"))
    group.add_argument("--compensate", action=argparse.BooleanOptionalAction, help=(
        "choose MLP channels by their output energy on calibration data and re-fit down_proj "
        "by ridge least squares toward the original weights (default: off; on in the "
        "'default' preset)"))
    group.add_argument("--refit_ridge", type=float, help=(
        f"ridge strength of the re-fit, relative to the mean activation energy "
        f"(default: {d.refit_ridge})"))
    group.add_argument("--refit_feedback", type=float, help=(
        "share (0..1) of the drift from the dense model's residual stream that each layer's "
        f"re-fit also corrects (default: {d.refit_feedback}; "
        f"{PRESETS['default'].refit_feedback} in the 'default' preset)"))
    group.add_argument("--channel_selection", choices=CHANNEL_SELECTIONS, help=(
        "with --compensate, how MLP channels are chosen: 'energy' (output energy), 'fisher' "
        "(loss-weighted cost from one backward pass) or 'energy+fisher' (both; the 'default' "
        "preset's; layer-wise runs take the backward pass one layer at a time, keeping every "
        "layer's input in host memory, or on disk beside the output when that would take more "
        "than half of the free memory, and fall back to 'energy' when it fits neither) "
        f"(default: {d.channel_selection})"))


def _add_data_flags(parser: argparse.ArgumentParser, d: PruneConfig) -> None:
    group = parser.add_argument_group("data and evaluation")
    group.add_argument("--calibration_dataset", metavar="CORPUS", help=(
        "corpus for calibration: demo, pydoc, wiki, wikitext2, ptb, c4, a .txt file or 'a+b' "
        f"(default: {d.calibration_dataset})"))
    group.add_argument("--test_after_prune", action="store_true", help=(
        "measure perplexity before and after pruning on --eval_datasets (without it, none)"))
    group.add_argument("--eval_datasets", type=_corpus_list, metavar="A,B", help=(
        f"comma-separated evaluation corpora (default: {','.join(d.eval_datasets)})"))
    group.add_argument("--eval_seq_len", type=int, help=(
        f"tokens per evaluation window (default: {d.eval_seq_len})"))
    group.add_argument("--max_eval_windows", type=_eval_windows, metavar="N|all", help=(
        f"evaluation windows per corpus at most (default: {d.max_eval_windows or 'all'})"))


def _add_recovery_flags(parser: argparse.ArgumentParser, d: PruneConfig) -> None:
    group = parser.add_argument_group(
        "recovery (optional): distillation from the dense model after pruning")
    lrs = ", ".join(f"{lr:g} for {method}" for method, lr in RECOVERY_DEFAULT_LR.items())
    group.add_argument("--recovery", choices=RECOVERY_METHODS, help=(
        "after pruning, train the pruned model toward the dense one (KL divergence of their "
        "next-token distributions) on calibration text: 'lora' trains LoRA adapters and merges "
        "them (same shapes, no extra parameters), 'full' trains every decoder-layer weight; "
        "perplexity is reported after pruning and after recovery, with its cost (default: "
        f"{d.recovery})"))
    group.add_argument("--recovery_steps", type=int, help=(
        f"optimiser steps at most (default: {d.recovery_steps})"))
    group.add_argument("--recovery_time_s", type=float, help=(
        "time budget in seconds; checked before every step, so recovery ends at the steps or "
        "the budget, whichever comes first (2 CPU threads: ~11 s per step on the demo model) "
        f"(default: {d.recovery_time_s:g})"))
    group.add_argument("--recovery_lr", type=float, help=(
        f"AdamW peak learning rate, decayed along a cosine to zero over the steps (default: "
        f"{lrs})"))
    group.add_argument("--recovery_batch_size", type=int, help=(
        f"windows per step (default: {d.recovery_batch_size})"))
    group.add_argument("--recovery_seq_len", type=int, help=(
        f"tokens per window (default: {d.recovery_seq_len})"))
    group.add_argument("--recovery_samples", type=int, help=(
        "calibration windows to cycle through, drawn apart from the pruning's (default: one "
        "per step and batch row, so that no window is seen twice)"))


def _add_sensitivity_flags(parser: argparse.ArgumentParser, d: PruneConfig) -> None:
    group = parser.add_argument_group(
        "sensitivity profile, optimized schedule, quality gate (gqaprune_core.sensitivity)")
    group.add_argument("--max_ppl_increase", type=float, help=(
        "quality gate: prune the largest ratio up to --pruning_ratio whose perplexity, "
        "measured on validation text held out of the calibration parts, stays within "
        "(1 + this) x dense, e.g. 0.25; predicted first, then a few measured prunes; the "
        "ratio-to-perplexity curve goes to report.json (default: off)"))
    group.add_argument("--sensitivity_samples", type=int, help=(
        f"profile windows the single-layer losses are measured on (default: "
        f"{d.sensitivity_samples})"))
    group.add_argument("--sensitivity_seq_len", type=int, help=(
        f"tokens per profile window (default: {d.sensitivity_seq_len})"))
    group.add_argument("--sensitivity_fit_samples", type=int, help=(
        "calibration windows (of --seq_len tokens) the profile's channel choice and re-fit "
        f"use (default: {d.sensitivity_fit_samples})"))
    group.add_argument("--sensitivity_mode", choices=("anchored", "exact"), help=(
        "'anchored': one measured point per layer and part, the rest scaled by the local "
        "output error (about 5x cheaper); 'exact': every point measured (default: "
        f"{d.sensitivity_mode})"))


def _add_output_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("outputs")
    group.add_argument("--output_dir", default="prune_log", help=(
        "directory holding the run directories (default: prune_log)"))
    group.add_argument("--save_ckpt_log_name", metavar="NAME", help=(
        "run name: files go to OUTPUT_DIR/NAME/ (default: prune-<timestamp>)"))
    group.add_argument("--save_model", action="store_true", help=(
        "save the pruned model to OUTPUT_DIR/NAME/model/ (load it with load_pruned)"))
    group.add_argument("--overwrite", action="store_true", help=(
        "replace the outputs of a previous run of the same name (otherwise an error)"))
    group.add_argument("--max_shard_size", type=_shard_size, metavar="SIZE", help=(
        "with --save_model: the most bytes per weights file, e.g. 5GB, 200MB, 1GiB (default: "
        "5GB, as Hugging Face); more become model-0000N-of-0000M.safetensors + an index"))
    group.add_argument("--quiet", action="store_true", help=(
        "no progress bars or log lines on the terminal (the summary and errors still print)"))


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; every config flag defaults to None, meaning "not given"."""
    defaults = PRESETS[DEFAULT_PRESET]
    parser = _Parser(prog="python -m gqaprune_core", description=(
        "Prune a grouped-query-attention LLM by whole GQA groups (and MLP channels), with "
        "per-layer rates from layer importance. Writes OUTPUT_DIR/NAME/: description.txt, "
        "layer_importance_config.json, pruning_strategy.png, report.json, TIMESTAMP/training.log "
        "and, with --save_model, model/."))
    _add_model_flags(parser, defaults)
    _add_pruning_flags(parser, defaults)
    _add_importance_flags(parser, defaults)
    _add_data_flags(parser, defaults)
    _add_recovery_flags(parser, defaults)
    _add_sensitivity_flags(parser, defaults)
    _add_output_flags(parser)
    return parser


def config_from_args(args: argparse.Namespace) -> PruneConfig:
    """The preset (or ``original``) with every flag that was given applied on top.

    Raises:
        ValueError: from :class:`PruneConfig` validation, naming the values.
    """
    base = PRESETS[args.preset or DEFAULT_PRESET]
    convert = {"dtype": lambda v: None if v == "auto" else v,
               "max_eval_windows": lambda v: None if v == "all" else v}
    changes: dict[str, Any] = {}
    for name in CONFIG_FLAGS:
        value = getattr(args, name)
        if value is not None:
            changes[name] = convert.get(name, lambda v: v)(value)
    if args.prune_mlp is None and args.preset is None:
        changes["prune_mlp"] = False  # the original script pruned attention only by default
    return base.with_(**changes)
