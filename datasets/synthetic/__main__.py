"""``python -m datasets.synthetic``: write a synthetic dataset of one format and style (see the package docstring)."""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import datasets.synthetic as package
from datasets.synthetic.identities import FORMATS, STYLES, check_num_ids
from datasets.synthetic.writer import make_synthetic
from utils.errors import UserError, user_errors_as_one_line


class SyntheticArgumentError(UserError, ValueError):
    """An argument of ``python -m datasets.synthetic`` that cannot give a dataset; the message names it."""


def check_arguments(fmt: str, out: Path, num_ids: int) -> None:
    """Everything that would stop the writer, said before it draws a single image."""
    if out.exists() and not out.is_dir():
        raise SyntheticArgumentError(f"--out {out} is a file, not a folder: name a folder (it is created if absent)")
    try:
        check_num_ids(fmt, num_ids)
    except ValueError as exc:
        raise SyntheticArgumentError(f"--num-ids {num_ids}: {exc} (every split of the format needs an "
                                     "identity)") from None


@user_errors_as_one_line()
def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m datasets.synthetic", description=package.__doc__.split("\n\n")[0])
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--out", required=True, help="output folder (the dataset root)")
    parser.add_argument("--num-ids", type=int, default=100, help="identities over all splits")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--style", default="classic", choices=STYLES,
                        help="how people are drawn and captioned (cctv is the held-out style)")
    args = parser.parse_args(argv)
    check_arguments(args.format, Path(args.out), args.num_ids)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out = make_synthetic(args.format, args.out, args.num_ids, args.seed, style=args.style)
    if args.format == "pretrain":
        print(json.dumps([{"annotation": str(out / "pretrain.json"), "image_root": str(out)}]))
    return out


if __name__ == "__main__":
    main()
