"""How the "no good match" threshold calibrated on val does on test, over many trained models: the rule before
commit 3ebd306 (each set's quantile at its median word count) against the ends fitted where the two sets meet in
length (engine.calibration: eval.no_match_knots [0.75, 0.25], each end no lower than its set's lowest right answer).
A measurement aid for this folder, from the repository root:
PYTHONPATH=. python bench/results/2026-12-06_no_match_fit/calibration_spread.py OUT.jsonl RUN_DIR [RUN_DIR ...]
PYTHONPATH=. python bench/results/2026-12-06_no_match_fit/calibration_spread.py --summary OUT.jsonl [...]
Each RUN_DIR holds a best.pth (and its tokenizer folder) trained by bench/bench_learning.py on the set
runs/bench_learning/data/<style>-400-seed0 its name names. Cosine rule, eval.no_match_quantile 0.08."""
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from datasets.transforms import build_test_transform
from engine.calibration import first_clause, no_match_measure, no_match_rates, no_match_thresholds, word_count
from engine.checkpoints import load_for_inference
from engine.data import load_eval_splits
from engine.encoding import encode_images, encode_texts
from engine.evaluation import build_eval_protocol, query_token_limit
from utils.checkpoint import atomic_save, load_file
from utils.errors import user_errors_as_one_line

QUANTILE = 0.08
KNOTS = (0.75, 0.25)  # eval.no_match_knots


def readable(run: Path, scratch: Path) -> Path:
    """The run's best.pth, or a copy without sampler.neighbour_from_epoch (0 in the runs of commit db76361, a key
    removed since whose 0 is today's behaviour)."""
    checkpoint = load_file(run / "best.pth")
    if "neighbour_from_epoch" not in checkpoint["config"].get("sampler", {}):
        return run / "best.pth"
    assert checkpoint["config"]["sampler"].pop("neighbour_from_epoch") == 0
    atomic_save(checkpoint, scratch / "best.pth")
    if (run / "tokenizer").is_dir():
        shutil.copytree(run / "tokenizer", scratch / "tokenizer")
    return scratch / "best.pth"


def measured(run: Path) -> dict:
    style = next(s for s in ("classic", "street", "cctv") if s in run.name)
    with tempfile.TemporaryDirectory() as scratch:
        model, cfg, tokenizer, _ = load_for_inference(
            str(readable(run, Path(scratch))), None, [f"data.root=runs/bench_learning/data/{style}-400-seed0"], "cpu")
    model.eval()
    splits, out = load_eval_splits(cfg), {}
    with torch.inference_mode():
        for split in ("val", "test"):
            sets = build_eval_protocol(splits.split(split), "standard", cfg.data.format)
            limit = query_token_limit(cfg, "standard")
            images = encode_images(model, sets.image_paths, build_test_transform(cfg.input), 128, "cpu", False, 0)
            for kind, texts in (("short", [first_clause(t) for t in sets.texts]), ("full", list(sets.texts))):
                feats = encode_texts(model, tokenizer, texts, limit, 128, "cpu", False)
                m = no_match_measure(feats, images, sets.query_pids, sets.gallery_pids, 256)
                m["words"] = torch.tensor([word_count(t) for t in texts])
                out[split, kind] = m
    return out


def median_ends(short: dict, full: dict) -> dict:
    """The rule before 3ebd306: each set's quantile of its right answers at its median word count."""
    return {"cosine": {"words": [float(m["words"].float().median()) for m in (short, full)],
                       "values": [float(torch.quantile(m["present_cosine"][m["right"]], QUANTILE))
                                  for m in (short, full)]}}


def summary(rows: list[dict]) -> str:
    """Per rule, over the runs: the median and the range of each rate, and in how many runs right answers
    flagged exceed 10% (a set with no right answer counts as none flagged)."""
    lines = ["| rule | rate | val short | val whole | test short | test whole |", "|---|---|---|---|---|---|"]
    for rule in rows[0]["rules"]:
        for rate, label in (("right_top1_flagged", "right best answers flagged"),
                            ("absent_not_flagged", "absent persons not flagged")):
            cells = []
            for key in ("val_short", "val_full", "test_short", "test_full"):
                rates = [r["rules"][rule][key].get(rate) or 0.0 for r in rows]
                values = torch.tensor(rates, dtype=torch.float64)
                over = (f", > 10% in {sum(v > 10 for v in rates)} of {len(rows)}" if rate == "right_top1_flagged"
                        else "")
                spread = f"{float(values.min()):.1f}-{float(values.max()):.1f}"
                cells.append(f"{float(values.median()):.1f}% ({spread}{over})")
            lines.append(f"| {rule} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


@user_errors_as_one_line()
def main() -> None:
    if sys.argv[1] == "--summary":  # the table of JSONL files already written
        print(summary([json.loads(line) for path in sys.argv[2:] for line in Path(path).read_text().splitlines()]))
        return
    out = Path(sys.argv[1])
    with out.open("w") as sink:
        for run in map(Path, sys.argv[2:]):
            m = measured(run)
            short, full = m["val", "short"], m["val", "full"]
            rules = {"median ends (before)": median_ends(short, full),
                     "fitted ends (now)": no_match_thresholds(short, full, QUANTILE, "cosine", KNOTS)}
            row = {"run": run.name, "rules": {
                name: {"thresholds": th, **{f"{split}_{kind}": no_match_rates(m[split, kind], th)
                                            for split in ("val", "test") for kind in ("short", "full")}}
                for name, th in rules.items()}}
            sink.write(json.dumps(row) + "\n")
            print(run.name, flush=True)


if __name__ == "__main__":
    main()
