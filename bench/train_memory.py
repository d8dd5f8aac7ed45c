"""The fastest training setting per GPU memory budget.

    python -m bench.train_memory --device cuda --memory-budgets 12,16,24,40,80

Each candidate setting (records x accumulation, activation checkpointing) is timed once without a cap (the step of
bench/train_step.py) and its peak reserved memory noted; per budget the fastest setting that fits is then re-run
under torch.cuda.set_per_process_memory_fraction(budget / total). Activation checkpointing is exact; accumulation
over smaller micro-batches changes the recipe (CMPM compares fewer pairs per micro-batch) and is marked so. On a
CPU the candidates are timed and nothing is capped. ``--json PATH`` writes every row with the machine record.
"""
from __future__ import annotations

import argparse

import torch

from bench.base import add_common_arguments, free, start, text_lens
from bench.train_step import bench_step, print_step_row
from utils.errors import user_errors_as_one_line

MEMORY_CANDIDATES = [  # (records, accumulation, checkpointing); exact = the recipe's contrastive batch of 28
    (28, 1, False), (28, 1, True), (14, 2, False), (14, 2, True), (7, 4, True),
]


def bench_memory(args: argparse.Namespace, device: torch.device, peak: float | None) -> list[dict]:
    """A row per candidate that ran (timed without a cap), then {"memory_table": a row per budget}."""
    if device.type != "cuda":
        budgets = []  # no memory cap on a CPU: the candidates are timed, nothing is capped
    else:
        budgets = [float(b) for b in args.memory_budgets.split(",")]
    size, lens = args.sizes.split(",")[0], text_lens(args.text_lens)
    full = args.batch or 28
    rows = []
    for records, accum, ckpt in MEMORY_CANDIDATES:
        records = max(1, records * full // 28)
        overrides = args.set + [f"train.grad_accum_steps={accum}", f"model.grad_checkpointing={str(ckpt).lower()}"]
        r = None
        try:
            r = bench_step(size, device, records, args.steps or 5, 2, lens, overrides, 1, peak,
                           label=f"{records}x{accum}{' ckpt' if ckpt else ''}")
        except torch.OutOfMemoryError:
            print(f"  {records}x{accum} ckpt={ckpt}: out of memory without a cap", flush=True)
        if r is None:
            free(device)  # outside the except block, whose traceback still holds the failed step's tensors
            continue
        r["exact"] = accum == 1 and records == full  # the recipe's contrastive batch in one micro-batch
        rows.append(r)
        print_step_row(r, "memory candidate")
    table = []
    total = torch.cuda.get_device_properties(device).total_memory / 2**30 if device.type == "cuda" else None
    for budget in budgets:
        fits = [r for r in rows if r["peak_reserved_GiB"] <= 0.95 * budget]
        exact = [r for r in fits if r["exact"]]
        choice = max(exact or fits, key=lambda r: r["pairs_per_s"], default=None)
        verified = None
        if choice is not None and budget < total:
            torch.cuda.set_per_process_memory_fraction(budget / total, device)
            try:
                again = bench_step(size, device, choice["records"], 2, 1, lens, choice["overrides"], 1, peak,
                                   label="verify")
                verified = f"ran under the cap ({again['step_s'] * 1e3:.0f} ms/step)"
            except torch.OutOfMemoryError:
                verified = "OOM under the cap"
            finally:
                torch.cuda.set_per_process_memory_fraction(1.0, device)
            free(device)
        table.append({"budget_GB": budget, "choice": choice and choice["variant"],
                      "exact": choice and choice["exact"], "step_s": choice and choice["step_s"],
                      "pairs_per_s": choice and choice["pairs_per_s"],
                      "peak_reserved_GiB": choice and choice["peak_reserved_GiB"], "verified": verified})
        print(f"  budget {budget:g} GiB: {table[-1]}", flush=True)
    return rows + [{"memory_table": table}]


@user_errors_as_one_line()
def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    add_common_arguments(parser)
    parser.add_argument("--memory-budgets", default="12,16,24,40,80", help="comma list of GB")
    args = parser.parse_args(argv)
    bench = start(parser, args)
    for row in bench_memory(args, bench.device, bench.peak):
        bench.add(row)
    return bench.rows


if __name__ == "__main__":
    main()
