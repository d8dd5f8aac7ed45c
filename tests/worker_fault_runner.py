"""Runs train_cuhkpedes.py in a subprocess whose loader worker receives a real signal, for tests/test_faults_round3.py.

    python tests/worker_fault_runner.py --worker-signal STOP|KILL N [train_cuhkpedes.py arguments ...]

The first loader worker to load its N-th item sends itself SIGSTOP (a read stuck on a hung filesystem) or SIGKILL
(what the kernel's out-of-memory killer sends), once per run; it prints ``signalling worker pid P`` first. The
exit status is the script's own.
"""
from __future__ import annotations

import os
import signal
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    argv = sys.argv[1:]
    assert argv[:1] == ["--worker-signal"], __doc__
    signum, at, argv = getattr(signal, f"SIG{argv[1]}"), int(argv[2]), argv[3:]
    import train_cuhkpedes
    from datasets.train_data import TrainDataset
    from engine.cli import exit_status

    real_getitem, loaded = TrainDataset.__getitem__, {"n": 0}
    once = Path(tempfile.mkdtemp()) / "signalled"

    def getitem(self, index):
        loaded["n"] += 1  # per process: each worker counts its own items
        if loaded["n"] == at and os.getpid() != main_pid:
            try:
                os.close(os.open(once, os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                return real_getitem(self, index)
            print(f"signalling worker pid {os.getpid()}", flush=True)
            os.kill(os.getpid(), signum)
        return real_getitem(self, index)

    main_pid = os.getpid()
    TrainDataset.__getitem__ = getitem
    return exit_status(train_cuhkpedes.main(argv))


if __name__ == "__main__":
    raise SystemExit(main())
