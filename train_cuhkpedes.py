"""Fine-tune IVT on CUHK-PEDES and evaluate it (model selection on val, test reported).

    python train_cuhkpedes.py [--config configs/cuhkpedes.yaml] [--resume PATH|auto] [key=value ...]   # 4 GPUs: bash start.sh train_cuhkpedes.py 4 ...
"""
from engine.cli import exit_status, train_main


def main(argv: list[str] | None = None) -> dict:
    return train_main(argv, __doc__, "configs/cuhkpedes.yaml")


if __name__ == "__main__":
    raise SystemExit(exit_status(main()))  # 75: stopped by a signal with last.pth saved; resume it
