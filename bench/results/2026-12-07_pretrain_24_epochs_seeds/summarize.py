"""The tables of this folder's README: the 24-epoch miniature pretraining at three training seeds, each followed by
the re-rank recipe on every style (fine-tuning seed 0), against the 6-epoch pretrainings measured before.

    python bench/results/2026-12-07_pretrain_24_epochs_seeds/summarize.py > summary.md

Every pretraining here reads the encoder's output tokens (the authors' fusion stack, the default). Seed 1235's
24-epoch runs are ../2026-12-06_pretrain_24_epochs/'s; the 6-epoch runs are seed 1234's (the demo pretraining
of ../2026-12-06_reproduction/, street from ../2026-12-06_fusion_reads_block/) and seed 1235's
(../2026-12-06_block1_pretraining_seed/); there is no 6-epoch run of seed 1236.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

from engine.calibration import choose_blend_weight
from utils.errors import user_errors_as_one_line

HERE = Path(__file__).resolve().parent
RESULTS = HERE.parent
STYLES = ("classic", "street", "cctv")
# (pretraining epochs, training seed) -> the pretraining run, the jsonl holding its zero-shot rows, and each
# style's fine-tuned run folder (seed 0)
RUNS = {
    (6, 1234): ("pretrain-38d8b9685d54", RESULTS / "2026-12-05_longer_finetuning" / "runs.jsonl",
                {"classic": RESULTS / "2026-12-06_reproduction" / "today-classic-seed0",
                 "street": RESULTS / "2026-12-06_fusion_reads_block" / "rerank-output-recheck-pretrained-street-seed0",
                 "cctv": RESULTS / "2026-12-06_reproduction" / "today-cctv-seed0"}),
    (6, 1235): ("pretrain-0cf14c7d7687", RESULTS / "2026-12-06_block1_pretraining_seed" / "output_p1235.jsonl",
                {s: RESULTS / "2026-12-06_block1_pretraining_seed" / f"rerank-output-pseed1235-pretrained-{s}-seed0"
                 for s in STYLES}),
    (24, 1234): ("pretrain-0b11c8fd5d30", HERE / "output_p24_pseed1234.jsonl",
                 {s: HERE / f"rerank-output-p24ep-pseed1234-pretrained-{s}-seed0" for s in STYLES}),
    (24, 1235): ("pretrain-ce68c4c53a8e", RESULTS / "2026-12-06_pretrain_24_epochs" / "output_p24.jsonl",
                 {s: RESULTS / "2026-12-06_pretrain_24_epochs" / f"rerank-output-p24ep-pretrained-{s}-seed0"
                  for s in STYLES}),
    (24, 1236): ("pretrain-5133084ee24e", HERE / "output_p24_pseed1236.jsonl",
                 {s: HERE / f"rerank-output-p24ep-pseed1236-pretrained-{s}-seed0" for s in STYLES}),
}


def zero_shot(jsonl: Path, run: str) -> dict[str, tuple[float, float]]:
    """style -> test R@1 of the cosine order and of ITM replacing it in the top 16, before any fine-tuning."""
    rows = [json.loads(line) for line in jsonl.read_text(encoding="utf-8").splitlines() if line.strip()]
    return {r["style"]: (r["test_R1"], r["test_R1_rerank"]) for r in rows
            if r.get("kind") == "zero_shot" and r["run"] == run}


def fine_tuned(run_dir: Path) -> dict:
    """Test R@1 and mAP of the cosine order, ITM replacing it and the served blend (minus the cosine), the blend
    weight carried from val, val's best weight before the sign test and its test R@1 minus the cosine (what the
    blend would serve without the guard), top-16 (right, wrong) pairs the head orders right minus the cosine's,
    and "no good match" on test (the cosine rule calibrated on val): right best answers flagged and absent people
    not flagged, short queries then whole captions, in % (None for runs older than today's rule, fitted for new
    people with every clause a short query: their records have no "held_out")."""
    test = json.loads((run_dir / "metrics_test.json").read_text(encoding="utf-8"))
    cosine, no_match = test["t2i"]["R1"], test["no_match"]
    val_blend = json.loads((run_dir / "metrics_val.json").read_text(encoding="utf-8"))["rerank_blend"]
    unguarded, _ = choose_blend_weight({float(w): row for w, row in val_blend["grid"].items()},
                                       val_blend["selection_metric"])
    test_grid = {float(w): row for w, row in test["rerank_blend"]["grid"].items()}
    return {"cosine": cosine, "mAP": test["t2i"]["mAP"], "itm": test["t2i_rerank"]["R1"] - cosine,
            "weight": test["rerank_blend"]["weight"], "served": test["t2i_blend"]["R1"] - cosine,
            "unguarded": unguarded, "unguarded_gain": test_grid[unguarded]["R1"] - cosine,
            "pairs": test["itm_pair_accuracy"]["itm"] - test["itm_pair_accuracy"]["cosine"],
            "no_match": tuple(no_match[kind][what] for kind in ("short_queries", "full_captions")
                              for what in ("right_top1_flagged", "absent_not_flagged"))
            if "held_out" in no_match else None}


def mean_sd(values: list[float]) -> str:
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f} ({len(values)} runs)"


@user_errors_as_one_line()
def main() -> None:
    found = {key: {s: fine_tuned(d) for s, d in dirs.items()} for key, (_, _, dirs) in RUNS.items()}
    lines = ["## Pretrainings: zero-shot test R@1, cosine / ITM replacing in the top 16", "",
             "| epochs | seed | run | classic | street | cctv |", "|---|---|---|---|---|---|"]
    for (epochs, seed), (run, jsonl, _) in RUNS.items():
        shots = zero_shot(jsonl, run)
        lines.append(f"| {epochs} | {seed} | {run} | " + " | ".join(
            f"{shots[s][0]:.2f} / {shots[s][1]:.2f}" for s in STYLES) + " |")
    lines += ["", "## Fine-tuned (the re-rank recipe, fine-tuning seed 0)", "",
              "| style | epochs | seed | test R@1, cosine | mAP | ITM replacing, minus cosine | blend weight carried "
              "from val | served blend minus cosine | val's best weight without the sign test: its test R@1 minus "
              "cosine | top-16 pairs ordered right, ITM minus cosine |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for style in STYLES:
        for (epochs, seed), by_style in found.items():
            f = by_style[style]
            lines.append(f"| {style} | {epochs} | {seed} | {f['cosine']:.2f} | {f['mAP']:.2f} | {f['itm']:+.2f} | "
                         f"{f['weight']:g} | {f['served']:+.2f} | {f['unguarded']:g}: {f['unguarded_gain']:+.2f} | "
                         f"{f['pairs']:+.2f} |")
    lines += ["", "## Over pretraining seeds: test R@1 of the cosine order, mean ± sd", "",
              "| style | 6 epochs | 24 epochs | 24-epoch runs whose served blend is above the cosine | ... without "
              "the sign test (above / below) |", "|---|---|---|---|---|"]
    for style in STYLES:
        by_epochs = {e: [f[style]["cosine"] for (ep, _), f in found.items() if ep == e] for e in (6, 24)}
        long = [f[style] for (ep, _), f in found.items() if ep == 24]
        unguarded = [f["unguarded_gain"] for f in long]
        lines.append(f"| {style} | {mean_sd(by_epochs[6])} | {mean_sd(by_epochs[24])} | "
                     f"{sum(f['served'] > 0 for f in long)} of {len(long)} | {sum(g > 0 for g in unguarded)} / "
                     f"{sum(g < 0 for g in unguarded)} of {len(long)} |")
    lines += ["", "## No good match on test (the cosine rule, calibrated on val and carried; runs older than the "
              "rule left out)", "",
              "| style | epochs | seed | short queries: right best answers flagged / absent people not flagged, % "
              "| whole captions |", "|---|---|---|---|---|"]
    for style in STYLES:
        for (epochs, seed), by_style in found.items():
            rates = by_style[style]["no_match"]
            if rates is not None:
                lines.append(f"| {style} | {epochs} | {seed} | {rates[0]:.1f} / {rates[1]:.1f} | "
                             f"{rates[2]:.1f} / {rates[3]:.1f} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
