"""One run per run folder: an exclusive ``flock`` on ``<folder>/run.lock`` while a run writes there.

A second process that would take the same folder (a double-submitted job, a ``--resume auto`` started while the
first run still saves) gets one clear line instead of deleting the first run's in-flight files. The kernel drops
the lock when its process ends, however it ends (kill -9 included), so a lock file left behind is never stale: the
file stays, only a live process holds the lock. Linux NFS clients map ``flock`` onto POSIX locks, which the
server sees from every node.
"""
from __future__ import annotations

import fcntl
import logging
import os
import socket
import time
from pathlib import Path

from utils.errors import UserError

LOCK_NAME = "run.lock"
# What a run writes into its folder: what --overwrite sets aside (never deletes) before a new run starts there.
RUN_OUTPUTS = ("config.yaml", "log.txt", "metrics.jsonl", "last.pth", "best.pth", "metrics_*.json", "tb", "tokenizer",
               "examples*")
REPLACED_DIR = "replaced"  # <run folder>/replaced/<UTC time>/ holds each set-aside run
# Loader workers are forked, so they share the lock's open file: after a kill -9 of the run they hold it until
# they notice their parent is gone. While the process named in the lock file is dead, wait this long for them.
ORPHAN_GRACE_SECONDS = 20.0

logger = logging.getLogger(__name__)


class RunFolderBusyError(UserError, RuntimeError):
    """Another live process holds the run folder."""


class RunFolderLock:
    """``acquire()`` takes the folder (creating it); ``release()`` or leaving the ``with`` block gives it back."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self._fd: int | None = None

    def acquire(self) -> None:
        if self._fd is not None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            lock_unless_live(fd, fcntl.LOCK_EX)
        except BlockingIOError:
            holder = " ".join(os.pread(fd, 1000, 0).decode(errors="replace").split()) or "another process"
            os.close(fd)
            raise RunFolderBusyError(
                f"{self.folder} is in use by {holder}: two runs in one folder would destroy each other's files; "
                "wait for that run to end (or stop it), or choose another --output-dir") from None
        except OSError as exc:  # a filesystem without locks: run unguarded rather than not at all
            logger.warning("%s: cannot lock the run folder (%s); make sure no other run uses it", self.folder, exc)
        note = f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
        try:  # who holds it, for the message of the next process; a full disk must not stop the run here
            os.ftruncate(fd, 0)
            os.pwrite(fd, note.encode(), 0)
        except OSError:
            pass
        self._fd = fd

    def holder(self) -> str | None:
        """Who holds the folder (the lock file's note) while a live process does; None when free or never taken.
        Creates nothing."""
        try:
            fd = os.open(self.folder / LOCK_NAME, os.O_RDONLY)
        except OSError:
            return None
        try:
            lock_unless_live(fd, fcntl.LOCK_SH)
        except BlockingIOError:
            return " ".join(os.pread(fd, 1000, 0).decode(errors="replace").split()) or "another process"
        except OSError:
            return None
        finally:
            os.close(fd)  # also drops the shared lock just taken
        return None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the file releases the lock
            self._fd = None

    def __enter__(self) -> "RunFolderLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def holder_is_dead(note: str) -> bool:
    """Whether the lock note ("pid N on HOST since ...") names a process of this host that no longer exists."""
    words = note.split()
    if len(words) < 4 or words[0] != "pid" or not words[1].isdigit() or words[3] != socket.gethostname():
        return False
    try:
        os.kill(int(words[1]), 0)
    except ProcessLookupError:
        return True
    except OSError:  # exists, owned by someone else
        return False
    return False


def lock_unless_live(fd: int, mode: int) -> None:
    """flock ``mode`` without blocking; BlockingIOError when a live run holds it. When the process named in the lock
    file is dead, its loader workers still hold the shared descriptor for a moment: wait for them to end (up to
    ORPHAN_GRACE_SECONDS)."""
    deadline = time.monotonic() + ORPHAN_GRACE_SECONDS
    while True:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            note = os.pread(fd, 1000, 0).decode(errors="replace")
            if time.monotonic() > deadline or not holder_is_dead(note):
                raise
            time.sleep(0.2)


def set_aside_previous_run(folder: str | Path) -> Path | None:
    """Move a previous run's outputs (``RUN_OUTPUTS``) out of ``folder`` into ``folder/replaced/<UTC time>/``, so a
    new run there starts every record file afresh and nothing of the old run is lost; returns that folder, or None
    when there was nothing to move. Call it holding the folder's lock."""
    folder = Path(folder)
    found = sorted({path for pattern in RUN_OUTPUTS for path in folder.glob(pattern)})
    if not found:
        return None
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target, number = folder / REPLACED_DIR / stamp, 1
    while target.exists():
        target, number = folder / REPLACED_DIR / f"{stamp}-{number}", number + 1
    target.mkdir(parents=True)
    for path in found:
        path.rename(target / path.name)
    return target
