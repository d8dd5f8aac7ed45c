"""Check a dataset before training: annotations, images, captions and identities, without building a model.

    python -m datasets.check --format cuhkpedes --root data/CUHK-PEDES
    python -m datasets.check --format pretrain --corpora data/pretrain/corpora.json

Prints the split table, missing and undecodable images grouped by top-level folder (e.g. ``CUHK01/``,
``Market/`` under ``imgs/``) with counts and example paths, captions that the reader skipped as empty or that
are longer than ``--max-words`` words, and train identities with fewer than ``--min-instances`` records.

Exit status: 0 when the data can train; 1 when it cannot (an annotation error, printed as one line; missing or
undecodable images; an empty train split; or, for fine-tuning, no train identity with two or more records);
2 for a usage error. Empty/overlong captions and small identities are reported but do not fail the check.

Imports only the readers, Pillow and tqdm: no torch, no model.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from collections import Counter
from typing import Sequence, TextIO

from datasets.image_check import scan_images
from datasets.readers import FORMATS, format_statistics, load_annotations, load_pretrain_corpora, read_json
from datasets.records import SPLIT_NAMES, DataFormatError, DatasetSplits, Record
from utils.errors import user_errors_as_one_line

DEFAULT_MAX_WORDS = 100
DEFAULT_MIN_INSTANCES = 2
_EXAMPLES = 3


class _Collect(logging.Handler):
    """Keeps the readers' warnings (empty captions, published counts) to print them in the report."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m datasets.check", description=__doc__.split("\n\n")[0],
        epilog="Exit status 0: the data can train; 1: it cannot (see the report); 2: usage error.",
    )
    parser.add_argument("--format", required=True, choices=FORMATS + ("pretrain",))
    parser.add_argument("--root", help="dataset folder (annotation file and imgs/); for pretrain without "
                                       "--corpora, the synthetic corpus folder holding pretrain.json")
    parser.add_argument("--annotation-file", help="annotation file, relative to --root or absolute "
                                                  "(default: the distributed names)")
    parser.add_argument("--corpora", help="pretrain: the JSON list of {annotation, image_root} written by "
                                          "datasets/prepare_pretrain.py")
    parser.add_argument("--min-instances", type=int, default=DEFAULT_MIN_INSTANCES, metavar="K",
                        help="report train identities with fewer than K records (default %(default)s)")
    parser.add_argument("--max-words", type=int, default=DEFAULT_MAX_WORDS, metavar="N",
                        help="report captions longer than N words (default %(default)s)")
    level = parser.add_mutually_exclusive_group()
    level.add_argument("--no-decode", action="store_true", help="only check that the image files exist")
    level.add_argument("--full-decode", action="store_true",
                       help="decode every image fully (slower than the default header check)")
    parser.add_argument("--workers", type=int, default=None, help="image-check threads (default: 2 x cores)")
    parser.add_argument("--examples", type=int, default=_EXAMPLES, metavar="N",
                        help="example paths shown per folder or problem (default %(default)s)")
    return parser


def _load(args: argparse.Namespace) -> tuple[DatasetSplits, list[tuple[str, int, str]]]:
    """The dataset as splits (pretraining: everything in train) and the entries skipped for empty captions."""
    if args.format != "pretrain":
        splits = load_annotations(args.format, args.root, args.annotation_file)
        return splits, list(splits.skipped_empty)
    if args.corpora:
        where = args.corpora
        corpora = read_json(args.corpora)
    else:
        # as the engine does for the synthetic pretraining corpus
        where = os.path.join(args.root, "pretrain.json")
        corpora = [{"annotation": where, "image_root": args.root}]
    skipped: list[tuple[str, int, str]] = []
    records = load_pretrain_corpora(corpora, skipped_empty=skipped)
    return DatasetSplits("pretrain", args.root or "", where, train=records), skipped


def _caption_lines(splits: DatasetSplits, skipped: list[tuple[str, int, str]], max_words: int,
                   examples: int) -> list[str]:
    long: list[tuple[str, Record, int]] = []
    for name in SPLIT_NAMES:
        for record in getattr(splits, name):
            words = len(record.caption.split())
            if words > max_words:
                long.append((name, record, words))
    lines = [f"captions: {len(skipped)} entr{'y' if len(skipped) == 1 else 'ies'} with empty captions "
             f"(skipped by the reader), {len(long)} caption(s) longer than {max_words} words"]
    if skipped:
        shown = ", ".join(f"{where}[{index}] {path}" for where, index, path in skipped[:examples])
        lines.append(f"  empty: {shown}{', ...' if len(skipped) > examples else ''}")
    if long:
        per_split = Counter(name for name, _, _ in long)
        lines.append("  long by split: " + ", ".join(f"{n} {per_split[n]}" for n in SPLIT_NAMES if per_split[n])
                     + f"; longest {max(w for _, _, w in long)} words")
        for name, record, words in long[:examples]:
            lines.append(f"  long: {name} {record.image_path}: {words} words")
    return lines


def _identity_lines(train: Sequence[Record], min_instances: int, examples: int) -> tuple[list[str], int]:
    """Lines about train identities and the number of identities with at least two records."""
    per_pid = Counter(r.pid for r in train)
    first_path: dict[int, str] = {}
    for record in train:
        first_path.setdefault(record.pid, record.image_path)
    small = sorted(pid for pid, n in per_pid.items() if n < min_instances)
    trainable = sum(1 for n in per_pid.values() if n >= 2)
    sizes = sorted(per_pid.values())
    lines = [f"identities: {len(per_pid)} in train, records per identity min {sizes[0]} / median "
             f"{sizes[len(sizes) // 2]} / max {sizes[-1]}; {len(small)} with fewer than {min_instances} records, "
             f"{trainable} with 2 or more"]
    for pid in small[:examples]:
        lines.append(f"  small: label {pid}: {per_pid[pid]} record(s), e.g. {first_path[pid]}")
    if len(small) > examples:
        lines.append(f"  ... {len(small) - examples} more")
    return lines, trainable


def _images_in_root_hint(missing: Sequence[str], root: str, sample: int = 50) -> str | None:
    """A hint when the missing images exist directly under ``root`` instead of ``root/imgs`` (the most common
    layout mistake); None when a sample of them is not there either."""
    imgs = os.path.join(root, "imgs")
    checked = [p for p in missing[:sample] if os.path.commonpath([imgs, p]) == imgs]
    found = sum(os.path.isfile(os.path.join(root, os.path.relpath(p, imgs))) for p in checked)
    if not checked or found < len(checked) / 2:
        return None
    return (f"hint: {found} of {len(checked)} missing images checked sit directly in {root} instead of {imgs}: "
            f"images are read from <root>/imgs/<path in the annotation>; move them into {imgs}/")


def run_check(args: argparse.Namespace, out: TextIO) -> int:
    collect = _Collect()
    reader_logger = logging.getLogger("datasets.readers")
    reader_logger.addHandler(collect)
    try:
        splits, skipped = _load(args)
    except (DataFormatError, OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    finally:
        reader_logger.removeHandler(collect)

    def say(line: str = "") -> None:
        print(line, file=out)

    title = "pretraining corpora" if args.format == "pretrain" else f"{args.format} annotations"
    say(f"{title}: {splits.annotation_file}")
    say(format_statistics(splits))
    failures: list[str] = []

    records = [*splits.train, *splits.val, *splits.test]
    mode = "exists" if args.no_decode else "full" if args.full_decode else "header"
    base = os.path.join(args.root, "imgs") if args.format != "pretrain" else None
    report = scan_images((r.image_path for r in records), mode, workers=args.workers, base=base)
    for line in report.format_lines(max_listed=args.examples):
        say(line)
    if report.missing:
        failures.append(f"{len(report.missing)} missing image(s)")
        hint = _images_in_root_hint(report.missing, args.root) if base else None
        if hint:
            say(hint)
    if report.undecodable:
        failures.append(f"{len(report.undecodable)} undecodable image(s)")

    for line in _caption_lines(splits, skipped, args.max_words, args.examples):
        say(line)

    if not splits.train:
        failures.append("the train split is empty")
    elif args.format != "pretrain":
        lines, trainable = _identity_lines(splits.train, args.min_instances, args.examples)
        for line in lines:
            say(line)
        if trainable == 0:
            failures.append("no train identity has 2 or more records (P x K batches need pairs)")

    warnings = [m for m in collect.messages if "skipped empty captions" not in m]  # those are reported above
    for message in warnings:
        say(f"warning: {message}")
    if failures:
        say("result: FAIL, the data cannot train: " + "; ".join(failures))
        return 1
    say("result: OK")
    return 0


@user_errors_as_one_line()
def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.format == "pretrain":
        if not args.corpora and not args.root:
            parser.error("--format pretrain needs --corpora FILE (or --root DIR of a synthetic corpus)")
    elif not args.root:
        parser.error(f"--format {args.format} needs --root DIR")
    if args.min_instances < 1 or args.max_words < 1:
        parser.error("--min-instances and --max-words must be positive")
    return run_check(args, sys.stdout)


if __name__ == "__main__":
    sys.exit(main())
