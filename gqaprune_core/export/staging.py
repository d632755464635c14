"""Write a folder beside its target, then rename it into place: no reader ever sees half of it.

A save goes into a hidden sibling ``.NAME.saving-XXXXXXXX`` of the target ``NAME``; when every
file is written the sibling is renamed to ``NAME`` (a non-empty ``NAME`` is first renamed aside to
``.NAME.old-XXXXXXXX``, then deleted). A failure removes the sibling and leaves ``NAME`` as it was.

A process that is killed (SIGKILL, power loss) cannot clean up, so every sibling records its
owner in ``OWNER_NAME``: pid, host and, on Linux, the process start time (which tells a recycled
pid from the original process). The next save to the same target removes the siblings whose
owner is gone (:func:`remove_stale`); siblings of a live process, of another host or without an
owner file (written by an older version) are left alone.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

OWNER_NAME = ".gqaprune-owner.json"
PURPOSES = ("saving", "old")  # the sibling kinds this module creates


def _start_time(pid: int) -> str | None:
    """The process start time in clock ticks since boot (Linux ``/proc``), else ``None``."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 2 (comm) may hold spaces and parentheses: count fields after its closing ')'.
    return stat.rsplit(")", 1)[1].split()[19]


def owner_record() -> dict:
    """Who is writing: this process's pid, host and start time."""
    return {"pid": os.getpid(), "host": socket.gethostname(), "start": _start_time(os.getpid())}


def owner_is_alive(owner: dict) -> bool:
    """False only when ``owner`` ran on this host and that process no longer exists."""
    if owner.get("host") != socket.gethostname():
        return True  # cannot tell: leave it
    pid = owner.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user
    start = owner.get("start")
    return start is None or _start_time(pid) in (None, start)  # other start time: pid recycled


def new_sibling(target: Path, purpose: str, *, owned: bool = True) -> Path:
    """A new hidden directory next to ``target``, holding only this process's owner record
    (``owned``) or nothing.

    The mode comes from the umask (unlike ``mkdtemp``'s 0700), so the published folder gets the
    permissions of an ordinary directory.
    """
    for _ in range(100):
        path = target.with_name(f".{target.name}.{purpose}-{secrets.token_hex(4)}")
        try:
            path.mkdir()
        except FileExistsError:
            continue
        if owned:
            _claim(path)
        return path
    raise FileExistsError(f"could not create a temporary directory next to {str(target)!r}")


def _claim(path: Path) -> None:
    (path / OWNER_NAME).write_text(json.dumps(owner_record()))


def stale_siblings(target: Path) -> list[Path]:
    """Siblings of ``target`` left by processes of this host that are gone."""
    stale = []
    for purpose in PURPOSES:
        for path in sorted(target.parent.glob(f".{target.name}.{purpose}-*")):
            try:
                owner = json.loads((path / OWNER_NAME).read_text())
            except (OSError, ValueError):
                continue  # no owner file: not ours to judge
            if isinstance(owner, dict) and not owner_is_alive(owner):
                stale.append(path)
    return stale


def remove_stale(target: Path) -> list[Path]:
    """Delete the stale siblings of ``target`` (see the module docstring); returns them."""
    removed = stale_siblings(target)
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def publish(staging: Path, target: Path) -> None:
    """Rename ``staging`` to ``target``; a non-empty ``target`` is swapped out, then deleted.

    The owner file is removed first: it belongs to the staging folder, not to the result.
    """
    (staging / OWNER_NAME).unlink(missing_ok=True)
    if not target.exists() or not any(target.iterdir()):
        os.replace(staging, target)  # rename(2) replaces an empty directory atomically
        return
    aside = new_sibling(target, "old", owned=False)  # empty: rename(2) may replace it
    os.replace(target, aside)
    _claim(aside)  # so that a save killed right here leaves nothing a later save keeps
    try:
        os.replace(staging, target)
    except OSError:
        (aside / OWNER_NAME).unlink(missing_ok=True)
        os.replace(aside, target)  # put the old folder back
        raise
    shutil.rmtree(aside, ignore_errors=True)


@contextmanager
def staged(target: Path) -> Iterator[Path]:
    """``with staged(target) as staging:`` write into ``staging``; published on success.

    Stale siblings of earlier, killed saves to ``target`` are removed first. On any exception
    the staging folder is deleted and ``target`` is unchanged.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(target)
    staging = new_sibling(target, "saving")
    try:
        yield staging
        publish(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already after a successful publish
