"""One run at a time per run directory: an exclusive, non-blocking ``flock`` on a lock file.

Two CLI runs given the same ``--save_ckpt_log_name`` would otherwise interleave their files
(description from one, model from the other) or delete each other's outputs under
``--overwrite``. The first run to lock ``OUTPUT_DIR/NAME/.gqaprune.lock`` owns the directory
until it ends; any other run fails at once with :class:`RunBusyError`, before it deletes,
writes or renames anything in that directory (opening the lock file is all it does there).

The lock is held by an open file descriptor, so the kernel releases it when the process dies,
however it dies (SIGKILL included): there is never a stale lock to clean up. The holder writes
its pid into the file for the message, and removes the file when it is done; a run that locked
a file just as its holder removed it notices (the path no longer names the locked inode) and
locks the new file instead.
"""

from __future__ import annotations

import errno
import fcntl
import os
from dataclasses import dataclass
from pathlib import Path

LOCK_NAME = ".gqaprune.lock"


class RunBusyError(ValueError):
    """Another live process holds the run directory's lock."""


@dataclass
class RunLock:
    """A held lock on one run directory; :meth:`release` (or ``with``) gives it back."""

    path: Path
    fd: int

    def release(self) -> None:
        if self.fd < 0:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still locked: nobody can hold this inode
        finally:
            os.close(self.fd)  # closing drops the flock
            self.fd = -1

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _holder(path: Path) -> str:
    try:
        text = path.read_text(encoding="ascii", errors="replace").strip()
    except OSError:
        return ""
    return f" (pid {text})" if text.isdigit() else ""


def _busy(root: Path, path: Path) -> RunBusyError:
    return RunBusyError(f"run directory {str(root)!r} is in use by another gqaprune run"
                        f"{_holder(path)}; wait for it to finish or choose another "
                        "--save_ckpt_log_name")


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def _same_file(fd: int, path: Path) -> bool:
    try:
        current = path.stat()
    except FileNotFoundError:
        return False
    opened = os.fstat(fd)
    return (opened.st_dev, opened.st_ino) == (current.st_dev, current.st_ino)


def lock_run_dir(root: str | os.PathLike) -> RunLock:
    """Create ``root`` if needed and lock it for this process.

    Raises:
        RunBusyError: another live process holds the lock (its pid named when known).
        OSError: the directory or the lock file cannot be created.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    path = root / LOCK_NAME
    for _ in range(100):  # each retry means the holder just released; never loops for long
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            if not _try_lock(fd):
                raise _busy(root, path)
            if _same_file(fd, path):
                os.ftruncate(fd, 0)
                os.write(fd, str(os.getpid()).encode("ascii"))
                return RunLock(path, fd)
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # we locked a file its holder had just removed: lock the new one
    raise RunBusyError(f"could not lock {str(path)!r}: other runs keep taking it")


def check_not_busy(root: str | os.PathLike) -> None:
    """Fail early, writing nothing, if a live run holds ``root``'s lock right now.

    Only a probe (the lock is taken later by :func:`lock_run_dir`): it lets a second run fail
    before it spends time loading a model. Creates no file or directory.
    """
    root = Path(root)
    path = root / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        if not _try_lock(fd):
            raise _busy(root, path)
    finally:
        os.close(fd)  # also drops a probe lock we might have taken
