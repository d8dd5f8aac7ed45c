"""The tables of this folder's README from its records and the earlier ones it compares with.

    python bench/results/2026-12-06_block1_pretraining_seed/summarize.py > summary.md

Test R@1 of the re-rank recipe (cosine order, and ITM replacing it inside the top 16) reading the encoder's
output tokens or block 1, per miniature pretraining run; the same two recipes' "no good match" figures from
bench/bench_no_match.py (this folder's no_match/, and no_match_new_people/ from the bench fitting for new people).
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

from utils.errors import user_errors_as_one_line

HERE = Path(__file__).resolve().parent
RESULTS = HERE.parent
STYLES = ("classic", "street", "cctv")
# pretraining seed -> what the fusion stack reads -> (its pretraining run, the bench records of the fine-tuning runs)
RECORDS = {
    1234: {"output": ("pretrain-38d8b9685d54", [
        RESULTS / "2026-12-06_fusion_reads_block/bench_output_recheck.jsonl",
        *sorted((RESULTS / "2026-12-06_reproduction").glob("today_*_seed*.jsonl"))]),
        "block 1": ("pretrain-9d0034e48b51", [RESULTS / "2026-12-06_fusion_reads_block/bench_block1.jsonl"])},
    1235: {"output": ("pretrain-0cf14c7d7687", [HERE / "output_p1235.jsonl"]),
           "block 1": ("pretrain-c74ca1b10a3f", [HERE / "block1_p1235.jsonl"])},
}


def runs(paths: list[Path]) -> dict[tuple[str, int], tuple[float, float]]:
    """{(style, seed): (test R@1 cosine, test R@1 ITM replacing)} of fine-tuning records (zero-shot rows left out)."""
    found = {}
    for path in paths:
        for line in path.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            if record.get("kind") != "zero_shot":
                found[(record["style"], record["seed"])] = (record["test_R1"], record["test_R1_rerank"])
    return found


def recall_table() -> list[str]:
    table = {pretraining_seed: {reads: runs(paths) for reads, (_, paths) in sides.items()}
             for pretraining_seed, sides in RECORDS.items()}
    lines = ["| reads | pretraining | seed | " + " | ".join(STYLES) + " |", "|---|---|---|---|---|---|"]
    for pretraining_seed, sides in table.items():
        for reads, found in sides.items():
            name = f"{RECORDS[pretraining_seed][reads][0]} (seed {pretraining_seed})"
            for seed in sorted({seed for _, seed in found}):
                cells = [f"{found[(s, seed)][0]:.2f} ({found[(s, seed)][1]:.2f})" for s in STYLES]
                lines.append(f"| {reads} | {name} | {seed} | " + " | ".join(cells) + " |")
    lines += ["", "Block 1 minus the output reading, same pretraining seed and fine-tuning seed (test R@1, cosine):",
              ""]
    diffs, itm_wins = [], {"output": [], "block 1": []}
    for pretraining_seed, sides in table.items():
        for style, seed in sorted(sides["block 1"]):
            diff = sides["block 1"][(style, seed)][0] - sides["output"][(style, seed)][0]
            diffs.append(diff)
            lines.append(f"- {RECORDS[pretraining_seed]['block 1'][0]} (seed {pretraining_seed}), {style}, seed "
                         f"{seed}: {diff:+.2f}")
        for reads, found in sides.items():
            itm_wins[reads] += [itm - cosine for cosine, itm in found.values()]
    lines += ["", f"Over {len(diffs)} pairs: mean {statistics.mean(diffs):+.2f}, block 1 above in "
              f"{sum(d > 0 for d in diffs)}; ITM replacing minus the cosine on test: " + "; ".join(
                  f"{reads} above in {sum(g > 0 for g in gains)} of {len(gains)} (mean {statistics.mean(gains):+.2f})"
                  for reads, gains in itm_wins.items())]
    return lines


def on_test(row: dict) -> str:
    """A bench_no_match per-statistic row's test figures, short queries / whole captions."""
    return " / ".join(f"{row['test'][kind]:.1f}" for kind in ("short", "full"))


def no_match_table() -> list[str]:
    lines = ["| model | separability (AUC) of right best answers from absent queries, test short / whole: cosine, "
             "ITM | absent queries flagged at 10% of right answers flagged (a threshold set on test), cosine, ITM | "
             "evaluate.py's rule (fitted for new people on val), test: right flagged short / whole, absent not "
             "flagged short / whole |", "|---|---|---|---|"]
    for path in sorted((HERE / "no_match").glob("nomatch_*.json")):
        bench = json.loads(path.read_text(encoding="utf-8"))
        name = path.stem.removeprefix("nomatch_")
        reads, style, seed = name.split("-")
        run = HERE / f"rerank-{reads}-pseed1235-pretrained-{style}-{seed}" / "metrics_test.json"
        served = json.loads(run.read_text(encoding="utf-8"))["no_match"]
        rates = [f"{served[k]['right_top1_flagged']:.1f}" for k in ("short_queries", "full_captions")]
        absent = [f"{served[k]['absent_not_flagged']:.1f}" for k in ("short_queries", "full_captions")]
        lines.append(f"| {name} | {on_test(bench['auc']['cosine'])}, {on_test(bench['auc']['itm'])} | "
                     f"{on_test(bench['best_at_limit']['cosine'])}, {on_test(bench['best_at_limit']['itm'])} | "
                     f"{' / '.join(rates)}, {' / '.join(absent)} |")
    return lines


def new_people_table() -> list[str]:
    """bench_no_match since bcfcf9a (no_match_new_people/): the cosine and ITM rules fitted for new people on val."""
    lines = ["| model | rule | fitted quantile | val: right flagged short / whole | test: right flagged short / whole "
             "| test: absent not flagged short / whole |", "|---|---|---|---|---|---|"]
    for path in sorted((HERE / "no_match_new_people").glob("nomatch_*.json")):
        rules = json.loads(path.read_text(encoding="utf-8"))["rules"]
        for rule in ("cosine", "itm"):
            row = rules[rule]
            cells = [" / ".join("-" if row[split][kind].get(rate) is None else f"{row[split][kind][rate]:.1f}"
                                for kind in ("short", "full"))
                     for split, rate in (("val", "right_top1_flagged"), ("test", "right_top1_flagged"),
                                         ("test", "absent_not_flagged"))]
            lines.append(f"| {path.stem.removeprefix('nomatch_')} | {rule} | {row['fitted_quantile']:.3f} | "
                         + " | ".join(cells) + " |")
    return lines


@user_errors_as_one_line()
def main() -> None:
    print("\n".join(["## Test R@1, cosine (ITM replacing it in the top 16)", "", *recall_table(), "",
                     "## No good match (absent: every image of the query's person removed; classic: queries about "
                     "nobody)", "", *no_match_table(), "",
                     "## bench_no_match fitting each rule for new people (since bcfcf9a)", "", *new_people_table()]))


if __name__ == "__main__":
    main()
