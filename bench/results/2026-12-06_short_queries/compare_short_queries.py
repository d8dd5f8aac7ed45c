"""The "no good match" rule calibrated on val with each kind of short query, applied to val and test.

    PYTHONPATH=. python bench/results/2026-12-06_short_queries/compare_short_queries.py OUT.jsonl CHECKPOINT DATA_ROOT
    PYTHONPATH=. python bench/results/2026-12-06_short_queries/compare_short_queries.py --calibrate-on test \
        OUT.jsonl CHECKPOINT DATA_ROOT

For one checkpoint and the synthetic set it was trained on: engine.calibration.calibrate_no_match, as evaluation
runs it, with ``eval.no_match_short_queries`` first_clause and then clauses; the record of the split it was
calibrated on is carried to the other one as training carries it. ``--calibrate-on test`` swaps the roles (clauses
only): if test flags more right answers than val when val calibrates, either test's right answers score lower (a
property of the people drawn) or the fit is optimistic where it was fitted, and then val, calibrated on test, would
show the same excess. Appends one JSON line per kind: the thresholds, and per split and query set the queries, the
right best answers, the share of those flagged and the share of absent-person queries not flagged.
"""
from __future__ import annotations

import argparse
import json

import torch

from bench.base import machine_record
from datasets.transforms import build_test_transform
from engine.calibration import calibrate_no_match
from engine.checkpoints import load_for_inference
from engine.data import load_eval_splits
from engine.encoding import encode_images, encode_texts
from engine.evaluation import build_eval_protocol, query_token_limit
from utils.errors import user_errors_as_one_line


def measured(checkpoint: str, data_root: str, how: str, order: tuple[str, str]) -> dict:
    """The record of one kind of short query: calibrated on order[0], carried to order[1]."""
    model, cfg, tokenizer, _ = load_for_inference(
        checkpoint, None, [f"data.root={data_root}", f"eval.no_match_short_queries={how}"], "cpu")
    splits = load_eval_splits(cfg)
    limit = query_token_limit(cfg, "standard")
    record, carried = {"checkpoint": checkpoint, "data_root": data_root, "short_queries": how,
                       "calibrated_on": order[0]}, None
    with torch.inference_mode():
        for split in order:
            sets = build_eval_protocol(splits.split(split), "standard", cfg.data.format)
            images = encode_images(model, sets.image_paths, build_test_transform(cfg.input), 64, "cpu", False, 0)

            def encode(texts):
                return encode_texts(model, tokenizer, texts, limit, 64, "cpu", False)

            result = calibrate_no_match(encode, sets.texts, encode(sets.texts), images, sets.query_pids,
                                        sets.gallery_pids, 4096, cfg.eval, carried)
            carried = carried or result
            record[split] = {kind: result[kind] for kind in ("short_queries", "full_captions")}
    record.update(thresholds=carried["thresholds"], machine=machine_record("cpu"))
    return record


@user_errors_as_one_line()
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out")
    parser.add_argument("checkpoint")
    parser.add_argument("data_root")
    parser.add_argument("--calibrate-on", choices=("val", "test"), default="val")
    args = parser.parse_args(argv)
    order = ("val", "test") if args.calibrate_on == "val" else ("test", "val")
    kinds = ("first_clause", "clauses") if args.calibrate_on == "val" else ("clauses",)
    for how in kinds:
        record = measured(args.checkpoint, args.data_root, how, order)
        with open(args.out, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        print(how, {s: {k: {m: record[s][k].get(m) for m in ("queries_answered_right", "right_top1_flagged",
                                                               "absent_not_flagged")}
                        for k in record[s]} for s in order})


if __name__ == "__main__":
    main()
