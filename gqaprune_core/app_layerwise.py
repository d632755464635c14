"""The app's layer-wise pruning job: stream the base model from disk into a run folder.

When a deep copy of the shared model would not fit beside it (:func:`prune_layerwise_instead`),
a prune job writes its checkpoint to ``cache/app_runs/run-STAMP/model/`` instead of holding a
pruned model in memory. Each run folder is laid out like a CLI run directory: its
:mod:`~gqaprune_core.runlock` lock file ``.gqaprune.lock`` beside ``model/``.

Those folders are full model copies, so each new layer-wise job removes old ones
(:func:`remove_old_runs`). A folder is in use while some process holds its lock, and a
folder's lock is held

- by the job that writes it, from just after it creates the folder (before any checkpoint
  byte) until the job ends, and
- after that by the :class:`~gqaprune_core.app_support.PruneRun` that points at it, for as long
  as that object lives (a session shows it, the job registry holds it, Export copies from it);
  it is released when the object is garbage-collected or, however it ends, when the process does.

So a folder whose lock is free belongs to no running job and to no result any session can
still show or save, in this process or another. Only those are removed, and only beyond the
:data:`KEEP_APP_RUNS` newest (at least one: the newest may be a folder just created and not
yet locked). Every deletion holds the folder's lock, so no job can take it meanwhile.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import time
import weakref
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from gqaprune_core.app_rates import plan_split
from gqaprune_core.app_support import SHARED_MODEL_LOCK, PruneRun, greedy_generate, memory_bytes
from gqaprune_core.config import PruneConfig
from gqaprune_core.layer_importance import LayerImportance
from gqaprune_core.runlock import RunBusyError, RunLock, lock_run_dir
from gqaprune_core.schedule import unit_costs

if TYPE_CHECKING:
    from gqaprune_core.layerwise.stream import LayerStep

KEEP_APP_RUNS = 2  # run folders always kept, newest first, counting the one being started
RUN_PREFIX = "run-"  # run-YYYYmmdd-HHMMSS-ffffff: names sort by start time
CHECKPOINT_NAME = "model"

log = logging.getLogger(__name__)


def app_runs_dir() -> Path:
    """Where the layer-wise jobs write their run folders: ``cache_dir()/app_runs``."""
    from gqaprune_core.models import cache_dir

    return cache_dir() / "app_runs"


def prune_layerwise_instead(config: PruneConfig, model: nn.Module) -> bool:
    """Whether a pruning job should stream the base model's weights from disk layer by layer
    instead of deep-copying the shared model: ``layerwise="on"``, or ``"auto"`` when a copy
    would not fit beside it on its device (and the source is on disk and the settings stream).
    """
    from gqaprune_core.layerwise.pipeline import (check_streamable, free_memory,
                                                  needs_layerwise)
    from gqaprune_core.layerwise.source import resolve_source

    if config.layerwise == "off":
        return False
    try:
        check_streamable(config)
        resolve_source(config.base_model)
    except ValueError:
        if config.layerwise == "on":
            raise
        return False
    if config.layerwise == "on":
        return True
    device = next(model.parameters()).device
    return needs_layerwise(memory_bytes(model), free_memory(device))


def layerwise_job(config: PruneConfig, model: nn.Module, tokenizer: Any,
                   importance: LayerImportance | None, prompt: str, max_new_tokens: int,
                   progress: Callable[[str, int, int], None]) -> PruneRun:
    """Prune from the weights on disk into a new run folder under :func:`app_runs_dir` (after
    removing old ones); the shared model is only read (to generate before), never copied."""
    from gqaprune_core.layerwise.pipeline import run_layerwise

    start = time.perf_counter()
    progress("generate before", 0, 1)
    with SHARED_MODEL_LOCK:
        text_before = greedy_generate(model, tokenizer, prompt, max_new_tokens)
    costs = unit_costs(model)
    folder, lock = _new_run_folder(app_runs_dir())
    output = folder / CHECKPOINT_NAME

    def on_step(step: LayerStep) -> None:
        progress(f"{step.stage.replace('_', ' ')} (layer-wise, {step.seconds:.1f} s/layer, "
                 f"{step.memory_bytes / 2**30:.1f} GiB in use)", step.index + 1, step.total)

    try:
        remove_old_runs(folder.parent)
        result = run_layerwise(config, output, importance=importance, on_step=on_step)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)  # nothing in it anyone can use
        lock.release()
        raise
    text_after = (f"(pruned layer by layer into {output}; not loaded beside the base model — "
                  "save it on Export and load it with load_pruned to generate)")
    run = PruneRun(config, result.report, result.plan, None, copy.deepcopy(tokenizer), prompt,
                   text_before, text_after, time.perf_counter() - start,
                   split=plan_split(result.plan, costs), checkpoint=output)
    weakref.finalize(run, lock.release)  # the folder stays in use while the run lives
    return run


def _new_run_folder(root: Path) -> tuple[Path, RunLock]:
    """Create a run folder of this job's own (never one that exists) and lock it."""
    root.mkdir(parents=True, exist_ok=True)
    for _ in range(100):
        folder = root / f"{RUN_PREFIX}{datetime.now():%Y%m%d-%H%M%S-%f}"
        try:
            folder.mkdir()
        except FileExistsError:
            continue  # another job started in the same microsecond
        return folder, lock_run_dir(folder)
    raise FileExistsError(f"could not create a new run folder under {str(root)!r}")


def remove_old_runs(root: Path, keep: int = KEEP_APP_RUNS) -> list[Path]:
    """Delete the run folders under ``root`` older than the ``keep`` newest whose lock no live
    process holds (see the module docstring), and the staging leftovers of killed jobs.

    Never raises for a folder it cannot judge or delete (permissions, a race with another
    clean-up): that folder is logged and left. Returns the folders deleted.

    Raises:
        ValueError: ``keep < 1``: the newest folder may be a job's that has not locked it yet.
    """
    from gqaprune_core.export.staging import remove_stale

    if keep < 1:
        raise ValueError(f"keep must be >= 1 (the newest run folder may be one just created "
                         f"and not locked yet), got {keep}")
    try:
        folders = sorted(path for path in root.glob(f"{RUN_PREFIX}*")
                         if path.is_dir() and not path.is_symlink())
        # Partial checkpoints that killed jobs of earlier versions staged beside their run
        # folder, removed when their owner is gone (export.staging's rule). Jobs now stage
        # inside their own locked folder.
        for staging in root.glob(f".{RUN_PREFIX}*.saving-*"):
            remove_stale(root / staging.name[1:].rsplit(".saving-", 1)[0])
    except OSError as err:
        log.warning("could not clean up old app runs under %s: %s", root, err)
        return []
    return [folder for folder in folders[:-keep] if _remove_unless_in_use(folder)]


def _remove_unless_in_use(folder: Path) -> bool:
    """Delete ``folder`` while holding its lock; False when it is in use or cannot go."""
    try:
        lock = lock_run_dir(folder)
    except RunBusyError:
        return False  # a job writes it or a live run points at it
    except OSError as err:
        log.warning("could not lock old app run %s to remove it: %s", folder, err)
        return False
    with lock:  # nobody can take it while we delete: its creator has let it go for good
        try:
            shutil.rmtree(folder)
        except OSError as err:
            log.warning("could not remove old app run %s: %s", folder, err)
            return False
    return True


def copy_checkpoint(source: Path, target: Path) -> None:
    """Copy a finished checkpoint folder under one rename: never a half-copied model."""
    staging = target.with_name(f".{target.name}.copying-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(source, staging)
    os.replace(staging, target)
