"""Runs train_cuhkpedes.py in a subprocess with a fault hook, for tests/test_faults.py.

    python tests/fault_runner.py --stall-save N [train_cuhkpedes.py arguments ...]

``--stall-save N``: the N-th torch.save writes its file and then hangs (the test kills the process mid-save,
while the temporary file exists). The exit status is the script's own.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    argv = sys.argv[1:]
    stall_at = 0
    if argv[:1] == ["--stall-save"]:
        stall_at, argv = int(argv[1]), argv[2:]
    import torch

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
    return exit_status(train_cuhkpedes.main(argv))


if __name__ == "__main__":
    raise SystemExit(main())
