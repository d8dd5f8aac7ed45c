"""The command line of ``evaluate.py``: its arguments and where its results go; the work is engine/evaluate_run.py's.

Only the standard library is imported before the arguments are parsed, so ``python evaluate.py --help`` answers
at once.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence


def parse_args(argv: Sequence[str] | None, description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--checkpoint", required=True, help="our .pth checkpoint or the authors' released one")
    parser.add_argument("--config", default=None, help="recipe YAML: data/eval sections for ours, all for the authors'")
    parser.add_argument("--split", default="test", choices=("train", "val", "test"))
    parser.add_argument("--output-dir", default=None,
                        help="where metrics_<split>.json goes (default: metrics_<split>_<checkpoint name>.json "
                             "in the checkpoint's folder)")
    parser.add_argument("--save-examples", type=int, default=None, metavar="N",
                        help="save PNGs of the top-10 results of N queries (overrides eval.save_examples)")
    parser.add_argument("--save-features", action="store_true",
                        help="also write the text and image features computed, with their captions, image paths and "
                             "person ids, to features_<split>*.pt beside the metrics file")
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. eval.batch_size=128")
    return parser.parse_args(argv)


def output_paths(checkpoint: str | Path, output_dir: str | Path | None, split: str) -> tuple[Path, Path]:
    """(metrics JSON, examples folder) for ``split``: named after the checkpoint in the checkpoint's folder,
    where a training run keeps its own metrics_<split>.json; plain names in a folder of their own."""
    checkpoint = Path(checkpoint).resolve()
    folder = Path(output_dir).resolve() if output_dir else checkpoint.parent
    suffix = f"_{checkpoint.stem}" if folder == checkpoint.parent else ""
    return folder / f"metrics_{split}{suffix}.json", folder / f"examples_{split}{suffix}"


def evaluate_main(argv: Sequence[str] | None, description: str) -> dict:
    """The whole ``main()`` of evaluate.py; returns the results dict (the same on every rank).

    Bad input exits with one line.
    """
    args = parse_args(argv, description)
    # Imported after parsing: torch and the model take seconds to import, --help must not wait for them.
    from engine.evaluate_run import evaluate_checkpoint

    metrics_path, examples_dir = output_paths(args.checkpoint, args.output_dir, args.split)
    return evaluate_checkpoint(args, metrics_path, examples_dir)  # runs inside user_errors_as_one_line()
