"""DataLoader workers that never outlive the loop that reads them.

Workers ignore SIGTERM/SIGINT (see :func:`datasets.build.worker_init`): a signal to the whole process group must
reach the main process alone, which saves and stops. :func:`start_workers` forks them with both signals blocked,
so that one sent before their worker_init has run waits for it (and is then discarded) instead of killing them.
The price is that ``Process.terminate()`` (a SIGTERM) no longer ends a worker, and Python's exit handler
terminates and then joins every daemonic child: after an exception that left a worker running, the process would
never exit. Two guards prevent that:

* :func:`closing_workers` iterates a loader and shuts its workers down when the loop ends, however it ends (an
  exception raised in a worker included), with SIGKILL for a worker that does not stop within seconds;
* :func:`kill_leftover_children`, registered at import, SIGKILLs any child still alive when the interpreter exits,
  before multiprocessing's own handler would wait for it.

A :class:`~utils.errors.UserError` raised in a worker reaches the main process re-raised by the DataLoader with
the worker's whole traceback as its message; :func:`closing_workers` gives it back its own message, so it prints
as one line.
"""
from __future__ import annotations

import atexit
import contextlib
import multiprocessing
import multiprocessing.util  # registers multiprocessing's exit handler now, before ours
import signal
from pathlib import Path
from typing import Any, Iterable, Iterator

from utils.errors import UserError

_JOIN_SECONDS = 5.0  # a worker asked to stop gets this long before SIGKILL


def worker_message(exc: BaseException) -> str:
    """The message the worker's exception had, out of the DataLoader's "Caught X in DataLoader worker" text."""
    text = str(exc)
    if "Original Traceback" not in text:
        return text
    kind = type(exc)
    name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    at = text.rfind(f"\n{name}: ")
    if at < 0:
        return text.strip().splitlines()[-1]
    return text[at + len(name) + 3:].strip()


def shutdown_workers(iterator: Any) -> None:
    """Stop the worker processes of a DataLoader iterator (a no-op without workers or when already stopped)."""
    workers = list(getattr(iterator, "_workers", ()))
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()  # the sentinel each worker exits on, then terminate(), which ours ignore
    for worker in workers:
        if worker.is_alive():
            worker.kill()
            worker.join(_JOIN_SECONDS)


_PROC_STATES = {"T": "stopped (SIGSTOP, or a debugger)", "t": "stopped by a debugger",
                "D": "blocked in an uninterruptible read (a hung disk or network filesystem)"}


def worker_states(iterator: Any) -> list[tuple[int, int | None, str | None]]:
    """(worker id, pid, trouble) for each worker process of a DataLoader iterator; trouble is None for a worker
    that is alive and running, else what is wrong ("killed by SIGKILL", "stopped ...", "exited with status 3")."""
    states = []
    for number, worker in enumerate(getattr(iterator, "_workers", ())):
        code, trouble = worker.exitcode, None
        if code is not None and code < 0:
            trouble = f"killed by {signal.Signals(-code).name}"
        elif code is not None:
            trouble = f"exited with status {code}"
        else:
            try:  # field 3 of /proc/<pid>/stat, after the parenthesised command name
                state = Path(f"/proc/{worker.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                state = ""
            trouble = _PROC_STATES.get(state)
        states.append((number, worker.pid, trouble))
    return states


def _unwrapped(iterator: Iterator) -> Iterator:
    while True:
        try:
            item = next(iterator)
        except StopIteration:
            return
        except UserError as exc:
            if "Original Traceback" not in str(exc):  # raised here (no workers): as it is
                raise
            raise type(exc)(worker_message(exc)) from None
        yield item


def start_workers(loader: Iterable) -> Iterator:
    """``iter(loader)`` with SIGTERM and SIGINT blocked in this thread while it forks the loader's workers.

    A child inherits the blocked mask: a signal to the process group in the instant between a worker's fork and its
    worker_init would otherwise kill it, and the main process would fail on that death instead of saving. The main
    process receives its own copy once the mask is restored (or at once in another of its threads).
    """
    if not hasattr(signal, "pthread_sigmask"):  # Windows: no signal masks (and no fork)
        return iter(loader)
    blocked = {signal.SIGTERM, signal.SIGINT}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
    try:
        return iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@contextlib.contextmanager
def closing_workers(iterator: Iterator) -> Iterator[Iterator]:
    """Iterate ``iterator`` (a DataLoader's, from :func:`start_workers`) and shut its workers down when the block
    ends.

    A UserError raised in a worker is re-raised with its own one-line message.
    """
    try:
        yield _unwrapped(iterator)
    finally:
        shutdown_workers(iterator)


def kill_leftover_children() -> None:
    """SIGKILL daemonic children still alive at exit (workers deaf to the SIGTERM multiprocessing would send).

    multiprocessing ends daemonic children at exit anyway; non-daemonic ones are left to its handler, which waits.
    """
    for child in multiprocessing.active_children():
        if not child.daemon:
            continue
        child.kill()
        child.join(_JOIN_SECONDS)


# atexit runs handlers last-registered first: this one runs before multiprocessing's (registered on its import,
# which the imports above have done), so no exit waits on a worker that ignores SIGTERM.
atexit.register(kill_leftover_children)
