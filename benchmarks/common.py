"""Shared helpers of the benchmark scripts: machine description, timing, peak memory, JSON.

The scripts run as ``python benchmarks/quality.py`` from the repository root, so this module is
imported as ``common`` (the script's folder is on ``sys.path``) or as ``benchmarks.common`` by
the tests.
"""

from __future__ import annotations

import datetime
import gc
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from gqaprune_core import self_text
from gqaprune_core.outputs import write_text_atomic

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"


def set_threads(threads: int | None = None) -> int:
    """Use ``threads`` CPU threads (default: all cores) and return the number set."""
    count = threads or os.cpu_count() or 1
    torch.set_num_threads(count)
    return count


def machine() -> dict:
    """Where and with what a benchmark ran (for the JSON header)."""
    import transformers

    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


def code_version() -> dict | None:
    """The commit the benchmark ran from and whether tracked files differed from it (a number
    measured from uncommitted code says so); None outside a git checkout."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                              check=True, timeout=30).stdout.strip()
    try:
        return {"commit": git("rev-parse", "HEAD"),
                "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return None


def self_text_settings() -> dict:
    """How the self-written windows are written now (module constants, not config fields)."""
    return {"prompt_tokens": self_text.PROMPT_TOKENS, "top_p": self_text.TOP_P,
            "temperature": self_text.TEMPERATURE}


def header(argv: list[str] | None = None) -> dict:
    """Date, machine, code version and the exact command, the first keys of every results
    file."""
    argv = sys.argv if argv is None else argv
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": "python " + shlex.join(argv),
        "machine": machine(),
        "code": code_version(),
    }


def write_json(path: str | os.PathLike, data: dict) -> Path:
    """Write ``data`` atomically (temporary file, then rename), so a crash mid-run leaves the
    previous complete file. Returns the path."""
    return write_text_atomic(Path(path), json.dumps(data, indent=1) + "\n")


def read_json(path: str | os.PathLike) -> dict | None:
    path = Path(path)
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def same_settings(previous: dict | None, settings: dict) -> bool:
    """Whether a results file read back from disk was made with ``settings``: compared as JSON
    (tuples come back as lists), so that a resumed run keeps the earlier results."""
    return (previous or {}).get("settings") == json.loads(json.dumps(settings))


def rss_bytes() -> int:
    """Resident set size of this process now."""
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:  # Linux fallback: /proc/self/statm holds pages
        with open("/proc/self/statm") as file:
            return int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Peak resident memory while the block runs, sampled by a thread every ``interval`` s.

    ``ru_maxrss`` is a lifetime peak of the whole process, useless for one method among many,
    so a sampler is used instead; it can miss a spike shorter than the interval. Attributes
    after the block: ``before``, ``peak`` and ``delta`` (peak - before), in bytes. With
    ``collect``, garbage is collected first so that ``before`` holds no dead objects (it takes
    a second or more with transformers loaded, so it is off by default).
    """

    def __init__(self, interval: float = 0.02, collect: bool = False):
        self.interval = interval
        self.collect = collect
        self.before = self.peak = self.delta = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, rss_bytes())

    def __enter__(self) -> PeakRSS:
        if self.collect:
            gc.collect()
        self.before = self.peak = rss_bytes()
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())
        self.delta = self.peak - self.before


class Timer:
    """Wall time of a block in seconds (``.seconds``); synchronises CUDA first if in use."""

    def __init__(self, cuda: bool = False):
        self.cuda = cuda
        self.seconds = 0.0

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def __enter__(self) -> Timer:
        self._sync()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self._sync()
        self.seconds = time.perf_counter() - self.start


@contextmanager
def temporary_cache() -> Iterator[Path]:
    """Point ``GQAPRUNE_CACHE`` at an empty folder for the block, so that layer importance is
    computed, not read from an earlier run's cache."""
    old = os.environ.get("GQAPRUNE_CACHE")
    with tempfile.TemporaryDirectory(prefix="gqaprune-bench-") as folder:
        os.environ["GQAPRUNE_CACHE"] = folder
        try:
            yield Path(folder)
        finally:
            if old is None:
                os.environ.pop("GQAPRUNE_CACHE", None)
            else:
                os.environ["GQAPRUNE_CACHE"] = old


def default_preset():
    """``(config, source)``: gqaprune's recommended settings, or a stand-in (one-shot Taylor with
    the original's other settings) while ``PRESETS`` has no ``"default"`` yet."""
    from gqaprune_core.config import PRESETS, PruneConfig

    if "default" in PRESETS:
        return PRESETS["default"], "PRESETS['default']"
    return PruneConfig(mode="one-shot"), "stand-in PruneConfig(mode='one-shot'): no 'default' preset"


def mib(value: int) -> float:
    return round(value / 2**20, 1)


def log(message: str) -> None:
    stamp = time.strftime("%H:%M:%S")
    print(f"[{stamp}] {message}", flush=True)
