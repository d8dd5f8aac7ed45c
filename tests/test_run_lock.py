"""The run folder's lock (utils/run_lock.py) with real processes: a live holder is refused at once, and a killed
run's loader workers (forked children that share the lock's descriptor) are waited for instead of being taken for
a run that is still going."""
from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import pytest

from utils.run_lock import RunFolderBusyError, RunFolderLock

# Takes the lock, forks a child that keeps the shared descriptor for CHILD_SECONDS (as a loader worker does), and
# ends at once without releasing anything (as a kill -9 would leave it); the child then exits on its own.
ORPHANING_RUN = textwrap.dedent("""
    import os, sys, time
    from utils.run_lock import RunFolderLock
    RunFolderLock(sys.argv[1]).acquire()
    if os.fork() == 0:
        time.sleep(float(sys.argv[2]))
        os._exit(0)
    print("locked", flush=True)
    os._exit(0)
""")
LIVE_RUN = textwrap.dedent("""
    import sys, time
    from utils.run_lock import RunFolderLock
    RunFolderLock(sys.argv[1]).acquire()
    print("locked", flush=True)
    time.sleep(60)
""")


def start(script: str, *args: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", script, *args], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_the_workers_of_a_dead_run_are_waited_for(tmp_path):
    child_seconds = 2.0
    proc = start(ORPHANING_RUN, str(tmp_path), str(child_seconds))
    proc.wait(timeout=30)
    began = time.monotonic()
    lock = RunFolderLock(tmp_path)
    assert lock.holder() is None  # waits for the child, then finds the folder free
    lock.acquire()
    lock.release()
    assert 0.5 < time.monotonic() - began < child_seconds + 10  # it did wait, and only about as long as the child


def test_a_live_run_is_refused_at_once(tmp_path):
    proc = start(LIVE_RUN, str(tmp_path))
    try:
        began = time.monotonic()
        assert f"pid {proc.pid} on" in RunFolderLock(tmp_path).holder()
        with pytest.raises(RunFolderBusyError, match=f"is in use by pid {proc.pid} on"):
            RunFolderLock(tmp_path).acquire()
        assert time.monotonic() - began < 5
    finally:
        proc.kill()
        proc.wait()
