"""How far "no good match" moves on new people: val's held-out spread against test, at several quantiles.

    PYTHONPATH=. python bench/results/2026-12-06_no_match_held_out/held_out.py OUT.jsonl CHECKPOINT DATA_ROOT \
        [--quantiles 0.04 0.05 0.06 0.07 0.08]

For one checkpoint and the synthetic set it was trained on, per quantile: engine.calibration.calibrate_no_match on
val as evaluation runs it (every clause as short queries, eval.no_match_held_out_splits half-splits of val's people
refitted and read on the other half), its record carried to test as training carries it (``--calibrate-on test``:
the roles swapped). Appends one JSON line per
quantile: val's held-out percentiles, the rates on val and on test, the thresholds, the machine.
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


def encoded_splits(checkpoint: str, data_root: str) -> tuple[dict, object]:
    """Each split's protocol, image features and a cached text encoder (the texts are encoded once)."""
    model, cfg, tokenizer, _ = load_for_inference(checkpoint, None, [f"data.root={data_root}"], "cpu")
    splits = load_eval_splits(cfg)
    limit = query_token_limit(cfg, "standard")
    cache: dict[str, torch.Tensor] = {}

    def encode(texts):
        missing = [t for t in dict.fromkeys(texts) if t not in cache]
        if missing:
            with torch.inference_mode():
                cache.update(zip(missing, encode_texts(model, tokenizer, missing, limit, 64, "cpu", False)))
        return torch.stack([cache[t] for t in texts])

    out = {}
    for split in ("val", "test"):
        sets = build_eval_protocol(splits.split(split), "standard", cfg.data.format)
        with torch.inference_mode():
            images = encode_images(model, sets.image_paths, build_test_transform(cfg.input), 64, "cpu", False, 0)
        out[split] = (sets, images)
    return out, (encode, cfg)


@user_errors_as_one_line()
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out")
    parser.add_argument("checkpoint")
    parser.add_argument("data_root")
    parser.add_argument("--quantiles", type=float, nargs="+", default=[0.04, 0.05, 0.06, 0.07, 0.08])
    parser.add_argument("--calibrate-on", choices=("val", "test"), default="val",
                        help="test: the roles swapped, the rule fitted on test and carried to val")
    parser.add_argument("--quantile-on", choices=("fitted_people", "new_people"), default="fitted_people",
                        help="eval.no_match_quantile_on (from 3366e01; runs.jsonl was made before, as fitted_people)")
    args = parser.parse_args(argv)
    splits, (encode, cfg) = encoded_splits(args.checkpoint, args.data_root)
    for quantile in args.quantiles:
        ev = cfg.replace([f"eval.no_match_quantile={quantile}", f"eval.no_match_quantile_on={args.quantile_on}"]).eval
        record, carried = {"checkpoint": args.checkpoint, "data_root": args.data_root, "quantile": quantile,
                           "quantile_on": args.quantile_on, "calibrated_on": args.calibrate_on}, None
        for split in (("val", "test") if args.calibrate_on == "val" else ("test", "val")):
            sets, images = splits[split]
            result = calibrate_no_match(encode, sets.texts, encode(sets.texts), images, sets.query_pids,
                                        sets.gallery_pids, 4096, ev, carried)
            carried = carried or result
            record[split] = {kind: result[kind] for kind in ("short_queries", "full_captions")}
        record.update(held_out=carried["held_out"], thresholds=carried["thresholds"],
                      fitted_quantile=carried.get("fitted_quantile", quantile), machine=machine_record("cpu"))
        with open(args.out, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        print(quantile, round(record["fitted_quantile"], 4),
              {s: {k: round(record[s][k]["right_top1_flagged"], 1) for k in record[s]} for s in ("val", "test")},
              {k: [round(v, 1) for v in record["held_out"][k]["right_top1_flagged"]]
               for k in ("short_queries", "full_captions")})


if __name__ == "__main__":
    main()
