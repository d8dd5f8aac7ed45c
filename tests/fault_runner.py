"""Runs train_cuhkpedes.py in a subprocess with a fault hook, for tests/test_faults.py.

    python tests/fault_runner.py --stall-save N [train_cuhkpedes.py arguments ...]
    python tests/fault_runner.py --term-at-loader-start N [train_cuhkpedes.py arguments ...]

``--stall-save N``: the N-th torch.save writes its file and then hangs (the test kills the process mid-save,
while the temporary file exists).
``--term-at-loader-start N``: the N-th DataLoader iterator's workers wait 2 s before their worker_init (which
makes them ignore SIGTERM), and SIGTERM is sent to them and to this process in that window, as ``scancel`` or
``kill -- -PGID`` can when an epoch starts its workers (it happens by chance otherwise).
The exit status is the script's own.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    argv = sys.argv[1:]
    stall_at = term_at = 0
    if argv[:1] == ["--stall-save"]:
        stall_at, argv = int(argv[1]), argv[2:]
    if argv[:1] == ["--term-at-loader-start"]:
        term_at, argv = int(argv[1]), argv[2:]
    import torch
    from torch.utils.data import DataLoader

    import datasets.build
    import train_cuhkpedes
    from engine.cli import exit_status

    real_save, calls = torch.save, {"n": 0}

    def save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == stall_at:
            print("stalling inside save", flush=True)
            time.sleep(600)

    torch.save = save

    if term_at:
        real_iter, real_init, iterators = DataLoader.__iter__, datasets.build.worker_init, {"n": 0, "slow": False}

        def iterate(loader):
            iterators["n"] += 1
            iterators["slow"] = iterators["n"] == term_at  # forked workers see the value it has now
            batches = real_iter(loader)
            if iterators["slow"]:
                # From another process, as from scancel: a worker quits quietly on its parent's own SIGTERM.
                pids = [str(worker.pid) for worker in batches._workers] + [str(os.getpid())]
                subprocess.run(["kill", "-TERM", *pids], check=True)
                time.sleep(3)  # a worker the signal ended is reported by torch's SIGCHLD handler in the meantime
            return batches

        def worker_init(worker_id):
            if iterators["slow"]:
                time.sleep(2)
            real_init(worker_id)

        DataLoader.__iter__ = iterate
        datasets.build.worker_init = worker_init

    return exit_status(train_cuhkpedes.main(argv))


if __name__ == "__main__":
    raise SystemExit(main())
