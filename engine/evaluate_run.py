"""What ``python evaluate.py`` does once its arguments are parsed (engine/evaluate_cli.py): load any checkpoint or
model folder, evaluate one split, write its metrics file and example pictures."""
from __future__ import annotations

import argparse
import functools
import logging
from pathlib import Path

from engine.checkpoints import load_for_inference
from engine.data import load_eval_splits
from engine.evaluation import EvaluationError, evaluate_model, save_examples, write_metrics_json
from engine.explanation import explain_with
from utils import distributed as du
from utils.checkpoint import atomic_save, check_writable_folder, model_epoch
from utils.errors import user_errors_as_one_line
from utils.logging_utils import setup_logging

logger = logging.getLogger("evaluate")


def features_path(metrics_path: Path) -> Path:
    """features_<split>[_<checkpoint name>].pt beside metrics_<split>[_<checkpoint name>].json."""
    return metrics_path.with_name("features" + metrics_path.stem.removeprefix("metrics") + ".pt")


def save_features(path: Path, features: dict, args: argparse.Namespace, results: dict) -> None:
    """Write engine.evaluation.feature_record's dict, with the checkpoint, split and epoch it came from
    (atomically: torch.load reads it back, weights_only included)."""
    atomic_save({"format": "ivt-eval-features", "checkpoint": str(args.checkpoint), "split": args.split,
                 "epoch": results.get("epoch"), **features}, path)
    logger.info("wrote %s (%d text and %d image features)", path, len(features["texts"]),
                len(features["image_paths"]))


def evaluate_checkpoint(args: argparse.Namespace, metrics_path: Path, examples_dir: Path) -> dict:
    """Evaluate ``args.checkpoint`` on ``args.split`` (in a process group when launched by torchrun); returns
    the results dict, the same on every rank."""
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
            check_writable_folder(metrics_path.parent, f"the metrics file {metrics_path.name} (--output-dir)")
            if int(cfg.eval.save_examples) > 0:
                check_writable_folder(examples_dir, "the example pictures' folder (--save-examples)")
            results = evaluate_model(model, records, tokenizer, cfg, device, args.split, info.get("calibration"),
                                     keep_features=bool(getattr(args, "save_features", False)))
            results["epoch"] = epoch
            features = results.pop("features", None)
            write_metrics_json(metrics_path, results, args.checkpoint, cfg)
            if features is not None and du.is_main_process():
                save_features(features_path(metrics_path), features, args, results)
            if du.is_main_process():
                logger.info("wrote %s", metrics_path)
                if "examples" in results:
                    explain = functools.partial(explain_with, model, tokenizer, cfg, device)  # "why it matches"
                    written = save_examples(examples_dir, results, records, cfg, explain)
                    logger.info("wrote %d example pictures and index.html to %s",
                                sum(p.suffix == ".png" for p in written), examples_dir)
            du.barrier()
            return results
        finally:
            du.cleanup_distributed()
