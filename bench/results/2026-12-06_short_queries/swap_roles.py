"""The "no good match" rule calibrated on test and carried to val: the roles of compare_short_queries.py swapped.

    PYTHONPATH=. python bench/results/2026-12-06_short_queries/swap_roles.py CHECKPOINT DATA_ROOT [...]

If test flags more right answers than val when val calibrates, either test's right answers score lower (a property
of the people drawn) or the fit is optimistic on the split it was fitted to (then val, calibrated on test, would
show the same excess). Prints, per model, the right short answers and the share of them and of the whole captions'
right answers flagged on test (where it was calibrated) and on val (where it was carried), with the config's
``eval.no_match_short_queries``.
"""
from __future__ import annotations

import sys

import torch

from datasets.transforms import build_test_transform
from engine.calibration import calibrate_no_match
from engine.checkpoints import load_for_inference
from engine.data import load_eval_splits
from engine.encoding import encode_images, encode_texts
from engine.evaluation import build_eval_protocol, query_token_limit
from utils.errors import user_errors_as_one_line


@user_errors_as_one_line()
def main(argv: list[str] | None = None) -> None:
    args = argv or sys.argv[1:]
    for checkpoint, data_root in zip(args[::2], args[1::2]):
        model, cfg, tokenizer, _ = load_for_inference(checkpoint, None, [f"data.root={data_root}"], "cpu")
        splits = load_eval_splits(cfg)
        limit = query_token_limit(cfg, "standard")
        carried, rates = None, {}
        with torch.inference_mode():
            for split in ("test", "val"):
                sets = build_eval_protocol(splits.split(split), "standard", cfg.data.format)
                images = encode_images(model, sets.image_paths, build_test_transform(cfg.input), 64, "cpu", False, 0)

                def encode(texts):
                    return encode_texts(model, tokenizer, texts, limit, 64, "cpu", False)

                result = calibrate_no_match(encode, sets.texts, encode(sets.texts), images, sets.query_pids,
                                            sets.gallery_pids, 4096, cfg.eval, carried)
                carried = carried or result
                short, whole = result["short_queries"], result["full_captions"]
                rates[split] = (f"{short['queries_answered_right']} right short answers, "
                                f"{short['right_top1_flagged']:.1f}% flagged; whole captions "
                                f"{whole['right_top1_flagged']:.1f}%")
        print(f"{checkpoint}: calibrated on test: {rates['test']}; carried to val: {rates['val']}")


if __name__ == "__main__":
    main()
