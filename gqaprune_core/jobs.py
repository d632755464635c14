"""Background jobs for the app: a worker thread per job, plain state the UI polls.

A Streamlit script reruns top to bottom on every click, so long work (layer scores, pruning)
runs in a thread registered here under (owner, name); a rerun or a page change finds the job
again and shows its progress or result. Nothing here imports streamlit.
"""

from __future__ import annotations

import os
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Job:
    """Plain state a worker thread writes and the UI polls."""

    name: str
    status: str = "running"  # running | done | error
    stage: str = "starting"
    done: int = 0
    total: int = 0
    result: Any = None
    error: str = ""
    details: str = ""
    started: float = field(default_factory=time.time)
    finished: float | None = None

    def progress(self, stage: str, done: int, total: int) -> None:
        self.stage, self.done, self.total = stage, done, total

    @property
    def running(self) -> bool:
        return self.status == "running"

    @property
    def fraction(self) -> float:
        return min(1.0, self.done / self.total) if self.total else 0.0

    @property
    def elapsed(self) -> float:
        return (self.finished or time.time()) - self.started


class JobRegistry:
    """Jobs keyed by (owner, name), one running per key; they outlive page changes and reruns.

    ``synchronous`` (or ``GQAPRUNE_APP_SYNC_JOBS=1``) runs work inside :meth:`submit`, for tests.
    """

    def __init__(self, synchronous: bool | None = None, keep_seconds: float = 3600.0):
        if synchronous is None:
            synchronous = os.environ.get("GQAPRUNE_APP_SYNC_JOBS", "") not in ("", "0")
        self.synchronous = synchronous
        self.keep_seconds = keep_seconds
        self._jobs: dict[tuple[str, str], Job] = {}
        self._lock = threading.Lock()

    def submit(self, owner: str, name: str, work: Callable[[Job], Any]) -> Job:
        """Start ``work(job)``; its return value becomes ``job.result``.

        Raises:
            RuntimeError: a job of that name is still running for this owner.
        """
        with self._lock:
            self._forget_stale()
            current = self._jobs.get((owner, name))
            if current is not None and current.running:
                raise RuntimeError(f"a {name} job is already running (stage {current.stage})")
            job = self._jobs[(owner, name)] = Job(name)
        if self.synchronous:
            self._run(job, work)
        else:
            threading.Thread(target=self._run, args=(job, work), daemon=True,
                             name=f"gqaprune-{name}").start()
        return job

    @staticmethod
    def _run(job: Job, work: Callable[[Job], Any]) -> None:
        try:
            job.result = work(job)
            job.status = "done"
        except Exception as err:  # the worker's boundary: every failure must reach the UI
            job.error = f"{type(err).__name__}: {err}"
            job.details = traceback.format_exc()
            job.status = "error"
        finally:
            job.finished = time.time()

    def get(self, owner: str, name: str) -> Job | None:
        return self._jobs.get((owner, name))

    def pop(self, owner: str, name: str) -> Job | None:
        """Remove and return a finished job (None if absent or still running)."""
        with self._lock:
            job = self._jobs.get((owner, name))
            if job is None or job.running:
                return None
            return self._jobs.pop((owner, name))

    def _forget_stale(self) -> None:
        now = time.time()
        for key, job in list(self._jobs.items()):
            if job.finished is not None and now - job.finished > self.keep_seconds:
                del self._jobs[key]


JOBS = JobRegistry()
