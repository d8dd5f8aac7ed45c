"""Fine-tune IVT on CUHK-PEDES and evaluate it (model selection on val, test reported).

    python train_cuhkpedes.py [--config configs/cuhkpedes.yaml] [--output-dir DIR] [--resume PATH|auto] [--init-from CKPT] [--eval-only] [key=value ...]
    bash start.sh train_cuhkpedes.py 4 [key=value ...]      # 4 GPUs with torchrun
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from engine.cli import exit_status, train_main

DEFAULT_CONFIG = str(Path(__file__).resolve().parent / "configs" / "cuhkpedes.yaml")


def main(argv: Sequence[str] | None = None) -> dict:
    return train_main(argv, description=__doc__.splitlines()[0], default_config=DEFAULT_CONFIG)


if __name__ == "__main__":
    raise SystemExit(exit_status(main()))  # 75: stopped by a signal with last.pth saved; resume it
