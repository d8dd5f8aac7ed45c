"""Compare two training logs line by line: every logged step's losses and every evaluation's val R1.

    python bench/results/2026-12-06_reproduction/compare_logs.py A/log.txt B/log.txt

Prints how many entries both logs hold, how many differ, and the first differing ones (step number or
("val", epoch)), each with both logs' values as printed (4 significant digits).
"""
from __future__ import annotations

import re
import sys

STEP = re.compile(r"epoch (\d+) step (\d+): (.*?) lr=")
VAL = re.compile(r"epoch (\d+): val R1 = ([\d.]+)")


def entries(path: str) -> dict:
    """{step: {loss name: value as printed}, ("val", epoch): {"R1": value}} of one log."""
    found: dict = {}
    with open(path, encoding="utf-8") as log:
        for line in log:
            if match := STEP.search(line):
                found[int(match.group(2))] = dict(pair.split("=") for pair in match.group(3).split())
            elif match := VAL.search(line):
                found[("val", int(match.group(1)))] = {"R1": match.group(2)}
    return found


def main(argv: list[str] | None = None) -> None:
    first, second = (entries(path) for path in (argv or sys.argv[1:]))
    common = [key for key in first if key in second]
    differ = [key for key in common if first[key] != second[key]]
    print(f"{len(common)} entries in both logs, {len(differ)} differ")
    for key in differ[:8]:
        print(key, first[key], second[key])


if __name__ == "__main__":
    main()
