"""One run per folder: ``lock_run_dir(out)`` holds ``out/.run.lock`` for the rest of the process's life (or until
``release_run_dir(out)``), so a second run started into the same folder refuses, naming the holder, instead of
both writing checkpoints over each other.

The lock is an ``flock`` on the file, which the kernel drops when the holder dies (``kill -9``, a crash, a
lost node): a lock file whose holder is gone is stale and is taken over with a warning naming the dead pid. The
file records the holder (pid, host, start time, command) for that message. ``flock`` may not reach across the
machines of a network file system, so a record written on another host is refused: only that host can tell
whether its pid is alive (the message says which file to remove once it is not).
"""

from __future__ import annotations

import atexit
import fcntl
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

logger = logging.getLogger(__name__)

LOCK_FILE = ".run.lock"
# resolved lock path -> (open descriptor holding the flock, inode of the locked file)
_HELD: dict[Path, tuple[int, int]] = {}


class RunLocked(FileExistsError):
    """Another live run holds the folder's lock."""


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (a process of another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _holder(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 65536).decode("utf-8", "replace")
    try:
        record = json.loads(text) if text.strip() else {}
    except json.JSONDecodeError:
        record = {}
    return record if isinstance(record, dict) else {}


def _describe(holder: dict) -> str:
    return (
        f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} (started {holder.get('started', '?')}: "
        f"{holder.get('command', '?')})"
    )


def lock_run_dir(out: str | Path) -> bool:
    """Take ``out``'s run lock (creating the folder) and hold it until ``release_run_dir`` or process exit. Returns
    True when taken now, False when this process already held it. Raises ``RunLocked``, naming the holder, when a
    live run holds it."""
    out = Path(out)
    path = out / LOCK_FILE
    out.mkdir(parents=True, exist_ok=True)
    key = path.resolve()
    if key in _HELD:
        fd, inode = _HELD[key]
        if path.exists() and path.stat().st_ino == inode:
            return False
        os.close(fd)  # the folder was cleared under the lock: take a new one
        del _HELD[key]
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise RunLocked(
                f"{out} is in use by another run: {_describe(holder)}. Wait for it to finish, stop it, or use another "
                f"output folder (two runs into one folder would overwrite each other's checkpoints)."
            ) from None
        # a holder releasing it unlinks the file: a lock on an unlinked (or replaced) file guards nothing
        if not path.exists() or path.stat().st_ino != os.fstat(fd).st_ino:
            os.close(fd)
            continue
        break
    holder, host = _holder(fd), socket.gethostname()
    if holder and holder.get("host") not in (None, host):
        os.close(fd)
        raise RunLocked(
            f"{out} is locked by a run on another machine: {_describe(holder)}; this host ({host}) cannot tell whether "
            f"it is still running. Once it is not, remove {path} and rerun."
        )
    if holder:
        logger.warning("%s: taking over a stale lock of %s: that process is gone", out, _describe(holder))
    record = {
        "pid": os.getpid(),
        "host": host,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join(sys.argv),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
    _HELD[key] = (fd, os.fstat(fd).st_ino)
    return True


def release_run_dir(out: str | Path) -> None:
    """Give up ``out``'s run lock if this process holds it (the file is removed: no stale record is left)."""
    path = Path(out) / LOCK_FILE
    key = path.resolve()
    held = _HELD.pop(key, None)
    if held is None:
        return
    fd, inode = held
    try:
        if path.exists() and path.stat().st_ino == inode:
            path.unlink()
    finally:
        os.close(fd)


@atexit.register
def _release_all() -> None:
    for key in list(_HELD):
        release_run_dir(key.parent)
