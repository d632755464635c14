"""The run directory the CLI writes, one file at a time, never half a file.

A run named NAME writes into ``OUTPUT_DIR/NAME/``::

    description.txt                  every setting of the run, one ``name: value`` per line
    layer_importance_config.json     layer scores and the per-layer rates used (original format)
    pruning_strategy.png             layer importance; per-layer rates, min/max band, target
    report.json                      the pipeline report; written last, only on success
    model/                           the pruned checkpoint (``--save_model``)
    FAILED.txt                       the reason, when the run failed after the directory existed
    TIMESTAMP/training.log           the log of the run: settings, stage timings, results

Every file is written to a temporary sibling and renamed into place (``os.replace``), so a
reader sees the old file or the new one, never a truncated one. Nothing here touches tensors:
the functions take plain numbers and dicts.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

DESCRIPTION_NAME = "description.txt"
IMPORTANCE_NAME = "layer_importance_config.json"
PLOT_NAME = "pruning_strategy.png"
REPORT_NAME = "report.json"
FAILED_NAME = "FAILED.txt"
MODEL_DIR_NAME = "model"
LOG_NAME = "training.log"
# What a previous run leaves behind; a new run refuses to mix its files with these.
RUN_OUTPUTS = (DESCRIPTION_NAME, IMPORTANCE_NAME, PLOT_NAME, REPORT_NAME, FAILED_NAME,
               MODEL_DIR_NAME)
LOGGER_NAME = "gqaprune.run"
FILE_ONLY = {"file_only": True}  # ``extra=`` of log records kept off the terminal


@dataclass(frozen=True)
class RunPaths:
    """Where one run's files go (see the module docstring)."""

    root: Path  # OUTPUT_DIR/NAME
    log_dir: Path  # OUTPUT_DIR/NAME/TIMESTAMP

    @property
    def description(self) -> Path:
        return self.root / DESCRIPTION_NAME

    @property
    def importance(self) -> Path:
        return self.root / IMPORTANCE_NAME

    @property
    def plot(self) -> Path:
        return self.root / PLOT_NAME

    @property
    def report(self) -> Path:
        return self.root / REPORT_NAME

    @property
    def failed(self) -> Path:
        return self.root / FAILED_NAME

    @property
    def model(self) -> Path:
        return self.root / MODEL_DIR_NAME

    @property
    def log(self) -> Path:
        return self.log_dir / LOG_NAME


def run_paths(output_dir: str | os.PathLike, name: str, timestamp: str) -> RunPaths:
    """The paths of run ``name`` started at ``timestamp``; creates nothing.

    Raises:
        ValueError: ``name`` is empty, ``.``/``..``, or holds a path separator.
    """
    if not name or name in (".", "..") or "/" in name or os.sep in name:
        raise ValueError(f"run name {name!r} must be a plain, non-empty directory name")
    root = Path(output_dir).expanduser() / name
    return RunPaths(root, root / timestamp)


def previous_outputs(paths: RunPaths) -> list[str]:
    """Names of the files a previous run left in ``paths.root`` (logs do not count)."""
    return [name for name in RUN_OUTPUTS if (paths.root / name).exists()]


def check_reusable(paths: RunPaths, overwrite: bool = False) -> list[str]:
    """The previous run's outputs in ``paths.root`` (see :func:`previous_outputs`).

    Raises:
        ValueError: there are some and ``overwrite`` is False.
    """
    found = previous_outputs(paths)
    if found and not overwrite:
        raise ValueError(f"run directory {str(paths.root)!r} already holds a previous run "
                         f"({', '.join(found)}); choose another --save_ckpt_log_name or pass "
                         "--overwrite")
    return found


def create_run_dir(paths: RunPaths, overwrite: bool = False) -> None:
    """Create the run and log directories.

    With ``overwrite`` the outputs of a previous run (``RUN_OUTPUTS``, including ``model/``) are
    deleted first; other files and earlier ``TIMESTAMP/`` logs stay.

    Raises:
        ValueError: a previous run's outputs are there and ``overwrite`` is False.
        OSError: the directory cannot be created.
    """
    found = check_reusable(paths, overwrite)
    for name in found:
        target = paths.root / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        else:
            target.unlink()
    paths.log_dir.mkdir(parents=True, exist_ok=True)


def write_atomic(path: Path, write: Callable[[Path], object]) -> Path:
    """Create ``path`` whole or not at all: ``write(staging)`` fills a temporary sibling, which
    then replaces ``path`` (``os.replace``); on any error the sibling goes. A crash or a
    concurrent writer never leaves a half-written file under ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(handle)
    try:
        write(Path(staging))
        os.chmod(staging, 0o644)  # mkstemp creates 0600; these are ordinary files
        os.replace(staging, path)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary sibling and ``os.replace``."""
    return write_atomic(path, lambda staging: staging.write_text(text, encoding="utf-8"))


def write_json_atomic(path: Path, data: Mapping) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=1, default=str) + "\n")


def describe(sections: Mapping[str, Mapping[str, object]]) -> str:
    """``[section]`` headers followed by ``name: value`` lines, in the given order."""
    lines = []
    for title, settings in sections.items():
        lines.append(f"[{title}]")
        lines.extend(f"{name}: {value}" for name, value in settings.items())
        lines.append("")
    return "\n".join(lines)


def write_failure(paths: RunPaths, reason: str) -> None:
    """Leave ``FAILED.txt`` with ``reason``; a stale ``report.json`` must not survive it."""
    paths.report.unlink(missing_ok=True)
    write_text_atomic(paths.failed, reason.rstrip() + "\n")


@contextmanager
def run_log(path: Path, echo: bool = True) -> Iterator[logging.Logger]:
    """A logger writing to ``path`` and to stderr, closed on exit.

    Without ``echo`` (``--quiet``) only warnings and errors reach stderr. Records logged with
    ``extra=FILE_ONLY`` (long settings and tables) go to the file only.
    The handlers belong to this context only, so repeated in-process runs never log twice.
    """
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    path.parent.mkdir(parents=True, exist_ok=True)
    handlers: list[logging.Handler] = [logging.FileHandler(path, encoding="utf-8")]
    handlers[0].setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    handlers.append(logging.StreamHandler())  # stderr: stdout carries the summary table
    handlers[1].setFormatter(logging.Formatter("%(message)s" if echo else
                                               "gqaprune: %(levelname)s: %(message)s"))
    handlers[1].setLevel(logging.INFO if echo else logging.WARNING)
    handlers[1].addFilter(lambda record: not getattr(record, "file_only", False))
    for handler in handlers:
        logger.addHandler(handler)
    try:
        yield logger
    finally:
        for handler in handlers:
            logger.removeHandler(handler)
            handler.close()


def _percent(value: float | None) -> str:
    return "" if value is None else f"{value:.2%}"


def summary_table(report: Mapping) -> str:
    """A short table: parameters and perplexity before/after, achieved ratios.

    With recovery, "after" splits into "after pruning" and "after recovery" (the final model),
    followed by a line on what recovery cost.
    """
    recovery = report.get("recovery")
    pruned = report.get("ppl_after_pruning", {}) if recovery else {}
    rows = [("", "before", *(("after pruning", "after recovery") if recovery else ("after",))),
            ("parameters", f"{report['params_before']:,}",
             *([""] if recovery else []), f"{report['params_after']:,}"),
            (f"removed of prunable (requested {_percent(report['ratio_requested'])}"
             f" of {report.get('ratio_of', 'prunable')})", "",
             *([""] if recovery else []), _percent(report["ratio_achieved_prunable"])),
            ("removed of all parameters", "", *([""] if recovery else []),
             _percent(report["ratio_achieved_total"]))]
    before, after = report.get("ppl_before", {}), report.get("ppl_after", {})
    for corpus in dict.fromkeys([*before, *after]):
        cells = [before, *([pruned] if recovery else []), after]
        rows.append((f"perplexity {corpus}",
                     *(f"{part[corpus]['value']:.3f}" if corpus in part else "" for part in cells)))
    if not before and not after:
        rows.append(("perplexity", "not measured", *([""] if recovery else []),
                     "(--test_after_prune)"))
    width = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join([f"{row[0]:<{width[0]}}",
                        *(f"{cell:>{w}}" for cell, w in zip(row[1:], width[1:]))]).rstrip()
             for row in rows]
    if recovery:
        lines.append(f"recovery: {recovery['method']}, {recovery['steps_done']} of "
                     f"{recovery['steps_requested']} steps in {recovery['seconds']:.1f} s "
                     f"(stopped by {recovery['stopped_by']}), {recovery['tokens_seen']:,} tokens")
    return "\n".join(lines)


def plot_strategy(path: Path, scores: Sequence[float], rates: Sequence[float], *,
                  method: str, min_rate: float, max_rate: float, target: float,
                  layer_range: range, achieved: Sequence[float] | None = None) -> Path:
    """Two panels: the L layer scores as bars; the L planned rates as bars, with the
    ``[min_rate, max_rate]`` band over ``layer_range``, the target line and, if given, the
    achieved rate of each layer after rounding to whole units. Written atomically (PNG, Agg).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    layers = list(range(len(scores)))
    colors = ["tab:blue" if i in layer_range else "lightgray" for i in layers]
    figure = Figure(figsize=(max(8.0, 0.3 * len(layers)), 7.0), layout="constrained")
    FigureCanvasAgg(figure)
    top, bottom = figure.subplots(2, 1, sharex=True)
    bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
    top.bar(layers, scores, color=colors)
    top.set_ylabel(f"importance ({method})")
    top.set_title("Layer importance (grey: outside the pruned layer range)")
    bottom.bar(layers, rates, color=colors, label="planned rate")
    low, high = layer_range.start - 0.5, layer_range.stop - 0.5
    bottom.fill_between([low, high], min_rate, max_rate, color="tab:green", alpha=0.15,
                        zorder=0, label=f"min/max rate [{min_rate:.0%}, {max_rate:.0%}]")
    bottom.axhline(target, color="tab:red", linestyle="--", label=f"target {target:.1%}")
    if achieved is not None:
        bottom.plot(layers, achieved, "ko", markersize=4, clip_on=False, zorder=3,
                    label="achieved (whole units)")
    bottom.set_xlabel("layer")
    bottom.set_ylabel("pruning rate")
    bottom.set_ylim(0, max(max_rate, *rates, *(achieved or [0.0])) * 1.15 + 1e-3)
    bottom.legend(loc="upper right", fontsize="small")
    staging = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    try:
        figure.savefig(staging, dpi=100)
        os.replace(staging, path)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
    return path
