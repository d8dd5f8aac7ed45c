"""Fine-tune IVT on RSTPReid and evaluate it (model selection on val, test reported).

    python train_rstp.py [--config configs/rstp.yaml] [--resume PATH|auto] [key=value ...]   # 4 GPUs: bash start.sh train_rstp.py 4 ...
"""
from engine.cli import exit_status, train_main


def main(argv: list[str] | None = None) -> dict:
    return train_main(argv, __doc__, "configs/rstp.yaml")


if __name__ == "__main__":
    raise SystemExit(exit_status(main()))  # 75: stopped by a signal with last.pth saved; resume it
