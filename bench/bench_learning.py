"""Does a recipe learn pedestrians it was not designed on? Trains one config on every synthetic style and prints
val/test R@1 and mAP per style with chance, wall time and the spread over seeds.

    python bench/bench_learning.py                                   # configs/demo.yaml, 3 styles x 3 seeds
    python bench/bench_learning.py --styles cctv --seeds 0 train.epochs=10     # one style, overrides
    python bench/bench_learning.py --ablation --seeds 0              # faithful / re-rank / no BMM / no MLA
    python bench/bench_learning.py --ablation no-bmm rerank --seeds 0  # some of them
    python bench/bench_learning.py --dry-run                         # print the commands only

The CPU-scale proxy for method research: a change to the objective that helps should help on every style, and
above all on the held-out one (cctv: never tune a recipe on it). Each run is ``train_cuhkpedes.py`` in a child
process (``nice -n 10``), on a synthetic CUHK-PEDES-format dataset written once per style and data seed under
--data-dir. A seed sets the training seed (``seed=``); --vary-data also draws a new dataset per seed.
Results go to --out as JSON lines (one per run) and the table is printed as Markdown.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from datasets.synthetic import HELD_OUT_STYLE, STYLES, make_synthetic  # noqa: E402

# The paper's ablations in miniature: key -> (the variant's name in the table, overrides on the base config; a first
# "@path" replaces the base config).
ABLATION = {
    "ivt": ("IVT (CMPM + MLA + BMM)", []),
    "no-bmm": ("without BMM", ["model.bmm_ratio=0"]),
    "no-mla": ("without MLA (sentence level, one view)", ["text.levels=[sentence]", "input.num_views=1"]),
    "no-bmm-mla": ("without BMM and MLA", ["model.bmm_ratio=0", "text.levels=[sentence]", "input.num_views=1"]),
    "rerank": ("+ fusion, ITC + ITM (re-rank recipe)", ["@configs/demo_rerank.yaml"]),
}


def dataset(data_dir: Path, style: str, num_ids: int, data_seed: int) -> Path:
    root = data_dir / f"{style}-{num_ids}-seed{data_seed}"
    if not (root / "SYNTHETIC.json").is_file():
        partial = root.with_name(root.name + ".partial")
        make_synthetic("cuhkpedes", partial, num_ids=num_ids, seed=data_seed, style=style)
        partial.rename(root)
    return root


def read_run(run_dir: Path) -> dict:
    """Best val (by the run's selection metric) and test metrics of a finished run."""
    evals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if line.strip() and json.loads(line).get("kind") == "eval"]
    best = max(evals, key=lambda r: r["score"]) if evals else {}
    test = json.loads((run_dir / "metrics_test.json").read_text())
    result = {"val_R1": best.get("t2i/R1"), "val_mAP": best.get("t2i/mAP"), "best_epoch": best.get("epoch"),
              "val_curve": [(r["epoch"], round(r["t2i/R1"], 2)) for r in evals],
              "test_R1": test["t2i"]["R1"], "test_R5": test["t2i"]["R5"], "test_mAP": test["t2i"]["mAP"],
              "chance_R1": test["chance_R1"]}
    if "t2i_rerank" in test:  # a fusion recipe: the test split ranked by the ITM head too
        result.update(test_R1_rerank=test["t2i_rerank"]["R1"], test_mAP_rerank=test["t2i_rerank"]["mAP"])
    return result


def train_once(config: str, overrides: list[str], data_root: Path, seed: int, run_dir: Path,
               dry_run: bool) -> dict | None:
    command = ["nice", "-n", "10", sys.executable, str(ROOT / "train_cuhkpedes.py"), "--config", config,
               "--output-dir", str(run_dir), "--overwrite", f"data.root={data_root}", f"seed={seed}",
               "data.synthesize_if_missing=false", *overrides]
    print("$", " ".join(command), flush=True)
    if dry_run:
        return None
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    with open(run_dir.with_suffix(".out"), "w") as log:
        done = subprocess.run(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"training failed (exit {done.returncode}); see {run_dir.with_suffix('.out')}")
    return {**read_run(run_dir), "wall_s": round(seconds, 1)}


def vocabulary_report(root: Path, sizes: tuple[int, ...] = (1000,)) -> list[str]:
    """How a vocabulary learnt on the train captions cuts the test captions: words split into pieces, words split
    into single characters, caption lengths in tokens (the demo learns a 1000-piece vocabulary)."""
    import re
    from collections import Counter

    from datasets.readers import load_annotations
    from datasets.tokenizer import learn_wordpiece_vocab, tokenizer_from_vocab

    splits = load_annotations("cuhkpedes", root)
    test = [r.caption for r in splits.test]
    words = Counter(w for c in test for w in re.findall(r"[a-z0-9'-]+", c.lower()))
    total = sum(words.values())
    lines = []
    for size in sizes:
        vocab = learn_wordpiece_vocab([r.caption for r in splits.train], size)
        tokenizer = tokenizer_from_vocab(vocab, True)
        pieces = {w: tokenizer.tokenize(w) for w in words}
        split = [w for w, p in pieces.items() if len(p) > 1]
        chars = [w for w in split if all(len(p.removeprefix("##")) == 1 for p in pieces[w])]
        lengths = [len(tokenizer(c)["input_ids"]) for c in test]
        lines.append(
            f"{root.name}: vocab_size {size} (learnt {len(vocab)} pieces); test words {len(words)} distinct, "
            f"{len(split)} split ({100 * sum(words[w] for w in split) / total:.1f}% of occurrences), "
            f"{len(chars)} into single characters; tokens per caption mean {sum(lengths) / len(lengths):.1f}, "
            f"max {max(lengths)}")
    return lines


def machine_state() -> str:
    load = os.getloadavg()
    return (f"{os.cpu_count()} CPUs (nproc), load average {load[0]:.2f}/{load[1]:.2f}/{load[2]:.2f}, "
            f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}")


def spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f} ({min(values):.1f}-{max(values):.1f})"


def table(rows: list[dict], label: str) -> str:
    """One line per (label, style): mean ± sample std (min-max) over seeds."""
    lines = [f"| {label} | style | seeds | val R@1 | val mAP | test R@1 | test mAP | chance R@1 | wall time |",
             "|---|---|---|---|---|---|---|---|---|"]
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["variant"], row["style"]), []).append(row)
    for (variant, style), runs in groups.items():
        name = f"{style} (held out)" if style == HELD_OUT_STYLE else style
        walls = [r["wall_s"] for r in runs]
        lines.append(
            f"| {variant} | {name} | {len(runs)} | {spread([r['val_R1'] for r in runs])} | "
            f"{spread([r['val_mAP'] for r in runs])} | {spread([r['test_R1'] for r in runs])} | "
            f"{spread([r['test_mAP'] for r in runs])} | {runs[0]['chance_R1']:.2f} | "
            f"{statistics.mean(walls) / 60:.1f} min |")
        if all("test_R1_rerank" in r for r in runs):
            lines.append(
                f"| {variant}, ITM re-ranked | {name} | {len(runs)} | | | "
                f"{spread([r['test_R1_rerank'] for r in runs])} | {spread([r['test_mAP_rerank'] for r in runs])} | "
                f"{runs[0]['chance_R1']:.2f} | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--styles", nargs="+", default=list(STYLES), choices=STYLES)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--vary-data", action="store_true", help="a new dataset per seed (data seed = seed)")
    parser.add_argument("--num-ids", type=int, default=400, help="identities (15%% of them are test ids)")
    parser.add_argument("--ablation", nargs="*", choices=list(ABLATION), default=None, metavar="VARIANT",
                        help=f"run these variants of the objective (all when none is named): {', '.join(ABLATION)}")
    parser.add_argument("--data-dir", default="runs/bench_learning/data")
    parser.add_argument("--runs-dir", default="runs/bench_learning/runs")
    parser.add_argument("--out", default=None, help="JSON lines file to append each run's result to")
    parser.add_argument("--name", default="recipe", help="the variant's name in the table and run folders")
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--vocabulary", action="store_true",
                        help="no training: how a 1000-piece vocabulary learnt per style cuts its test captions")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every run")
    args = parser.parse_intermixed_args(argv)  # overrides may come before and after the options
    if args.ablation is None:
        variants = {args.name: []}
    else:
        variants = {name: extra for key, (name, extra) in ABLATION.items() if key in (args.ablation or ABLATION)}
    data_dir, runs_dir = Path(args.data_dir), Path(args.runs_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    print(f"machine: {machine_state()}", flush=True)
    if args.vocabulary:
        for style in args.styles:
            print("\n".join(vocabulary_report(dataset(data_dir, style, args.num_ids, 0))), flush=True)
        return []
    rows: list[dict] = []
    for variant, extra in variants.items():
        config = args.config
        if extra and extra[0].startswith("@"):
            config, extra = extra[0][1:], extra[1:]
        for style in args.styles:
            for seed in args.seeds:
                root = dataset(data_dir, style, args.num_ids, seed if args.vary_data else 0)
                tag = "".join(c if c.isalnum() else "-" for c in variant)[:40]
                run_dir = runs_dir / f"{tag}-{style}-seed{seed}"
                result = train_once(config, [*extra, *args.overrides], root, seed, run_dir, args.dry_run)
                if result is None:
                    continue
                row = {"variant": variant, "style": style, "seed": seed, "config": config,
                       "overrides": [*extra, *args.overrides], "num_ids": args.num_ids, **result,
                       "machine": machine_state()}
                rows.append(row)
                print(json.dumps(row), flush=True)
                if args.out:
                    with open(args.out, "a") as handle:
                        handle.write(json.dumps(row) + "\n")
    if rows:
        print(f"\nmachine at the end: {machine_state()}\n")
        print(table(rows, "variant"))
    return rows


if __name__ == "__main__":
    main()
