"""What val says of ITM re-ranking at the epoch a run keeps, against its other evaluations and test.

    python bench/results/2026-12-06_block1_pretraining_seed/kept_epoch_bias.py RUN/log.txt [RUN/log.txt ...]

A run keeps the epoch whose val score of its served ranking is best; with blend weight 0 that is the cosine
order's. The cosine's val R@1 at that epoch is then the best of several noisy draws, and any other ranking of the
same model (ITM replacing the cosine in the top k) looks worse against it on val than it is. Per run, from the
tables of its training log: val R@1 of ITM replacing minus the cosine's at the kept epoch, the mean of the same
difference over the other evaluations from ``--from-epoch`` on, and test's difference (best.pth).
"""
from __future__ import annotations

import argparse
import re
import statistics

from utils.errors import user_errors_as_one_line

TABLE = re.compile(r"^text-to-image on (val|test)(, ITM re-ranking|, cosine \+)?")
EPOCH = re.compile(r"epoch (\d+): val R1 = ")
KEPT = re.compile(r"testing best\.pth: epoch (\d+)")


def replacement_minus_cosine(path: str) -> tuple[dict[int, float], int, float]:
    """({epoch: val R1 of ITM replacing minus the cosine's}, the kept epoch, the same difference on test)."""
    with open(path, encoding="utf-8") as log:
        lines = log.read().splitlines()
    per_epoch, tables, kept = {}, {}, None
    for i, line in enumerate(lines):
        if match := TABLE.match(line):
            kind = "itm" if match.group(2) and "ITM" in match.group(2) else "blend" if match.group(2) else "cosine"
            tables.setdefault(match.group(1), {})[kind] = float(lines[i + 4].split("|")[1])
        elif match := EPOCH.search(line):
            val = tables.pop("val", {})
            if "itm" in val:
                per_epoch[int(match.group(1))] = val["itm"] - val["cosine"]
        elif match := KEPT.search(line):
            kept = int(match.group(1))
    test = tables.get("test", {})
    if kept is None or "itm" not in test:
        raise ValueError(f"{path}: no re-ranked test table after 'testing best.pth' (a finished re-rank run's log)")
    return per_epoch, kept, test["itm"] - test["cosine"]


@user_errors_as_one_line()
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("logs", nargs="+")
    parser.add_argument("--from-epoch", type=int, default=11, help="the other evaluations counted from this epoch")
    args = parser.parse_args(argv)
    rows = []
    print("| run | kept epoch | val at the kept epoch | val, other evaluations (mean) | test |")
    print("|---|---|---|---|---|")
    for path in args.logs:
        per_epoch, kept, test = replacement_minus_cosine(path)
        others = [d for epoch, d in per_epoch.items() if epoch >= args.from_epoch and epoch != kept]
        rows.append((per_epoch[kept], statistics.mean(others), test))
        print(f"| {path.rsplit('/', 2)[-2]} | {kept} | {rows[-1][0]:+.2f} | {rows[-1][1]:+.2f} ({len(others)}) "
              f"| {test:+.2f} |")
    means = [statistics.mean(column) for column in zip(*rows)]
    print(f"| mean of {len(rows)} | | {means[0]:+.2f} | {means[1]:+.2f} | {means[2]:+.2f} |")


if __name__ == "__main__":
    main()
