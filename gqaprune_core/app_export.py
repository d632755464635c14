"""The app's Export actions: save a run like the CLI does, or write it as a GGUF file.

Both write under ``prune_log/NAME/`` (``run_paths`` checks the name) and never touch the run:
a run pruned in memory is saved from its model, a layer-wise one by copying its checkpoint
folder (:func:`gqaprune_core.app_layerwise.copy_checkpoint`).
"""

from __future__ import annotations

import os
import re
from datetime import datetime
from pathlib import Path

from gqaprune_core.app_layerwise import copy_checkpoint
from gqaprune_core.app_support import PruneRun

GGUF_OUT_TYPES = ("q8_0", "f16", "q4_k_m", "bf16", "f32")  # the page's order: a sane default first


def run_directory_name(run: PruneRun, now: datetime | None = None) -> str:
    """A plain directory name such as ``app-demo-20pct-20250101-120000``."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(str(run.config.base_model)).name).strip("-.")
    stamp = (now or datetime.now()).strftime("%Y%m%d-%H%M%S")
    return f"app-{stem or 'model'}-{round(100 * run.config.pruning_ratio)}pct-{stamp}"


def save_run(run: PruneRun, name: str, output_dir: str | os.PathLike = "prune_log") -> Path:
    """Write ``OUTPUT_DIR/NAME/model/`` (checkpoint) and ``report.json``, like the CLI.

    The directory is locked while it is written (:mod:`gqaprune_core.runlock`), so two
    sessions, or a session and a command-line run, saving under one name never mix files.

    Raises:
        ValueError: a bad name, an existing non-empty target, a directory another save or run
            holds (``RunBusyError``), or a run without its model.
    """
    from gqaprune_core.checkpoint import save_pruned
    from gqaprune_core.export.model_card import CardInfo
    from gqaprune_core.outputs import MODEL_DIR_NAME, REPORT_NAME, run_paths, write_json_atomic
    from gqaprune_core.runlock import lock_run_dir

    if run.model is None and run.checkpoint is None:
        raise ValueError(f"run {run.number}'s model is no longer in memory; run it again to save it")
    paths = run_paths(output_dir, name.strip(), "app")
    card = CardInfo(base_model=run.config.base_model, settings=run.config.to_dict(),
                    report=run.report)  # the app has no command line to show
    with lock_run_dir(paths.root):
        if (paths.root / REPORT_NAME).exists() or (paths.root / MODEL_DIR_NAME).exists():
            raise ValueError(f"{str(paths.root)!r} already holds a saved run; choose another name")
        if run.model is None:  # a layer-wise run: its checkpoint is on disk already
            copy_checkpoint(run.checkpoint, paths.model)
        else:
            save_pruned(run.model, run.tokenizer, run.plan, paths.model, card=card)
        write_json_atomic(paths.report, run.report)
    return paths.root


def export_run_gguf(run: PruneRun, name: str, outtype: str,
                    output_dir: str | os.PathLike = "prune_log") -> Path:
    """Write ``OUTPUT_DIR/NAME/model-OUTTYPE.gguf`` for llama.cpp / ollama (see export.gguf).

    Raises:
        ValueError: a bad name, a run without its model, an existing file, or a model or
            tokenizer that GGUF cannot hold (GgufExportError, TokenizerConversionError).
    """
    from gqaprune_core.export.gguf import write_gguf
    from gqaprune_core.outputs import run_paths

    if run.model is None:
        raise ValueError(f"run {run.number}'s model is no longer in memory; run it again to "
                         "export it")
    target = run_paths(output_dir, name.strip(), "app").root / f"model-{outtype}.gguf"
    return write_gguf(run.model, run.tokenizer, target, outtype,
                      name=f"{Path(str(run.config.base_model)).name} pruned "
                           f"{run.config.pruning_ratio:.0%} (gqaprune)").path
