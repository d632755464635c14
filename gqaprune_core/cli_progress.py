"""What the CLI shows while it runs: tqdm bars per stage on stderr (with per-layer seconds and
memory beside the layer-wise stages), and transformers' own bars hidden under ``--quiet``."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager


class ProgressBars:
    """tqdm bars on stderr: one per stage, a new one when a stage restarts (next corpus)."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.bar = None
        self.stage = ""
        self.postfix = ""

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        if self.bar is None or stage != self.stage or total != self.bar.total or done < self.bar.n:
            from tqdm import tqdm

            self.close()
            self.bar = tqdm(total=total, desc=stage.replace("_", " "), file=sys.stderr,
                            dynamic_ncols=True)
            self.stage = stage
        if self.postfix:
            self.bar.set_postfix_str(self.postfix, refresh=False)
            self.postfix = ""
        self.bar.update(done - self.bar.n)
        if done >= total:
            self.close()

    def step(self, event) -> None:
        """A layer-wise stage finished a layer (a LayerStep; called before the bar moves):
        its seconds and the memory in use go beside the bar."""
        self.postfix = (f"layer {event.index + 1}/{event.total}, {event.seconds:.2f} s/layer, "
                        f"{event.memory_bytes / 2**30:.2f} GiB")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


@contextmanager
def library_progress(enabled: bool) -> Iterator[None]:
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
