"""The tables of this folder's README: the miniature pretraining run 24 epochs instead of 6, and the re-rank recipe
fine-tuned from it.

    python bench/results/2026-12-06_pretrain_24_epochs/summarize.py > summary.md

Each 24-epoch pretraining is paired with the 6-epoch one of ../2026-12-06_block1_pretraining_seed/ (same training
seed 1235, same fusion-stack reading) and each fine-tuning run with that folder's run of the same style and
fine-tuning seed (0).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from engine.calibration import choose_blend_weight
from utils.errors import user_errors_as_one_line

HERE = Path(__file__).resolve().parent
SIX = HERE.parent / "2026-12-06_block1_pretraining_seed"
STYLES = ("classic", "street", "cctv")
# what the fusion stack reads -> {pretraining epochs: (results folder, pretraining run, fine-tuning prefix, jsonl)}
RUNS = {"block 1": {6: (SIX, "pretrain-c74ca1b10a3f", "rerank-block1-pseed1235", "block1_p1235.jsonl"),
                    24: (HERE, "pretrain-3bbddbee2210", "rerank-block1-p24ep", "block1_p24.jsonl")},
        "output": {6: (SIX, "pretrain-0cf14c7d7687", "rerank-output-pseed1235", "output_p1235.jsonl"),
                   24: (HERE, "pretrain-ce68c4c53a8e", "rerank-output-p24ep", "output_p24.jsonl")}}
STEP = re.compile(r"epoch (\d+) step \d+: itc_loss=([\d.]+) itm_loss=([\d.]+) .*mlm_loss=([\d.]+)")


def last_epoch_losses(log: Path) -> str:
    """ITC / ITM / MLM loss, the mean of the last epoch's logged steps."""
    rows = [m.groups() for m in map(STEP.search, log.read_text(encoding="utf-8").splitlines()) if m]
    last = [r for r in rows if r[0] == rows[-1][0]]
    return " / ".join(f"{sum(float(r[i]) for r in last) / len(last):.3f}" for i in (1, 2, 3))


def zero_shot(jsonl: Path, run: str) -> str:
    """Test R@1 of the cosine order and of ITM replacing it in the top 16, per style, before any fine-tuning."""
    rows = {r["style"]: r for r in map(json.loads, jsonl.read_text(encoding="utf-8").splitlines())
            if r.get("kind") == "zero_shot" and r["run"] == run}
    return " | ".join(f"{rows[s]['test_R1']:.2f} / {rows[s]['test_R1_rerank']:.2f}" if s in rows else "-"
                      for s in STYLES)


def word_swaps(run: str) -> str:
    """The share of classic val / test captions the ITM logit and the MLM score above their colour swap."""
    path = HERE / f"ws_{run}.json"
    if not path.is_file():
        return "- | -"
    record = json.loads(path.read_text(encoding="utf-8"))
    return " | ".join(f"{record['val']['prefers_caption'][k]:.1f} / {record['test']['prefers_caption'][k]:.1f}"
                      for k in ("itm", "mlm"))


def fine_tuned(run_dir: Path) -> dict[str, float | str] | None:
    """Test R@1 of the cosine order, ITM replacing it and the served blend; the blend weight and val's evidence;
    the share of top-16 (right, wrong) pairs the head orders right minus the cosine's."""
    if not (run_dir / "metrics_test.json").is_file():
        return None
    test = json.loads((run_dir / "metrics_test.json").read_text(encoding="utf-8"))
    val = json.loads((run_dir / "metrics_val.json").read_text(encoding="utf-8"))
    blend, cosine = val["rerank_blend"], test["t2i"]["R1"]
    evidence = blend.get("evidence")
    # val's best weight by evaluation's own rule (alpha 1: before its sign test)
    best, _ = choose_blend_weight({float(w): row for w, row in blend["grid"].items()}, blend["selection_metric"])
    return {"cosine": cosine, "itm": test["t2i_rerank"]["R1"] - cosine, "weight": test["rerank_blend"]["weight"],
            "served": test["t2i_blend"]["R1"] - cosine,
            "pairs": test["itm_pair_accuracy"]["itm"] - test["itm_pair_accuracy"]["cosine"],
            "evidence": f" (best {best:g}" + ("" if evidence is None else f": {evidence['better']}/"
                                                                         f"{evidence['worse']}, p "
                                                                         f"{evidence['p_value']:.3f}") + ")"}


def no_match(run_dir: Path) -> str:
    """Test "no good match" (the rule calibrated on val and carried): right best answers flagged / queries about an
    absent person not flagged, short queries then whole captions, in %."""
    record = json.loads((run_dir / "metrics_test.json").read_text(encoding="utf-8"))["no_match"]
    return " | ".join(f"{record[kind]['right_top1_flagged']:.1f} / {record[kind]['absent_not_flagged']:.1f}"
                      for kind in ("short_queries", "full_captions"))


def head_alone(epochs: int, reads: str) -> str:
    """bench_rerank_ceiling on the classic run: top-16 pairs the head's own part orders right, val / test."""
    path = HERE / "ceiling" / f"{reads.replace(' ', '')}-p{epochs}ep-classic-seed0.json"
    if not path.is_file():
        return "-"
    record = json.loads(path.read_text(encoding="utf-8"))
    return " / ".join(f"{record[s]['pairs_ordered']['itm_head_alone']:.1f}" for s in ("val", "test"))


@user_errors_as_one_line()
def main() -> None:
    lines = ["## Pretrainings", "",
             "| reads | epochs | ITC / ITM / MLM loss, last epoch | zero-shot test R@1 classic, cosine / ITM "
             "replacing | street | cctv | classic captions above their colour swap, ITM val / test | MLM val / test |",
             "|---|---|---|---|---|---|---|---|"]
    for reads, by_epochs in RUNS.items():
        for epochs, (folder, run, _, jsonl) in by_epochs.items():
            lines.append(f"| {reads} | {epochs} | {last_epoch_losses(folder / run / 'log.txt')} | "
                         f"{zero_shot(folder / jsonl, run)} | {word_swaps(run)} |")
    lines += ["", "## Fine-tuned (the re-rank recipe, seed 0)", "",
              "| reads | style | pretraining epochs | test R@1, cosine | ITM replacing, minus cosine | blend weight "
              "chosen on val (val's best weight: val queries it ranks better/worse, sign test p) | served blend "
              "minus cosine | top-16 pairs "
              "ordered right, ITM minus cosine, test | head's own part, pairs ordered right, val / test |",
              "|---|---|---|---|---|---|---|---|---|"]
    gains: dict[str, list[float]] = {"cosine": [], "itm": [], "pairs": []}
    for reads, by_epochs in RUNS.items():
        for style in STYLES:
            found = {e: fine_tuned(folder / f"{prefix}-pretrained-{style}-seed0")
                     for e, (folder, _, prefix, _) in by_epochs.items()}
            for epochs, f in found.items():
                if f is not None:
                    lines.append(f"| {reads} | {style} | {epochs} | {f['cosine']:.2f} | {f['itm']:+.2f} | "
                                 f"{f['weight']:g}{f['evidence']} | {f['served']:+.2f} | {f['pairs']:+.2f} | "
                                 f"{head_alone(epochs, reads) if style == 'classic' else ''} |")
            if all(found.values()):
                for key in gains:
                    gains[key].append(found[24][key] - found[6][key])
    lines += ["", "## No good match on test (the cosine rule, calibrated on val and carried)", "",
              "| reads | style | pretraining epochs | short queries: right best answers flagged / absent people not "
              "flagged, % | whole captions |", "|---|---|---|---|---|"]
    for reads, by_epochs in RUNS.items():
        for style in STYLES:
            for epochs, (folder, _, prefix, _) in by_epochs.items():
                run_dir = folder / f"{prefix}-pretrained-{style}-seed0"
                if (run_dir / "metrics_test.json").is_file():
                    lines.append(f"| {reads} | {style} | {epochs} | {no_match(run_dir)} |")
    lines += ["", f"24 epochs minus 6, over {len(gains['cosine'])} pairs (block 1, then output; classic, street, "
              "cctv, as far as measured):", ""]
    lines += [f"- {key}: {' '.join(f'{g:+.2f}' for g in values)}" for key, values in gains.items()]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
