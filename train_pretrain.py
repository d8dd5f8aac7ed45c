"""Pretrain IVT with ITC + ITM + MLM on image-caption corpora (optional zero-shot evaluation).

    python train_pretrain.py [--config configs/pretrain.yaml] [--resume PATH|auto] [key=value ...]   # 4 GPUs: bash start.sh train_pretrain.py 4 ...
"""
from engine.cli import exit_status, train_main


def main(argv: list[str] | None = None) -> dict:
    return train_main(argv, __doc__, "configs/pretrain.yaml")


if __name__ == "__main__":
    raise SystemExit(exit_status(main()))  # 75: stopped by a signal with last.pth saved; resume it
