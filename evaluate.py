"""Evaluate a checkpoint (ours or the authors' released one) on a split: tables, metrics_<split>.json, pictures.

    python evaluate.py --checkpoint runs/cuhkpedes/best.pth [--split test] [--save-examples 20]
    python evaluate.py --checkpoint ivt_cuhk.pth --config configs/cuhkpedes.yaml data.root=data/CUHK-PEDES
    torchrun --nproc_per_node 4 evaluate.py --checkpoint runs/cuhkpedes/best.pth

Our checkpoints carry their config; ``--config`` then only replaces the task, data and eval settings (a
pretraining checkpoint evaluates zero-shot on the data.eval_root it was given, or on the one you pass). The authors'
checkpoints carry none, so ``--config`` names the recipe (the architecture is read from the tensors).

Results go next to the checkpoint as metrics_<split>_<checkpoint name>.json (and examples_<split>_<checkpoint
name>/), so a training run's own metrics_<split>.json is never overwritten; --output-dir DIR writes
metrics_<split>.json there instead (still named after the checkpoint when DIR is the checkpoint's folder).
"""
from __future__ import annotations

import argparse
import functools
import logging
from pathlib import Path
from typing import Sequence

from utils.errors import user_errors_as_one_line

logger = logging.getLogger("evaluate")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="our .pth checkpoint or the authors' released one")
    parser.add_argument("--config", default=None, help="recipe YAML: data/eval sections for ours, all for the authors'")
    parser.add_argument("--split", default="test", choices=("train", "val", "test"))
    parser.add_argument("--output-dir", default=None,
                        help="where metrics_<split>.json goes (default: metrics_<split>_<checkpoint name>.json "
                             "in the checkpoint's folder)")
    parser.add_argument("--save-examples", type=int, default=None, metavar="N",
                        help="save PNGs of the top-10 results of N queries (overrides eval.save_examples)")
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. eval.batch_size=128")
    return parser.parse_args(argv)


def output_paths(checkpoint: str | Path, output_dir: str | Path | None, split: str) -> tuple[Path, Path]:
    """(metrics JSON, examples folder) for ``split``: named after the checkpoint in the checkpoint's folder,
    where a training run keeps its own metrics_<split>.json; plain names in a folder of their own."""
    checkpoint = Path(checkpoint).resolve()
    folder = Path(output_dir).resolve() if output_dir else checkpoint.parent
    suffix = f"_{checkpoint.stem}" if folder == checkpoint.parent else ""
    return folder / f"metrics_{split}{suffix}.json", folder / f"examples_{split}{suffix}"


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the evaluation; returns the results dict (the same on every rank). Bad input exits with one line."""
    args = parse_args(argv)
    # Heavy imports after argument parsing, so that --help is instant.
    from engine.checkpoints import load_for_inference
    from engine.data import load_eval_splits
    from engine.evaluation import EvaluationError, evaluate_model, save_examples, write_metrics_json
    from utils import distributed as du
    from utils.checkpoint import model_epoch
    from utils.logging_utils import setup_logging

    device = du.init_distributed(args.device)
    setup_logging(None, du.get_rank())
    overrides = list(args.overrides)
    if args.save_examples is not None:
        overrides.append(f"eval.save_examples={args.save_examples}")
    with user_errors_as_one_line():
        try:
            if args.output_dir and Path(args.output_dir).exists() and not Path(args.output_dir).is_dir():
                raise EvaluationError(f"--output-dir {args.output_dir} is a file, not a folder; name a folder "
                                      "(created when missing)")
            model, cfg, tokenizer, info = load_for_inference(args.checkpoint, args.config, overrides, device)
            epoch = model_epoch(info)
            when = "epoch unknown" if epoch is None else f"epoch {epoch} as in its training log"
            if epoch is not None and info.get("step_in_epoch"):
                when += f", stopped after {info['step_in_epoch']} steps of it"
            logger.info("loaded %s (%s format, %s) on %s", args.checkpoint, info["format"], when, device)
            splits = load_eval_splits(cfg)
            if splits is None:
                source = f"--config {args.config}" if args.config else f"the config stored in {args.checkpoint}"
                raise EvaluationError(f"nothing to evaluate on: {source} has task=pretrain and no data.eval_root; "
                                      "pass data.eval_root=PATH (and data.eval_format=cuhkpedes|icfg|rstp), or a "
                                      "retrieval recipe as --config")
            records = splits.split(args.split)
            results = evaluate_model(model, records, tokenizer, cfg, device, args.split, info.get("calibration"))
            results["epoch"] = epoch
            metrics_path, examples_dir = output_paths(args.checkpoint, args.output_dir, args.split)
            write_metrics_json(metrics_path, results, args.checkpoint, cfg)
            if du.is_main_process():
                logger.info("wrote %s", metrics_path)
                if "examples" in results:
                    from engine.explanation import explain_with

                    explain = functools.partial(explain_with, model, tokenizer, cfg, device)  # "why it matches"
                    written = save_examples(examples_dir, results, records, cfg, explain)
                    logger.info("wrote %d example pictures and index.html to %s",
                                sum(p.suffix == ".png" for p in written), examples_dir)
            du.barrier()
            return results
        finally:
            du.cleanup_distributed()


if __name__ == "__main__":
    main()
