"""One path for SIGINT and SIGTERM: the signal becomes an exception, cleanup runs, exit 128+N.

Python turns SIGINT into ``KeyboardInterrupt`` but lets SIGTERM kill the process on the spot,
so ``finally`` blocks never run: a checkpoint save stopped by ``kill`` left its hidden staging
folder and no ``FAILED.txt``. Inside :func:`signals_as_exceptions` both signals raise
:class:`Interrupted` (a ``KeyboardInterrupt``, so code that handles Ctrl-C handles both) in
the main thread at the next bytecode; every ``finally`` and ``except BaseException`` on the
way up runs: the checkpoint's staging folder is removed, the CLI writes ``FAILED.txt`` naming
the signal, and :func:`exit_status` gives the shell convention 130 (SIGINT) / 143 (SIGTERM).

A second signal while that cleanup runs is reported on stderr and otherwise ignored, so it
cannot cut the cleanup short (SIGKILL still ends the process; the stale staging folders it
leaves are removed by the next save into the same directory).
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

HANDLED = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived; ``signum`` says which."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


def exit_status(err: BaseException) -> int:
    """128 + the signal number (130 SIGINT, 143 SIGTERM); 130 for a plain KeyboardInterrupt."""
    return 128 + (err.signum if isinstance(err, Interrupted) else signal.SIGINT)


def describe(err: BaseException) -> str:
    """``interrupted by SIGTERM`` (or ``SIGINT``), for FAILED.txt and the log."""
    return f"interrupted by {err.name}" if isinstance(err, Interrupted) else "interrupted by SIGINT"


@contextmanager
def signals_as_exceptions() -> Iterator[None]:
    """Raise :class:`Interrupted` on SIGINT/SIGTERM inside the block; restore the old handlers.

    Only the main thread can install handlers: elsewhere (the app's worker threads) this is a
    no-op and signals keep their usual meaning.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired: list[int] = []

    def handler(signum: int, frame: FrameType | None) -> None:
        if fired:
            print(f"gqaprune: {signal.Signals(signum).name} again, still cleaning up",
                  file=sys.stderr)
            return
        fired.append(signum)
        raise Interrupted(signum)

    previous = {signum: signal.signal(signum, handler) for signum in HANDLED}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)
