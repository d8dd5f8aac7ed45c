"""Convert an IVT checkpoint by the authors into this project's format, once.

    python -m engine.convert_official IN.pth OUT.pth [--image-size H W] [--trust-pickle]

The converted file loads strictly wherever a checkpoint of ours does (evaluate.py, retrieve.py, ``--init-from``).
The tensor names are mapped by ``models.official``; the file is written by ``engine.checkpoints.convert_file``.
Only the standard library is imported before the arguments are parsed, so ``--help`` answers at once.
"""
from __future__ import annotations

import argparse
import logging
from typing import Optional, Sequence

from utils.errors import user_errors_as_one_line

_log = logging.getLogger(__name__)


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m engine.convert_official",
                                     description="Convert an IVT checkpoint by the authors into this project's format.")
    parser.add_argument("src", help="the authors' checkpoint (.pth)")
    parser.add_argument("dst", help="where to write the converted checkpoint")
    parser.add_argument("--image-size", type=int, nargs=2, default=None, metavar=("H", "W"),
                        help="training image size of the checkpoint (default: the authors' 384 128); used to infer "
                        "the stride")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="load with weights_only=False (runs pickled code; only for files you trust)")
    return parser.parse_args(argv)


@user_errors_as_one_line()
def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # Imported after parsing: torch and the model take seconds to import, --help must not wait for them.
    from engine.checkpoints import convert_file

    checkpoint = convert_file(args.src, args.dst, args.image_size, args.trust_pickle)
    _log.info("wrote %s (%d tensors, config %s)", args.dst, len(checkpoint["model"]), checkpoint["config"])


if __name__ == "__main__":
    main()
