"""The table of this folder's README: the re-rank recipe with four ITM negatives per anchor against one.

    python bench/results/2026-12-06_itm_negatives/summarize.py > summary.md

Each run here (``loss.itm_negatives=4``) is paired with the run of ../2026-12-06_block1_pretraining_seed/ that
started from the same pretraining with the same fine-tuning seed and style (one negative, the authors' draw).
"""
from __future__ import annotations

import json
from pathlib import Path

from engine.calibration import choose_blend_weight
from utils.errors import user_errors_as_one_line

HERE = Path(__file__).resolve().parent
ONE_NEGATIVE = HERE.parent / "2026-12-06_block1_pretraining_seed"
STYLES = ("classic", "street", "cctv")
# what the fusion stack reads -> (the one-negative run folders' prefix, this folder's prefix)
PAIRS = {"block 1": ("rerank-block1-pseed1235", "rerank-block1-neg4-pseed1235"),
         "output": ("rerank-output-pseed1235", "rerank-output-neg4-pseed1235")}


def figures(run_dir: Path) -> dict[str, float | str]:
    """A run's test R@1 of the cosine order, of ITM replacing it and of the blend at the weight carried from val,
    the blend at fixed weights, the head's and the cosine's share of top-16 pairs ordered right, val's evidence."""
    test = json.loads((run_dir / "metrics_test.json").read_text(encoding="utf-8"))
    val = json.loads((run_dir / "metrics_val.json").read_text(encoding="utf-8"))
    grid, cosine = test["rerank_blend"]["grid"], test["t2i"]["R1"]
    evidence, blend = val["rerank_blend"].get("evidence"), val["rerank_blend"]
    # val's best weight, by evaluation's own rule (alpha 1: before its sign test)
    best, _ = choose_blend_weight({float(w): row for w, row in blend["grid"].items()}, blend["selection_metric"])
    return {"cosine": cosine, "itm": test["t2i_rerank"]["R1"] - cosine, "weight": test["rerank_blend"]["weight"],
            "served": test["t2i_blend"]["R1"] - cosine, "w1": grid["1.0"]["R1"] - cosine,
            "w4": grid["4.0"]["R1"] - cosine, "pairs": test["itm_pair_accuracy"]["itm"]
            - test["itm_pair_accuracy"]["cosine"],
            "val": f"best {best:g}" + ("" if evidence is None else
                                              f": {evidence['better']}/{evidence['worse']}, "
                                              f"p {evidence['p_value']:.3f}")}


def row(reads: str, style: str, negatives: str, f: dict) -> str:
    return (f"| {reads} | {style} | {negatives} | {f['cosine']:.2f} | {f['itm']:+.2f} | {f['weight']:g} "
            f"({f['val']}) | {f['served']:+.2f} | {f['w1']:+.2f} / {f['w4']:+.2f} | {f['pairs']:+.2f} |")


@user_errors_as_one_line()
def main() -> None:
    lines = ["| reads | style | ITM negatives | test R@1, cosine | ITM replacing, minus cosine | blend weight chosen "
             "on val (val's best weight: val queries it ranks better/worse, sign test p) | served blend minus cosine, "
             "test | blend at w 1 / 4 minus cosine, test | top-16 pairs ordered right, ITM minus cosine, test |",
             "|---|---|---|---|---|---|---|---|---|"]
    gains = {"cosine": [], "itm": [], "pairs": []}
    for reads, (one, four) in PAIRS.items():
        for style in STYLES:
            mine = HERE / f"{four}-pretrained-{style}-seed0"
            if not (mine / "metrics_test.json").is_file():
                continue
            before, after = figures(ONE_NEGATIVE / f"{one}-pretrained-{style}-seed0"), figures(mine)
            lines += [row(reads, style, "1", before), row(reads, style, "4", after)]
            for key in gains:
                gains[key].append(after[key] - before[key])
    lines += ["", f"Four negatives minus one, over {len(gains['cosine'])} pairs (block 1, then output; classic, "
              "street, cctv):", ""]
    lines += [f"- {key}: {' '.join(f'{g:+.2f}' for g in values)}" for key, values in gains.items()]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
