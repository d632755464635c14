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

Every input is checked (flags, config, paths, corpora, model, layer range and rates) before
the run directory is created. Failures print one line on stderr and exit non-zero; a failure
after the directory exists leaves ``FAILED.txt`` there and no ``report.json``. See
:mod:`gqaprune_core.outputs` for the files of a run.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from gqaprune_core import outputs
from gqaprune_core.cli_flags import UsageError, build_parser, config_from_args
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


def _check_flags(args: argparse.Namespace) -> None:
    if args.skip_importance_analysis and not args.importance_config:
        raise ValueError("--skip_importance_analysis needs --importance_config PATH (the "
                         "layer_importance_config.json of an earlier run)")


def _check_recovery(config: PruneConfig) -> None:
    import importlib.util

    if config.recovery == "lora" and importlib.util.find_spec("peft") is None:
        raise ValueError("--recovery lora needs the peft package: pip install peft (or use "
                         "--recovery full)")


def _check_device(device: str) -> None:
    import torch

    if device == "auto":
        return
    try:
        parsed = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"--device {device!r} is not a device name ({err})") from err
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (parsed.index or 0) >= count:
            raise ValueError(f"--device {device!r} requested, but {count} CUDA devices are "
                             "available")


def _check_corpora(config: PruneConfig, evaluate: bool) -> None:
    from gqaprune_core.data import load_corpus

    for name in (config.calibration_dataset, *(config.eval_datasets if evaluate else ())):
        load_corpus(name)  # CorpusError naming the corpus


def _check_geometry(shapes: Sequence, source: str, head_dim: int | None,
                    gqa_ratio: int | None) -> None:
    """The model's head_dim and q_per_kv must equal --head_dim / --gqa_ratio when given."""
    first = shapes[0]
    if head_dim is not None and {s.head_dim for s in shapes} != {head_dim}:
        raise ValueError(f"--head_dim {head_dim} does not match the model: {source} has "
                         f"head_dim {sorted({s.head_dim for s in shapes})}")
    if gqa_ratio is not None and {s.q_per_kv for s in shapes} != {gqa_ratio}:
        raise ValueError(f"--gqa_ratio {gqa_ratio} does not match the model: {source} has "
                         f"{first.q_per_kv} query heads per KV head ({first.q_heads} query "
                         f"heads, {first.kv_heads} KV heads)")


def _check_plan(config: PruneConfig, model, count: int, importance) -> tuple[float, range]:
    """Run the rate schedule and unit allocation on the real scores, or on equal scores when
    they are still to be computed, so that an empty layer range or unreachable rates fail
    before any file is written. Returns the prunable target and the layer range."""
    from gqaprune_core.layer_importance import LayerImportance
    from gqaprune_core.pipeline import plan_units, prunable_target

    if importance is not None and len(importance.scores) != count:
        raise ValueError(f"--importance_config holds {len(importance.scores)} layer scores, "
                         f"the model {config.base_model!r} has {count} layers")
    # the optimized strategy's profile is computed by the run; the check plans uniform rates
    # under the same bounds (the optimizer caps every layer at max_pruning_rate too)
    check = (config.with_(pruning_strategy="uniform", min_pruning_rate=0.0)
             if config.pruning_strategy == "optimized" else config)
    plan_units(check, model, importance or LayerImportance("equal", (0.0,) * count))
    end = count if config.layer_end is None else min(config.layer_end, count)
    layer_range = range(config.layer_start, end)
    return prunable_target(config, model, layer_range), layer_range


def prepare(args: argparse.Namespace, config: PruneConfig) -> Prepared:
    """Check every input and load the model; writes nothing.

    Raises:
        ValueError (ModelLoadError, CorpusError included) naming the offending value.
    """
    from gqaprune_core.layer_importance import load_importance_config
    from gqaprune_core.models import layout, load_model
    from gqaprune_core.schedule import unit_costs

    _check_flags(args)
    _check_recovery(config)
    _check_device(config.device)
    importance = (load_importance_config(args.importance_config)
                  if args.importance_config else None)
    _check_corpora(config, args.test_after_prune)
    start = time.perf_counter()
    model, tokenizer = load_model(config.base_model, config.device, config.dtype)
    load_seconds = round(time.perf_counter() - start, 3)
    shapes = layout(model)
    _check_geometry(shapes, config.base_model, args.head_dim, args.gqa_ratio)
    target, layer_range = _check_plan(config, model, len(shapes), importance)
    return Prepared(config, model, tokenizer, importance, load_seconds, shapes,
                    unit_costs(model), target, layer_range)


# ---- the run ---------------------------------------------------------------------------------

class ProgressBars:
    """tqdm bars on stderr: one per stage, a new one when a stage restarts (next corpus)."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.bar = None
        self.stage = ""

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        if self.bar is None or stage != self.stage or total != self.bar.total or done < self.bar.n:
            from tqdm import tqdm

            self.close()
            self.bar = tqdm(total=total, desc=stage.replace("_", " "), file=sys.stderr,
                            dynamic_ncols=True)
            self.stage = stage
        self.bar.update(done - self.bar.n)
        if done >= total:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


@dataclass
class CliRun:
    """What :func:`execute` produced: the run's paths and the pipeline result (pruned model)."""

    paths: outputs.RunPaths
    result: Any  # PipelineResult
    report: dict


def _settings(args: argparse.Namespace, argv: Sequence[str], prep: Prepared,
              paths: outputs.RunPaths) -> dict[str, dict[str, object]]:
    """Every setting of the run, by section, for description.txt and training.log."""
    from gqaprune_core.models import count_parameters

    first = prep.shapes[0]
    device = next(prep.model.parameters())
    cli_only = ("preset", "skip_importance_analysis", "importance_config", "test_after_prune",
                "save_model", "head_dim", "gqa_ratio", "output_dir", "save_ckpt_log_name",
                "overwrite", "quiet")
    return {
        "run": {"name": paths.root.name, "run_dir": paths.root, "log_dir": paths.log_dir,
                "command": shlex.join(["python", "-m", "gqaprune_core", *argv])},
        "config": prep.config.to_dict(),
        "cli": {name: getattr(args, name) for name in cli_only},
        "model": {"layers": len(prep.shapes), "q_heads": first.q_heads,
                  "kv_heads": first.kv_heads, "head_dim": first.head_dim,
                  "q_per_kv": first.q_per_kv, "mlp_width": first.mlp_width,
                  "parameters": count_parameters(prep.model), "device": device.device,
                  "dtype": device.dtype, "load_seconds": prep.load_seconds,
                  "prunable_target": round(prep.target, 6),
                  "layer_range": f"{prep.layer_range.start}..{prep.layer_range.stop - 1}"},
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
                   result, log) -> dict:
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
    if args.save_model:
        from gqaprune_core.checkpoint import save_pruned

        start = time.perf_counter()
        save_pruned(result.model, result.tokenizer, result.plan, paths.model)
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
        result = run_pipeline(prep.config, prep.model, prep.tokenizer,
                              importance=prep.importance, copy_model=False,
                              evaluate=args.test_after_prune, progress=bars)
    finally:
        bars.close()
    report = _write_results(args, prep, paths, result, log)
    _log_results(log, report, result)
    summary = outputs.summary_table(report)
    log.info("results:\n%s", summary, extra=outputs.FILE_ONLY)
    print(summary)
    print(f"run directory: {paths.root}")
    return CliRun(paths, result, report)


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text or type(err).__name__


def _fresh_name(output_dir: str, name: str) -> str:
    """``name``, or ``name-2``, ``name-3``, ... if a run of that name exists already."""
    candidate, number = name, 1
    while os.path.exists(os.path.join(output_dir, candidate)):
        number += 1
        candidate = f"{name}-{number}"
    return candidate


@contextmanager
def _library_progress(enabled: bool) -> Iterator[None]:
    """Hide transformers' own progress bars (weight loading) under --quiet, then restore."""
    if enabled:
        yield
        return
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def execute(argv: Sequence[str] | None = None) -> CliRun:
    """Parse, check, run and write the run directory; raises on failure (see :func:`main`).

    Returns the run's paths, its report and the pipeline result, whose ``model`` is the pruned
    model in memory (tests compare it with the saved one).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    with _library_progress(not args.quiet):
        config = config_from_args(args)
        prep = prepare(args, config)
        stamp = datetime.now().strftime("%Y-%m-%d-%H-%M-%S")
        name = args.save_ckpt_log_name or _fresh_name(args.output_dir, f"prune-{stamp}")
        paths = outputs.run_paths(args.output_dir, name, stamp)
        outputs.create_run_dir(paths, overwrite=args.overwrite)
        with outputs.run_log(paths.log, echo=not args.quiet) as log:
            try:
                return _run(args, argv, prep, paths, log)
            except BaseException as err:
                reason = "interrupted" if isinstance(err, KeyboardInterrupt) else (
                    f"{type(err).__name__}: {_one_line(err)}")
                log.error("run failed: %s", reason)
                outputs.write_failure(paths, reason)
                raise


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 1 failed run, 2 bad flags, 130 interrupted).

    Expected failures (bad flags or values, missing paths, unknown corpora, models that cannot
    be pruned by groups, out of memory) print one line on stderr, without a traceback.
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
    except KeyboardInterrupt:
        print("gqaprune: interrupted", file=sys.stderr)
        return 130
    return 0
