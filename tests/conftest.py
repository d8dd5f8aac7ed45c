import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

# Tests never reach a model hub: offline, transformers must fail loudly instead of returning stubs.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(autouse=True)
def restore_logging():
    """Every test leaves logging as the session found it: utils.logging_utils.setup_logging (a run, a command, or a
    module fixture that trains) sets the root level to INFO and adds handlers, which would leak into the next test's
    log capture."""
    yield
    from utils.logging_utils import reset_logging

    reset_logging()


@pytest.fixture
def stop_after_steps(monkeypatch):
    """``stop_after_steps(n)``: the next training run in this test receives SIGTERM once its global step reaches n.

    The signal arrives as an operator's would, inside the step, and is sent once: a resume afterwards runs on.
    """
    from engine import training

    def arm(n: int) -> None:
        real_step, fired = training.optimizer_step, []

        def step(run, batches):
            out = real_step(run, batches)
            if not fired and run.state.global_step + 1 >= n:  # the loop counts this step right after it returns
                fired.append(n)
                signal.raise_signal(signal.SIGTERM)
            return out

        monkeypatch.setattr(training, "optimizer_step", step)

    return arm


@pytest.fixture
def read_only():
    """``read_only(folder)``: the folder becomes a read-only bind mount of itself (root ignores permission bits,
    not a read-only mount); unmounted afterwards. Skips where mounting is not allowed."""
    mounted = []

    def mount(folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        for command in (["mount", "--bind", str(folder), str(folder)],
                        ["mount", "-o", "remount,ro,bind", str(folder)]):
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode:
                if command[1] == "-o":  # the bind mount stands, read-write: take it down
                    subprocess.run(["umount", "-l", str(folder)], check=False)
                pytest.skip(f"cannot make a read-only bind mount here ({done.stderr.strip()}): needs root")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], check=False)
