"""Run by test_train.py under torchrun: a short training run whose final weights each rank saves."""
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.objectives import RetrievalObjective  # noqa: E402
from engine.cli import train_main  # noqa: E402

first_pids = []
original_forward = RetrievalObjective.forward


def recording_forward(self, batch):
    if not first_pids:
        first_pids.extend(batch["pids"].tolist())
    return original_forward(self, batch)


if __name__ == "__main__":
    import os

    out = Path(sys.argv[1])
    RetrievalObjective.forward = recording_forward
    summary = train_main(["--output-dir", str(out)] + sys.argv[2:], "ddp test", "configs/cuhkpedes.yaml")
    rank = int(os.environ["RANK"])
    torch.save({"model": summary["model"].state_dict(), "step": summary["global_step"], "first_pids": first_pids},
               out / f"rank{rank}.pt")
