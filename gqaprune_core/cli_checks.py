"""The CLI's checks of its inputs, each failing with one line that names the values.

Two kinds of failure, two exit statuses (see :func:`gqaprune_core.cli.main`):

- :class:`UsageError` (exit 2): the command line itself is wrong: a flag value out of range,
  flags that contradict each other or the model (``--layer_end`` past its layers,
  ``--head_dim`` / ``--gqa_ratio`` that do not match it, a ratio the rates cannot reach), a
  run name that is not a plain directory name.
- any other ``ValueError`` (exit 1): an input the flags name cannot be used (missing or
  unreadable model, scores of another model, unknown corpus) or the run cannot remove what
  was asked (:class:`RemovalShortfallError`).

Nothing here writes a file.
"""

from __future__ import annotations

import argparse
import importlib.util
from collections.abc import Sequence

from gqaprune_core.cli_flags import UsageError
from gqaprune_core.config import PruneConfig

# A run that removes less than this share of what was asked fails (ratio 0 is always fine).
MIN_SHARE_REMOVED = 0.5


class RemovalShortfallError(ValueError):
    """The plan removes nothing, or far less than the requested ratio."""


def check_flags(args: argparse.Namespace) -> None:
    if args.skip_importance_analysis and not args.importance_config:
        raise UsageError("--skip_importance_analysis needs --importance_config PATH (the "
                         "layer_importance_config.json of an earlier run)")


def check_recovery(config: PruneConfig) -> None:
    if config.recovery == "lora" and importlib.util.find_spec("peft") is None:
        raise ValueError("--recovery lora needs the peft package: pip install peft (or use "
                         "--recovery full)")


def check_device(device: str) -> None:
    import torch

    if device == "auto":
        return
    try:
        parsed = torch.device(device)
    except RuntimeError as err:
        raise UsageError(f"--device {device!r} is not a device name ({err})") from err
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (parsed.index or 0) >= count:
            raise ValueError(f"--device {device!r} requested, but {count} CUDA devices are "
                             "available")


def check_corpora(config: PruneConfig, evaluate: bool) -> None:
    from gqaprune_core.data import load_corpus

    for name in (config.calibration_dataset, *(config.eval_datasets if evaluate else ())):
        load_corpus(name)  # CorpusError naming the corpus


def check_geometry(shapes: Sequence, source: str, head_dim: int | None,
                   gqa_ratio: int | None) -> None:
    """The model's head_dim and q_per_kv must equal --head_dim / --gqa_ratio when given."""
    first = shapes[0]
    if head_dim is not None and {s.head_dim for s in shapes} != {head_dim}:
        raise UsageError(f"--head_dim {head_dim} does not match the model: {source} has "
                         f"head_dim {sorted({s.head_dim for s in shapes})}")
    if gqa_ratio is not None and {s.q_per_kv for s in shapes} != {gqa_ratio}:
        raise UsageError(f"--gqa_ratio {gqa_ratio} does not match the model: {source} has "
                         f"{first.q_per_kv} query heads per KV head ({first.q_heads} query "
                         f"heads, {first.kv_heads} KV heads)")


def check_layer_range(config: PruneConfig, count: int) -> range:
    """The pruned layers; ``--layer_start`` / ``--layer_end`` past the model are refused."""
    if config.layer_end is not None and config.layer_end > count:
        raise UsageError(f"--layer_end {config.layer_end} is past the model's {count} layers "
                         f"(the largest allowed is {count}; leave it out for all layers)")
    if config.layer_start >= count:
        raise UsageError(f"--layer_start {config.layer_start}: layer range [{config.layer_start}"
                         f", {config.layer_end or count}) holds none of the model's {count} "
                         "layers")
    return range(config.layer_start, count if config.layer_end is None else config.layer_end)


def check_plan(config: PruneConfig, model, count: int, importance) -> tuple[float, range]:
    """Run the rate schedule and unit allocation on the real scores, or on equal scores when
    they are still to be computed, so that an empty layer range or unreachable rates fail
    before any file is written. With real scores, a plan that removes far less than asked
    fails here too (:func:`check_removal`). Returns the prunable target and the layer range."""
    from gqaprune_core.layer_importance import LayerImportance
    from gqaprune_core.pipeline import plan_units, prunable_target

    if importance is not None and len(importance.scores) != count:
        raise ValueError(f"--importance_config holds {len(importance.scores)} layer scores, "
                         f"the model {config.base_model!r} has {count} layers")
    layer_range = check_layer_range(config, count)
    # the optimized strategy's profile is computed by the run; the check plans uniform rates
    # under the same bounds (the optimizer caps every layer at max_pruning_rate too)
    planned = (config.with_(pruning_strategy="uniform", min_pruning_rate=0.0)
               if config.pruning_strategy == "optimized" else config)
    try:
        _, allocation = plan_units(planned, model,
                                   importance or LayerImportance("equal", (0.0,) * count))
        target = prunable_target(config, model, layer_range)
    except ValueError as err:  # unreachable rates or budget: the flags ask the impossible
        raise UsageError(str(err)) from err
    if importance is not None:
        check_removal(config, allocation, model)
    return target, layer_range


def check_removal(config: PruneConfig, allocation, model) -> None:
    """Refuse a plan that removes nothing, or less than :data:`MIN_SHARE_REMOVED` of the
    requested ratio, naming the rounding that ate it and the way out.

    Raises:
        RemovalShortfallError
    """
    from gqaprune_core.models import layout

    requested, achieved = allocation.ratio_requested, allocation.ratio_achieved
    if config.pruning_ratio == 0 or requested <= 0 or achieved >= MIN_SHARE_REMOVED * requested:
        return
    shapes = layout(model)
    what = "nothing" if allocation.params_removed == 0 else f"only {achieved:.1%}"
    reasons, ways = [], []
    if config.prune_attention and not config.prune_mlp:
        fewest = min(s.kv_heads for s in shapes)
        reasons.append(f"attention is cut in whole GQA groups ({fewest} per layer here)")
        if config.group_rounding == "per_layer":
            reasons.append(f"--group_rounding per_layer removes floor(rate x {fewest}) of them "
                           f"per layer, so a layer needs a rate of at least 1/{fewest} to lose one")
            ways.append("--group_rounding across (group counts rounded across layers)")
        ways.append("--prune_mlp (MLP channels take up the rest)")
    else:
        reasons.append(f"--channel_multiple {config.channel_multiple} and the per-layer rates "
                       f"(at most --max_pruning_rate {config.max_pruning_rate}) leave too few "
                       "whole units")
        ways.append("a smaller --channel_multiple or a larger --max_pruning_rate")
    raise RemovalShortfallError(
        f"the plan removes {what} of the prunable parameters, {requested:.1%} were asked: "
        f"{'; '.join(reasons)}; use {' or '.join(ways)}, or a larger --pruning_ratio")


def check_importance_source(importance, model, model_id: str, source: str,
                            allow_foreign: bool) -> str | None:
    """Scores reused from ``source`` must have been computed for this model's weights.

    Compares the stored weights fingerprint with the model's (at the stored dtype too, so that
    scores computed in bfloat16 on a GPU fit the same model loaded in float32). Returns a
    warning for a file without a fingerprint (the original project's files), else None.

    Raises:
        ValueError: the fingerprints differ and ``allow_foreign`` is False (both model ids and
            both fingerprints named).
    """
    from gqaprune_core.layer_importance import matches_weights

    stored = importance.inputs.get("weights")
    if not stored:
        return (f"{source} stores no weights fingerprint (an older or foreign file): the scores "
                "cannot be checked against this model")
    if allow_foreign or matches_weights(model, stored):
        return None
    from gqaprune_core.layer_importance import weights_fingerprint

    stored_id = importance.inputs.get("model_id") or "unknown"
    raise ValueError(f"{source} holds scores of model {stored_id!r} (weights fingerprint "
                     f"{stored[:12]}), but this run prunes {model_id!r} (weights fingerprint "
                     f"{weights_fingerprint(model)[:12]}); compute the scores for this model "
                     "(drop --skip_importance_analysis --importance_config) or pass "
                     "--allow_foreign_importance to use them anyway")
