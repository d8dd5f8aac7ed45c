"""Fine-tune IVT on ICFG-PEDES and evaluate it (no val split: the last epoch is kept).

    python train_icfg.py [--config configs/icfg.yaml] [--resume PATH|auto] [key=value ...]   # 4 GPUs: bash start.sh train_icfg.py 4 ...
"""
from engine.cli import exit_status, train_main


def main(argv: list[str] | None = None) -> dict:
    return train_main(argv, __doc__, "configs/icfg.yaml")


if __name__ == "__main__":
    raise SystemExit(exit_status(main()))  # 75: stopped by a signal with last.pth saved; resume it
