"""The blend weight chosen on val with and without the sign test (eval.rerank_blend_alpha 0.05 against 1.0, the
rule before), and what each weight does on test. A measurement aid for this folder, from the repository root:
PYTHONPATH=. python bench/results/2026-12-06_blend_evidence/blend_evidence.py OUT.jsonl RUN_DIR [RUN_DIR ...]
PYTHONPATH=. python bench/results/2026-12-06_blend_evidence/blend_evidence.py --summary OUT.jsonl [...]
Each RUN_DIR holds a best.pth (and its tokenizer folder) of a re-rank recipe trained by bench/bench_learning.py
on the set runs/bench_learning/data/<style>-400-seed0 its name names. One evaluation per split: val chooses, the
test grid shows what the weight each rule chose does there."""
import json
import sys
from pathlib import Path

from engine.calibration import choose_blend_weight
from engine.checkpoints import load_for_inference
from engine.data import load_eval_splits
from engine.evaluation import evaluate_model
from utils.errors import user_errors_as_one_line

ALPHA = 0.05


def measured(run: Path) -> dict:
    style = next(s for s in ("classic", "street", "cctv") if s in run.name)
    model, cfg, tokenizer, _ = load_for_inference(
        str(run / "best.pth"), None,
        [f"data.root=runs/bench_learning/data/{style}-400-seed0", f"eval.rerank_blend_alpha={ALPHA}",
         "eval.save_examples=0"], "cpu")
    splits = load_eval_splits(cfg)
    val = evaluate_model(model, splits.val, tokenizer, cfg, "cpu", "val")
    test = evaluate_model(model, splits.test, tokenizer, cfg, "cpu", "test")
    metric = val["rerank_blend"]["selection_metric"]
    val_grid = {float(w): m for w, m in val["rerank_blend"]["grid"].items()}
    before, _ = choose_blend_weight(val_grid, metric, 1.0)
    now = val["rerank_blend"]["weight"]
    test_grid = test["rerank_blend"]["grid"]
    cosine = test_grid["0.0"]["R1"]
    return {"run": run.name, "selection_metric": metric, "val_queries": val["counts"]["queries"],
            "val_gain_of_best": val_grid[before]["R1"] - val_grid[0.0]["R1"],
            "evidence": val["rerank_blend"]["evidence"], "weight_before": before, "weight_now": now,
            "test_cosine_R1": cosine, "test_blend_minus_cosine_before": test_grid[str(before)]["R1"] - cosine,
            "test_blend_minus_cosine_now": test_grid[str(now)]["R1"] - cosine,
            "test_itm_replacing_R1": test["t2i_rerank"]["R1"], "val_grid": val["rerank_blend"]["grid"],
            "test_grid": test_grid}


def summary(rows: list[dict]) -> str:
    lines = ["| run | val: best w, queries better / worse, p | w before -> now | test R@1 cosine | "
             "test blend - cosine, before -> now |", "|---|---|---|---|---|"]
    for r in rows:
        e = r["evidence"] or {}
        val = (f"{r['weight_before']:g}, {e['better']} / {e['worse']}, p {e['p_value']:.3f}" if e
               else f"{r['weight_before']:g}")
        lines.append(f"| {r['run']} | {val} | {r['weight_before']:g} -> {r['weight_now']:g} | "
                     f"{r['test_cosine_R1']:.2f} | {r['test_blend_minus_cosine_before']:+.2f} -> "
                     f"{r['test_blend_minus_cosine_now']:+.2f} |")
    for key in ("before", "now"):
        gains = [r[f"test_blend_minus_cosine_{key}"] for r in rows]
        lines.append(f"\n{key}: test blend - cosine from {min(gains):+.2f} to {max(gains):+.2f}, mean "
                     f"{sum(gains) / len(gains):+.2f}; below the cosine in {sum(g < 0 for g in gains)} of {len(rows)}, "
                     f"above in {sum(g > 0 for g in gains)}")
    return "\n".join(lines)


@user_errors_as_one_line()
def main() -> None:
    if sys.argv[1] == "--summary":
        print(summary([json.loads(line) for path in sys.argv[2:] for line in Path(path).read_text().splitlines()]))
        return
    with Path(sys.argv[1]).open("w") as sink:
        for run in map(Path, sys.argv[2:]):
            sink.write(json.dumps(measured(run)) + "\n")
            sink.flush()
            print(run.name, flush=True)


if __name__ == "__main__":
    main()
