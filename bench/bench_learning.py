"""Does a recipe learn pedestrians it was not designed on? Trains one config on every synthetic style and prints
val/test R@1 and mAP per style with chance, wall time and the spread over seeds.

    python -m bench.bench_learning                                   # configs/demo.yaml, 3 styles x 3 seeds
    python -m bench.bench_learning --styles cctv --seeds 0 train.epochs=10     # one style, overrides
    python -m bench.bench_learning --ablation --seeds 0              # faithful / re-rank / no BMM / no MLA
    python -m bench.bench_learning --ablation no-bmm rerank --seeds 0  # some of them
    python -m bench.bench_learning --dry-run                         # print the commands only
    python -m bench.bench_learning --pretrain configs/demo_pretrain.yaml   # the pipeline: from scratch and from
                                                                     # the miniature pretraining, every style

The CPU-scale proxy for method research: a change to the objective that helps should help on every style, and
above all on the held-out one (cctv: never tune a recipe on it). Each run is ``train_cuhkpedes.py`` in a child
process (``nice -n 10``), on a synthetic CUHK-PEDES-format dataset written once per style and data seed under
--data-dir. A seed sets the training seed (``seed=``); --vary-data also draws a new dataset per seed.
Results go to --out as JSON lines (one per run) and the table is printed as Markdown.

With --pretrain CONFIG the bench pretrains once (``train_pretrain.py``, into ``--runs-dir/pretrain-<digest>``, the
digest of the resolved config and --pretrain-overrides: a changed config pretrains anew, an unchanged one reuses the
finished run), tests that checkpoint zero-shot on every style (cosine ranking and ITM re-ranking), and then runs each
variant from scratch and ``--init-from`` its last.pth (``--init`` picks one of the two); ``--init-from CHECKPOINT``
fine-tunes every run from a checkpoint made before (no pretraining, no zero-shot test). Every run's row also
records the CMPM losses logged in its first epoch, against the uniform-softmax plateau of bench/bench_collapse.py.
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

from bench.base import machine_line, machine_record
from datasets.synthetic import HELD_OUT_STYLE, TARGET_STYLES, make_synthetic
from utils.errors import user_errors_as_one_line

ROOT = Path(__file__).resolve().parents[1]

MIN_IDS = 3  # one identity per split of the cuhkpedes layout

# The paper's ablations in miniature: key -> (the variant's name in the table, overrides on the base config; a first
# "@path" replaces the base config). Every variant trains the demo's 12 epochs, the re-rank recipe included (its
# config trains 24), so that each row changes one thing.
ABLATION = {
    "ivt": ("IVT (CMPM + MLA + BMM)", []),
    "no-bmm": ("without BMM", ["model.bmm_ratio=0"]),
    "no-mla": ("without MLA (sentence level, one view)", ["text.levels=[sentence]", "input.num_views=1"]),
    "no-bmm-mla": ("without BMM and MLA", ["model.bmm_ratio=0", "text.levels=[sentence]", "input.num_views=1"]),
    "rerank": ("+ fusion, ITC + ITM (re-rank recipe)", ["@configs/demo_rerank.yaml", "train.epochs=12"]),
}


def dataset(data_dir: Path, style: str, num_ids: int, data_seed: int) -> Path:
    root = data_dir / f"{style}-{num_ids}-seed{data_seed}"
    if not (root / "SYNTHETIC.json").is_file():
        partial = root.with_name(root.name + ".partial")
        make_synthetic("cuhkpedes", partial, num_ids=num_ids, seed=data_seed, style=style)
        partial.rename(root)
    return root


def records_since(run_dir: Path, since: float) -> list[dict]:
    """The metrics.jsonl records the run started at ``since`` (time.time()) wrote: --overwrite already sets an
    earlier run's file aside; the time keeps a record of any other run out of this one's numbers."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in records if r.get("time", 0) >= since]


def read_run(run_dir: Path, since: float = 0.0) -> dict:
    """Best val (by the run's selection metric) and test metrics of a finished run started at ``since``, and the
    CMPM losses logged in its first epoch (is it still on the uniform-softmax plateau of bench/bench_collapse.py?)."""
    records = records_since(run_dir, since)
    if (run_dir / "metrics_test.json").stat().st_mtime < since:
        raise SystemExit(f"{run_dir / 'metrics_test.json'} is older than the run that just finished")
    evals = [r for r in records if r.get("kind") == "eval"]
    first_epoch_cmpm = [round(r["cmpm_loss"], 2) for r in records
                        if r.get("kind") == "train" and r.get("epoch") == 0 and "cmpm_loss" in r]
    best = max(evals, key=lambda r: r["score"]) if evals else {}
    test = json.loads((run_dir / "metrics_test.json").read_text())
    result = {"val_R1": best.get("t2i/R1"), "val_mAP": best.get("t2i/mAP"), "best_epoch": best.get("epoch"),
              "val_curve": [(r["epoch"], round(r["t2i/R1"], 2)) for r in evals],
              "test_R1": test["t2i"]["R1"], "test_R5": test["t2i"]["R5"], "test_mAP": test["t2i"]["mAP"],
              "chance_R1": test["chance_R1"], "first_epoch_cmpm": first_epoch_cmpm}
    if "t2i_rerank" in test:  # a fusion recipe: the test split ranked by the ITM head too
        result.update(test_R1_rerank=test["t2i_rerank"]["R1"], test_mAP_rerank=test["t2i_rerank"]["mAP"])
    if "t2i_blend" in test:  # and by the cosine + ITM blend at the weight chosen on val
        result.update(test_R1_blend=test["t2i_blend"]["R1"], test_mAP_blend=test["t2i_blend"]["mAP"],
                      blend_weight=test["rerank_blend"]["weight"], itm_pair_accuracy=test.get("itm_pair_accuracy"))
    return result


def run_child(command: list[str], log_path: Path) -> float:
    """Runs one training script (niced, offline); returns its wall time in seconds, stops the bench on failure."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    with open(log_path, "w") as log:
        done = subprocess.run(["nice", "-n", "10", *command], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise SystemExit(f"training failed (exit {done.returncode}); see {log_path}")
    return time.perf_counter() - start


def train_once(config: str, overrides: list[str], data_root: Path, seed: int, run_dir: Path,
               dry_run: bool, init_from: Path | None = None) -> dict | None:
    command = [sys.executable, str(ROOT / "train_cuhkpedes.py"), "--config", config,
               "--output-dir", str(run_dir), "--overwrite", f"data.root={data_root}", f"seed={seed}",
               "data.synthesize_if_missing=false", *(["--init-from", str(init_from)] if init_from else []),
               *overrides]
    print("$", " ".join(command), flush=True)
    if dry_run:
        return None
    started = time.time()
    seconds = run_child(command, run_dir.with_suffix(".out"))
    return {**read_run(run_dir, since=started), "wall_s": round(seconds, 1)}


def zero_shot(checkpoint: Path, data_root: Path, out_dir: Path, rerank_top_k: int) -> dict:
    """Test metrics of the pretrained checkpoint itself on ``data_root`` (cosine ranking, and ITM re-ranking of
    the top ``rerank_top_k`` when > 0)."""
    command = [sys.executable, str(ROOT / "evaluate.py"), "--checkpoint", str(checkpoint), "--output-dir",
               str(out_dir), f"data.eval_root={data_root}", f"eval.rerank_top_k={rerank_top_k}"]
    out_dir.mkdir(parents=True, exist_ok=True)
    run_child(command, out_dir.with_suffix(".out"))
    test = json.loads((out_dir / "metrics_test.json").read_text())
    result = {"test_R1": test["t2i"]["R1"], "test_mAP": test["t2i"]["mAP"], "chance_R1": test["chance_R1"]}
    if "t2i_rerank" in test:
        result.update(test_R1_rerank=test["t2i_rerank"]["R1"], test_mAP_rerank=test["t2i_rerank"]["mAP"])
    return result


def pretrain_run_dir(config: str, overrides: list[str], runs_dir: Path) -> Path:
    """Where the pretraining of ``config`` + ``overrides`` lives: named by the resolved config's digest, so a
    changed config (or override) pretrains anew and an unchanged one reuses the checkpoint."""
    from utils.config import load_config

    return runs_dir / f"pretrain-{load_config(config).replace(overrides).digest()}"


def pretrain_once(config: str, overrides: list[str], runs_dir: Path, dry_run: bool) -> tuple[Path, dict]:
    """(last.pth of the pretraining, its record), pretraining only when no finished run of this config exists.

    A run counts as finished once ``PRETRAINED.json`` (written after the child exits 0) is there; its zero-shot
    curve on data.eval_root comes from the run's metrics.jsonl.
    """
    run_dir = pretrain_run_dir(config, overrides, runs_dir)
    marker = run_dir / "PRETRAINED.json"
    command = [sys.executable, str(ROOT / "train_pretrain.py"), "--config", config, "--output-dir", str(run_dir),
               "--overwrite", *overrides]
    if marker.is_file():
        print(f"pretraining: cached {run_dir} (config digest {run_dir.name[9:]})", flush=True)
        return run_dir / "last.pth", json.loads(marker.read_text())
    print("$", " ".join(command), flush=True)
    if dry_run:
        return run_dir / "last.pth", {}
    started = time.time()
    seconds = run_child(command, run_dir.with_suffix(".out"))
    evals = [r for r in records_since(run_dir, started) if r.get("kind") == "eval"]
    record = {"config": config, "overrides": overrides, "wall_s": round(seconds, 1), "machine": machine_record("cpu"),
              "zero_shot_val_curve": [[r["epoch"], round(r["t2i/R1"], 2)] for r in evals]}
    marker.write_text(json.dumps(record, indent=1))
    return run_dir / "last.pth", record


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
        variant = row["variant"] if row.get("init", "scratch") == "scratch" else f"{row['variant']}, pretrained"
        groups.setdefault((variant, row["style"]), []).append(row)
    for (variant, style), runs in groups.items():
        name = f"{style} (held out)" if style == HELD_OUT_STYLE else style
        walls = [r["wall_s"] for r in runs]
        lines.append(
            f"| {variant} | {name} | {len(runs)} | {spread([r['val_R1'] for r in runs])} | "
            f"{spread([r['val_mAP'] for r in runs])} | {spread([r['test_R1'] for r in runs])} | "
            f"{spread([r['test_mAP'] for r in runs])} | {runs[0]['chance_R1']:.2f} | "
            f"{statistics.mean(walls) / 60:.1f} min |")
        for key, label in (("rerank", "ITM re-ranked"), ("blend", "cosine + ITM blend")):
            if all(f"test_R1_{key}" in r for r in runs):
                lines.append(
                    f"| {variant}, {label} | {name} | {len(runs)} | | | "
                    f"{spread([r[f'test_R1_{key}'] for r in runs])} | {spread([r[f'test_mAP_{key}'] for r in runs])} | "
                    f"{runs[0]['chance_R1']:.2f} | |")
    return "\n".join(lines)


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace, data_dir: Path, runs_dir: Path) -> None:
    """Refuse, before the first run, what would fail after it (and lose the bench's later runs)."""
    if args.num_ids < MIN_IDS:
        parser.error(f"--num-ids must be at least {MIN_IDS} (train, val and test identities), got {args.num_ids}")
    for flag, folder in (("--data-dir", data_dir), ("--runs-dir", runs_dir)):
        if folder.exists() and not folder.is_dir():
            parser.error(f"{flag} {folder} is a file, not a folder")
    if args.init_from and args.pretrain:
        parser.error("give --pretrain (pretrain, then fine-tune from it) or --init-from (fine-tune from a "
                     "checkpoint), not both")
    if args.init_from and not Path(args.init_from).is_file():
        parser.error(f"--init-from {args.init_from}: no such file")
    if args.out and not Path(args.out).parent.is_dir():
        parser.error(f"--out {args.out}: the folder {Path(args.out).parent} does not exist")


def tables_of(rows: list[dict]) -> str:
    """The training rows' table, then the zero-shot rows of a pretrained checkpoint (one line per style and
    re-ranking depth)."""
    runs = [r for r in rows if r.get("kind") != "zero_shot"]
    lines = [table(runs, "variant")] if runs else []
    zero_shot = [r for r in rows if r.get("kind") == "zero_shot"]
    if zero_shot:
        lines += ["", "| pretrained checkpoint, zero-shot | style | test R@1 | test mAP | ITM re-ranked R@1 / mAP | "
                      "chance R@1 |", "|---|---|---|---|---|---|"]
        for r in zero_shot:
            rerank = (f"{r['test_R1_rerank']:.1f} / {r['test_mAP_rerank']:.1f}" if "test_R1_rerank" in r else "")
            lines.append(f"| {r['run']} | {r['style']} | {r['test_R1']:.1f} | {r['test_mAP']:.1f} | {rerank} | "
                         f"{r['chance_R1']:.2f} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The options; what would fail after the first run is refused here (and would lose the later runs)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--styles", nargs="+", default=list(TARGET_STYLES), choices=TARGET_STYLES)
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
    parser.add_argument("--pretrain", default=None, metavar="CONFIG",
                        help="pretrain once with this config (e.g. configs/demo_pretrain.yaml; cached by its digest "
                             "under --runs-dir) and run every variant initialised from its last.pth too")
    parser.add_argument("--pretrain-overrides", nargs="*", default=[], metavar="key=value",
                        help="overrides for the pretraining run only")
    parser.add_argument("--zero-shot-top-k", type=int, default=16,
                        help="with --pretrain: ITM re-ranking depth of the pretrained model's zero-shot test")
    parser.add_argument("--init-from", default=None, metavar="CHECKPOINT",
                        help="instead of --pretrain: fine-tune every run from this checkpoint (an earlier "
                             "pretraining's last.pth, for instance one another commit's config digest names)")
    parser.add_argument("--init", nargs="+", choices=("scratch", "pretrained"), default=None,
                        help="with --pretrain: which starting points to run (default both)")
    parser.add_argument("--table", nargs="+", default=None, metavar="JSONL",
                        help="no training: print the tables of result files written with --out")
    parser.add_argument("--vocabulary", action="store_true",
                        help="no training: how a 1000-piece vocabulary learnt per style cuts its test captions")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every run")
    args = parser.parse_intermixed_args(argv)  # overrides may come before and after the options
    check_arguments(parser, args, Path(args.data_dir), Path(args.runs_dir))
    return args


def emit(row: dict, out: str | None) -> None:
    """Print one result row and append it to the --out JSON lines file."""
    print(json.dumps(row), flush=True)
    if out:
        with open(out, "a") as handle:
            handle.write(json.dumps(row) + "\n")


def starting_points(args: argparse.Namespace, data_dir: Path, runs_dir: Path) -> tuple[dict, dict]:
    """({init: checkpoint or None}, the pretraining's record); with --pretrain, pretrains (or finds the cached run)
    and emits its zero-shot test on every style first."""
    if args.init_from:
        return {"pretrained": Path(args.init_from)}, {}
    if not args.pretrain:
        return {"scratch": None}, {}
    checkpoint, pretraining = pretrain_once(args.pretrain, args.pretrain_overrides, runs_dir, args.dry_run)
    if pretraining:
        print(f"pretraining: {json.dumps(pretraining)}", flush=True)
    for style in args.styles if not args.dry_run else ():
        root = dataset(data_dir, style, args.num_ids, 0)
        result = zero_shot(checkpoint, root, checkpoint.parent / f"zero-shot-{style}", args.zero_shot_top_k)
        emit({"kind": "zero_shot", "style": style, "run": checkpoint.parent.name, **result}, args.out)
    starts = {init: (checkpoint if init == "pretrained" else None) for init in (args.init or ("scratch", "pretrained"))}
    return starts, pretraining


@user_errors_as_one_line()
def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.ablation is None:
        variants = {args.name: []}
    else:
        variants = {name: extra for key, (name, extra) in ABLATION.items() if key in (args.ablation or ABLATION)}
    data_dir, runs_dir = Path(args.data_dir), Path(args.runs_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    print(machine_line(machine_record("cpu")), flush=True)
    if args.vocabulary:
        for style in args.styles:
            print("\n".join(vocabulary_report(dataset(data_dir, style, args.num_ids, 0))), flush=True)
        return []
    if args.table:
        print(tables_of([json.loads(line) for name in args.table for line in Path(name).read_text().splitlines()
                         if line.strip()]))
        return []
    starts, pretraining = starting_points(args, data_dir, runs_dir)
    rows: list[dict] = []
    for variant, extra in variants.items():
        config = args.config
        if extra and extra[0].startswith("@"):
            config, extra = extra[0][1:], extra[1:]
        tag = "".join(c if c.isalnum() else "-" for c in variant)[:40]
        for init, checkpoint in starts.items():
            for style in args.styles:
                for seed in args.seeds:
                    root = dataset(data_dir, style, args.num_ids, seed if args.vary_data else 0)
                    result = train_once(config, [*extra, *args.overrides], root, seed,
                                        runs_dir / f"{tag}-{init}-{style}-seed{seed}", args.dry_run, checkpoint)
                    if result is None:
                        continue
                    row = {"variant": variant, "init": init, "style": style, "seed": seed, "config": config,
                           "overrides": [*extra, *args.overrides], "num_ids": args.num_ids, **result,
                           "machine": machine_record("cpu")}
                    if checkpoint is not None:
                        row["pretraining"] = {"run": checkpoint.parent.name, **pretraining}
                    rows.append(row)
                    emit(row, args.out)
    if rows:
        print(f"\nat the end: {machine_line(machine_record('cpu'))}\n")
        print(table(rows, "variant"))
    return rows


if __name__ == "__main__":
    main()
