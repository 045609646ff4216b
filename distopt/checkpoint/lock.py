"""One job per checkpoint folder: a lock that the job's rank 0 holds for as long as it has a manager on the folder.

Two jobs writing into one folder would delete each other's partial saves and prune each other's checkpoints. The
lock is an ``flock`` on ``<root>/.lock`` (the kernel drops it when the process dies, so a killed job never leaves a
stale lock), and the file says who holds it, for the message the second job gets. Several managers of one process
on one folder share the lock.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
import warnings
from pathlib import Path

from .directory import CheckpointError

LOCK_FILE = ".lock"
_held: dict[Path, list] = {}  # resolved root -> [file object, how many managers of this process use it]


class FolderInUse(CheckpointError):
    """Another job holds the checkpoint folder."""


def acquire(root: Path) -> None:
    """Hold ``root`` for this process, or raise :class:`FolderInUse` naming the job that holds it. Where the folder
    cannot be locked (read-only, or a file system without ``flock``), warn and go on without the guard: reading
    such a folder is still useful."""
    key = root.resolve()
    if key in _held:
        _held[key][1] += 1
        return
    try:
        stream = open(key / LOCK_FILE, "a+")
    except OSError as error:
        warnings.warn(f"cannot lock checkpoint folder {root} ({error.strerror}); continuing without the guard "
                      "against a second job in the same folder", RuntimeWarning)
        return
    try:
        fcntl.flock(stream, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        if not isinstance(error, BlockingIOError):
            stream.close()
            warnings.warn(f"cannot lock checkpoint folder {root} ({error.strerror}); continuing without the guard "
                          "against a second job in the same folder", RuntimeWarning)
            return
        stream.seek(0)
        holder = stream.read().strip() or "an unknown process"
        stream.close()
        raise FolderInUse(f"checkpoint folder {root} is in use by another job ({holder}); two jobs in one folder "
                          "would delete each other's checkpoints. Give this job its own folder, or stop the other "
                          "job first") from None
    stream.seek(0)
    stream.truncate()
    stream.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "since": time.strftime("%Y-%m-%d %H:%M:%S")}))
    stream.flush()
    _held[key] = [stream, 1]


def release(root: Path) -> None:
    key = root.resolve()
    entry = _held.get(key)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] == 0:
        del _held[key]
        entry[0].close()  # closing drops the flock
