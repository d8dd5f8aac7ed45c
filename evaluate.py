"""Evaluate a checkpoint (ours or the authors' released one) on a split: tables, metrics_<split>.json, pictures.

    python evaluate.py --checkpoint runs/cuhkpedes/best.pth [--split test] [--save-examples 20]
    python evaluate.py --checkpoint ivt_cuhk.pth --config configs/cuhkpedes.yaml data.root=data/CUHK-PEDES
    torchrun --nproc_per_node 4 evaluate.py --checkpoint runs/cuhkpedes/best.pth

Our checkpoints carry their config; ``--config`` then only replaces the task, data and eval settings (a
pretraining checkpoint evaluates zero-shot on the data.eval_root it was given, or on the one you pass). The authors'
checkpoints carry none, so ``--config`` names the recipe (the architecture is read from the tensors).
"""
from __future__ import annotations

import argparse
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
                        help="where metrics_<split>.json goes (default: the checkpoint's folder)")
    parser.add_argument("--save-examples", type=int, default=None, metavar="N",
                        help="save PNGs of the top-10 results of N queries (overrides eval.save_examples)")
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. eval.batch_size=128")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the evaluation; returns the results dict (the same on every rank). Bad input exits with one line."""
    args = parse_args(argv)
    # Heavy imports after argument parsing, so that --help is instant.
    from engine.checkpoints import load_for_inference
    from engine.data import load_eval_splits
    from engine.evaluation import EvaluationError, evaluate_model, save_examples, write_metrics_json
    from utils import distributed as du
    from utils.logging_utils import setup_logging

    device = du.init_distributed(args.device)
    setup_logging(None, du.get_rank())
    overrides = list(args.overrides)
    if args.save_examples is not None:
        overrides.append(f"eval.save_examples={args.save_examples}")
    with user_errors_as_one_line():
        try:
            model, cfg, tokenizer, info = load_for_inference(args.checkpoint, args.config, overrides, device)
            logger.info("loaded %s (%s format, epoch %s) on %s", args.checkpoint, info["format"], info.get("epoch"),
                        device)
            splits = load_eval_splits(cfg)
            if splits is None:
                raise EvaluationError(f"{args.checkpoint} is a pretraining checkpoint without an evaluation set: "
                                      "pass data.eval_root=PATH (and data.eval_format=cuhkpedes|icfg|rstp)")
            records = splits.split(args.split)
            results = evaluate_model(model, records, tokenizer, cfg, device, args.split)
            output_dir = Path(args.output_dir) if args.output_dir else Path(args.checkpoint).resolve().parent
            metrics_path = output_dir / f"metrics_{args.split}.json"
            write_metrics_json(metrics_path, results, args.checkpoint, cfg)
            if du.is_main_process():
                logger.info("wrote %s", metrics_path)
                if "examples" in results:
                    written = save_examples(output_dir / f"examples_{args.split}", results, records)
                    logger.info("wrote %d example pictures to %s", len(written), output_dir / f"examples_{args.split}")
            du.barrier()
            return results
        finally:
            du.cleanup_distributed()


if __name__ == "__main__":
    main()
