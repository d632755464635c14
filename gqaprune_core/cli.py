"""``python -m gqaprune_core``: flags → :class:`PruneConfig` → pipeline → a run directory.

The original script's flags keep their names and meanings, so its commands still work::

    python -m gqaprune_core --base_model demo --pruning_ratio 0.2 --prune_mlp \\
        --save_ckpt_log_name demo20 --test_after_prune --save_model
    # second stage: reuse the scores with another ratio, no importance analysis
    python -m gqaprune_core --base_model demo --pruning_ratio 0.3 --prune_mlp \\
        --skip_importance_analysis \\
        --importance_config prune_log/demo20/layer_importance_config.json

Without ``--preset`` a run starts from the ``original`` preset, with the MLP left whole unless
``--prune_mlp`` is given (the original pruned attention only). ``--preset NAME`` starts from
``PRESETS[NAME]`` as it is; flags given explicitly override either (the flags and that
mapping: :mod:`gqaprune_core.cli_flags`).

Every input is checked (flags, config, run name, paths, corpora, model, reused scores against
its weights fingerprint, layer range and rates) before the run directory is created; flags,
config and run name even before the model loads (:mod:`gqaprune_core.cli_checks`). The run
then locks its directory (:mod:`gqaprune_core.runlock`: a second run of the same name fails at
once and touches nothing) and runs with SIGINT and SIGTERM turned into an exception
(:mod:`gqaprune_core.interrupts`). Failures print one line on stderr and exit 2 (the command
line is wrong) or 1 (an input cannot be used, the run failed), 130/143 on SIGINT/SIGTERM; a
failure after the directory exists leaves ``FAILED.txt`` there and no ``report.json``. See
:mod:`gqaprune_core.outputs` for the files of a run, README "When things go wrong" for each
case.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from gqaprune_core import cli_checks as checks
from gqaprune_core import interrupts, outputs, runlock
from gqaprune_core.cli_flags import UsageError, build_parser, config_from_args
from gqaprune_core.cli_progress import ProgressBars, library_progress
from gqaprune_core.config import PruneConfig

# ---- checks before anything is written ---------------------------------------------------------

@dataclass
class Prepared:
    """Everything validated before the run directory exists."""

    config: PruneConfig
    model: Any  # nn.Module; typed loosely so that --help does not import torch
    tokenizer: Any
    importance: Any  # LayerImportance read from --importance_config, or None
    load_seconds: float
    shapes: list  # LayerLayout per layer, before pruning
    costs: list  # UnitCost per layer, before pruning
    target: float  # the ratio as a fraction of the prunable parameters in range
    layer_range: range
    layerwise: bool = False  # model is then a meta skeleton; the weights stay on disk


def prepare(args: argparse.Namespace, config: PruneConfig) -> Prepared:
    """Check every input and load the model; writes nothing.

    Raises:
        UsageError: a flag value that is wrong by itself or for this model.
        ValueError (ModelLoadError, CorpusError included) naming the offending value.
    """
    from gqaprune_core.layer_importance import load_importance_config
    from gqaprune_core.models import layout, load_model
    from gqaprune_core.schedule import unit_costs

    checks.check_flags(args)
    checks.check_recovery(config)
    checks.check_device(config.device)
    importance = (load_importance_config(args.importance_config)
                  if args.importance_config else None)
    checks.check_corpora(config, args.test_after_prune)
    start = time.perf_counter()
    from gqaprune_core.layerwise.pipeline import decide_layerwise
    from gqaprune_core.layerwise.source import open_skeleton

    layerwise = decide_layerwise(config)
    if layerwise:
        model, tokenizer = open_skeleton(config.base_model)
    else:
        model, tokenizer = load_model(config.base_model, config.device, config.dtype,
                                      allow_pickle=args.allow_pickle,
                                      device_map=config.device_map,
                                      max_memory=config.max_memory)
    load_seconds = round(time.perf_counter() - start, 3)
    shapes = layout(model)
    checks.check_geometry(shapes, config.base_model, args.head_dim, args.gqa_ratio)
    if importance is not None:
        warning = checks.check_importance_source(importance, model, config.base_model,
                                                 args.importance_config,
                                                 args.allow_foreign_importance)
        if warning:
            print(f"gqaprune: warning: {warning}", file=sys.stderr)
    target, layer_range = checks.check_plan(config, model, len(shapes), importance)
    return Prepared(config, model, tokenizer, importance, load_seconds, shapes,
                    unit_costs(model), target, layer_range, layerwise)


# ---- the run ---------------------------------------------------------------------------------

@dataclass
class CliRun:
    """What :func:`execute` produced: the run's paths and the pipeline result (pruned model)."""

    paths: outputs.RunPaths
    result: Any  # PipelineResult
    report: dict


def _command(argv: Sequence[str]) -> str:
    return shlex.join(["python", "-m", "gqaprune_core", *argv])


def _settings(args: argparse.Namespace, argv: Sequence[str], prep: Prepared,
              paths: outputs.RunPaths) -> dict[str, dict[str, object]]:
    """Every setting of the run, by section, for description.txt and training.log."""
    from gqaprune_core.models import count_parameters

    first = prep.shapes[0]
    device = next(prep.model.parameters())  # meta for a layer-wise run's skeleton
    cli_only = ("preset", "skip_importance_analysis", "importance_config", "test_after_prune",
                "save_model", "head_dim", "gqa_ratio", "output_dir", "save_ckpt_log_name",
                "overwrite", "quiet", "max_shard_size", "allow_pickle", "allow_foreign_importance")
    return {
        "run": {"name": paths.root.name, "run_dir": paths.root, "log_dir": paths.log_dir,
                "command": _command(argv)},
        "config": prep.config.to_dict(),
        "cli": {name: getattr(args, name) for name in cli_only},
        "model": {"layers": len(prep.shapes), "q_heads": first.q_heads,
                  "kv_heads": first.kv_heads, "head_dim": first.head_dim,
                  "q_per_kv": first.q_per_kv, "mlp_width": first.mlp_width,
                  "parameters": count_parameters(prep.model), "device": device.device,
                  "dtype": device.dtype, "load_seconds": prep.load_seconds,
                  "prunable_target": round(prep.target, 6),
                  "layer_range": f"{prep.layer_range.start}..{prep.layer_range.stop - 1}",
                  "layerwise": prep.layerwise},
    }


def achieved_layer_rates(prep: Prepared, allocation) -> list[float]:
    """Per layer: parameters removed / parameters of the pruned parts (attention, MLP)."""
    rates = []
    config = prep.config
    for s, c, groups, channels in zip(prep.shapes, prep.costs, allocation.groups_to_keep,
                                      allocation.channels_to_keep):
        part = (c.attention if config.prune_attention else 0) + (c.mlp if config.prune_mlp else 0)
        removed = (s.kv_heads - groups) * c.group + (s.mlp_width - channels) * c.channel
        rates.append(removed / part if part else 0.0)
    return rates


def _write_results(args: argparse.Namespace, prep: Prepared, paths: outputs.RunPaths,
                   result, log, command: str = "") -> dict:
    """layer_importance_config.json, the plot, model/ (--save_model), then report.json."""
    from gqaprune_core.layer_importance import save_importance_config

    config = prep.config
    save_importance_config(paths.importance, result.importance, result.rates)
    outputs.plot_strategy(paths.plot, result.importance.scores, result.rates,
                          method=result.importance.method, min_rate=config.min_pruning_rate,
                          max_rate=config.max_pruning_rate, target=prep.target,
                          layer_range=prep.layer_range,
                          achieved=achieved_layer_rates(prep, result.allocation))
    report = dict(result.report)
    report["timings_s"] = dict(report["timings_s"], load=prep.load_seconds)
    report["budget_met"] = result.allocation.budget_met
    report["importance_source"] = args.importance_config or "computed"
    if prep.layerwise:  # written layer by layer during the run
        report["model_dir"] = str(paths.model.resolve())
        log.info("layer-wise: the pruned model was written to %s", paths.model)
    elif args.save_model:
        from gqaprune_core.checkpoint import DEFAULT_MAX_SHARD_SIZE, save_pruned
        from gqaprune_core.export.model_card import CardInfo

        start = time.perf_counter()
        card = CardInfo(base_model=config.base_model, command=command,
                        settings=config.to_dict(), report=report)
        save_pruned(result.model, result.tokenizer, result.plan, paths.model,
                    max_shard_size=args.max_shard_size or DEFAULT_MAX_SHARD_SIZE, card=card)
        report["timings_s"]["save"] = round(time.perf_counter() - start, 3)
        report["model_dir"] = str(paths.model.resolve())
        log.info("saved the pruned model to %s", paths.model)
    outputs.write_json_atomic(paths.report, report)
    return report


def _log_results(log, report: dict, result) -> None:
    log.info("stage timings (s): %s", report["timings_s"])
    for row in report["layers"]:
        log.info("layer %3d: rate %.4f, KV heads %d -> %d, query heads %d -> %d, MLP %d -> %d",
                 row["layer"], row["rate"], row["kv_heads_before"], row["kv_heads"],
                 row["q_heads_before"], row["q_heads"], row["mlp_before"], row["mlp"],
                 extra=outputs.FILE_ONLY)
    recovery = report.get("recovery")
    if recovery:
        _log_recovery(log, recovery)
    if not result.allocation.budget_met:
        log.warning("the parameter budget was missed by more than 0.5%% of the prunable "
                    "parameters (requested %.4f, achieved %.4f): whole GQA groups are coarse; "
                    "--prune_mlp lets MLP channels take up the rest",
                    result.allocation.ratio_requested, result.allocation.ratio_achieved)


def _log_recovery(log, recovery: dict) -> None:
    losses = ("" if recovery["loss_first"] is None else
              f", distillation loss {recovery['loss_first']:.4f} -> {recovery['loss_last']:.4f}")
    log.info("recovery (%s, lr %g): %d of %d steps in %.1f s (stopped by %s), %d tokens, "
             "%s trainable parameters%s", recovery["method"], recovery["lr"],
             recovery["steps_done"], recovery["steps_requested"], recovery["seconds"],
             recovery["stopped_by"], recovery["tokens_seen"], f"{recovery['trainable_params']:,}",
             losses)
    for corpus, value in recovery["ppl_after_pruning"].items():
        after = recovery["ppl_after_recovery"].get(corpus)
        if after is not None:
            log.info("perplexity %s: %.3f after pruning -> %.3f after recovery (%+.1f%%)",
                     corpus, value, after, 100 * (after / value - 1))


def _run(args: argparse.Namespace, argv: Sequence[str], prep: Prepared,
         paths: outputs.RunPaths, log) -> CliRun:
    from gqaprune_core.pipeline import run_pipeline

    text = outputs.describe(_settings(args, argv, prep, paths))
    outputs.write_text_atomic(paths.description, text)
    log.info("settings:\n%s", text, extra=outputs.FILE_ONLY)
    source = args.importance_config or f"computed ({prep.config.importance_method})"
    log.info("layer importance: %s", source)
    bars = ProgressBars(enabled=not args.quiet)
    try:
        if prep.layerwise:
            from gqaprune_core.checkpoint import DEFAULT_MAX_SHARD_SIZE
            from gqaprune_core.export.shards import parse_size
            from gqaprune_core.layerwise.pipeline import run_layerwise

            log.info("layer-wise: one decoder layer at a time from %s (the model is always "
                     "written, to %s)", prep.config.base_model, paths.model)
            result = run_layerwise(prep.config, paths.model, importance=prep.importance,
                                   evaluate=args.test_after_prune, overwrite=args.overwrite,
                                   progress=bars, on_step=bars.step,
                                   max_shard_bytes=parse_size(args.max_shard_size
                                                              or DEFAULT_MAX_SHARD_SIZE))
            substituted = result.report["layerwise"].get("channel_selection")
            if substituted:
                log.info("layer-wise: MLP channels chosen by %s", substituted)
            if result.report["layerwise"].get("self_text"):
                log.info("layer-wise: %s", result.report["layerwise"]["self_text"])
        else:
            result = run_pipeline(prep.config, prep.model, prep.tokenizer,
                                  importance=prep.importance, copy_model=False,
                                  evaluate=args.test_after_prune, progress=bars,
                                  check_plan=lambda allocation: checks.check_removal(
                                      prep.config, allocation, prep.model))
    finally:
        bars.close()
    report = _write_results(args, prep, paths, result, log, command=_command(argv))
    _log_results(log, report, result)
    summary = outputs.summary_table(report)
    log.info("results:\n%s", summary, extra=outputs.FILE_ONLY)
    print(summary)
    print(f"run directory: {paths.root}")
    return CliRun(paths, result, report)


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text or type(err).__name__


def _claim_run_dir(args: argparse.Namespace, paths: outputs.RunPaths,
                   stamp: str) -> tuple[outputs.RunPaths, runlock.RunLock]:
    """Lock the run directory (see :mod:`gqaprune_core.runlock`), then clear or create it.

    An explicit name is locked as it is: a live run holding it fails this one, before it
    touches any file there. A default name takes the first of ``prune-STAMP``,
    ``prune-STAMP-2``, ... that this process creates itself (an atomic ``mkdir``), so two
    runs started in the same second never share a directory.
    """
    if not args.save_ckpt_log_name:
        root = Path(args.output_dir).expanduser()
        root.mkdir(parents=True, exist_ok=True)
        name = f"prune-{stamp}"
        for number in range(2, 10_000):
            try:
                (root / name).mkdir()
                break
            except FileExistsError:
                name = f"prune-{stamp}-{number}"
        paths = outputs.run_paths(args.output_dir, name, stamp)
    lock = runlock.lock_run_dir(paths.root)
    try:
        outputs.create_run_dir(paths, overwrite=args.overwrite)
    except BaseException:
        lock.release()
        raise
    return paths, lock


def _early_checks(args: argparse.Namespace, stamp: str) -> tuple[PruneConfig, outputs.RunPaths]:
    """Flags, config and run name, before the (slow) model load; writes nothing."""
    try:
        config = config_from_args(args)
        paths = outputs.run_paths(args.output_dir, args.save_ckpt_log_name or f"prune-{stamp}",
                                  stamp)
    except ValueError as err:  # PruneConfig validation, a bad run name: the flags are wrong
        raise UsageError(str(err)) from err
    if args.save_ckpt_log_name:
        runlock.check_not_busy(paths.root)
        outputs.check_reusable(paths, overwrite=args.overwrite)
    return config, paths


def execute(argv: Sequence[str] | None = None) -> CliRun:
    """Parse, check, run and write the run directory; raises on failure (see :func:`main`).

    SIGINT and SIGTERM raise :class:`gqaprune_core.interrupts.Interrupted` inside, so a run
    stopped by either cleans up and leaves ``FAILED.txt`` naming the signal. Returns the run's
    paths, its report and the pipeline result, whose ``model`` is the pruned model in memory
    (tests compare it with the saved one).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    with library_progress(not args.quiet), interrupts.signals_as_exceptions():
        stamp = datetime.now().strftime("%Y-%m-%d-%H-%M-%S")
        config, paths = _early_checks(args, stamp)
        prep = prepare(args, config)
        paths, lock = _claim_run_dir(args, paths, stamp)
        with lock, outputs.run_log(paths.log, echo=not args.quiet) as log:
            try:
                return _run(args, argv, prep, paths, log)
            except BaseException as err:
                reason = interrupts.describe(err) if isinstance(err, KeyboardInterrupt) else (
                    f"{type(err).__name__}: {_one_line(err)}")
                log.error("run failed: %s", reason, extra=outputs.FILE_ONLY)  # main prints it
                outputs.write_failure(paths, reason)
                raise


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status.

    0 ok; 2 the command line is wrong (a flag value out of range or contradicting the model,
    flags that contradict each other, a bad run name: :class:`UsageError`, see
    :mod:`gqaprune_core.cli_checks`); 1 an input cannot be used (missing or unreadable model,
    pickled weights, scores of another model, unknown corpus, a run directory in use or
    holding a previous run) or the run failed (it removes far less than asked, out of
    memory, ...); 130 SIGINT, 143 SIGTERM. Expected failures print one line on stderr,
    without a traceback; README "When things go wrong" lists them with what is left on disk.
    """
    try:
        execute(argv)
    except UsageError as err:
        print(f"gqaprune: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as err:  # ModelLoadError, CorpusError, CheckpointError, ...
        print(f"gqaprune: error: {_one_line(err)}", file=sys.stderr)
        return 1
    except RuntimeError as err:
        import torch

        if not isinstance(err, torch.OutOfMemoryError):
            raise  # a bug: keep the traceback
        print(f"gqaprune: error: out of memory ({_one_line(err)}); try --dtype bfloat16, "
              "smaller sample counts, or another --device", file=sys.stderr)
        return 1
    except KeyboardInterrupt as err:  # interrupts.Interrupted: SIGINT or SIGTERM
        print(f"gqaprune: {interrupts.describe(err)}", file=sys.stderr)
        return interrupts.exit_status(err)
    return 0
