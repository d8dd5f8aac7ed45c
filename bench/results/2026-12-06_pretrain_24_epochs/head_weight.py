"""Would the residual head help if it weighed more? For a re-rank checkpoint with ``model.itm_residual``, test
R@1 (val and test) of ranking each query's cosine top 16 by prior + factor x head, the prior being cosine /
temperature and the head the match logit minus it: factor 0 is the cosine order, 1 the ITM logit.

    PYTHONPATH=. python bench/results/2026-12-06_pretrain_24_epochs/head_weight.py CHECKPOINT DATA_ROOT \
        >> head_weight.jsonl
"""
from __future__ import annotations

import json
import sys
from argparse import Namespace

import torch
import torch.nn.functional as F

from utils.errors import user_errors_as_one_line

FACTORS = (0, 1, 2, 4, 8, 16, 32, 64)
TOP_K = 16


@user_errors_as_one_line()
def main() -> None:
    from bench.base import machine_record
    from bench.bench_no_match import load_checkpoint
    from datasets.transforms import build_test_transform
    from engine.encoding import encode_images, encode_texts, rerank_scores
    from engine.evaluation import build_eval_protocol, query_token_limit

    checkpoint, root = sys.argv[1], sys.argv[2]
    model, cfg, tokenizer, splits = load_checkpoint(Namespace(checkpoint=checkpoint, data_root=root,
                                                              root_key="data.root"))
    if not model.config.itm_residual:
        raise SystemExit(f"{checkpoint}: model.itm_residual is false, its match logit has no prior to split off")
    record = {"checkpoint": checkpoint, "top_k": TOP_K}
    transform, limit = build_test_transform(cfg.input), query_token_limit(cfg, "standard")
    with torch.inference_mode():
        for split in ("val", "test"):
            sets = build_eval_protocol(splits.split(split), "standard", cfg.data.format)
            images = F.normalize(encode_images(model, sets.image_paths, transform, 64, "cpu", False, 0).float(), dim=-1)
            queries = F.normalize(encode_texts(model, tokenizer, list(sets.texts), limit, 64, "cpu", False).float(),
                                  dim=-1)
            cosine, top = (queries @ images.T).topk(TOP_K, dim=1)  # [Q, k]
            itm = rerank_scores(model, tokenizer, list(sets.texts), sets.image_paths, top, transform, limit, 64,
                                "cpu", False, 0)
            prior = cosine / float(model.temperature)
            right = sets.gallery_pids[top] == sets.query_pids[:, None]  # [Q, k]
            record[split] = {str(f): round(100 * right.gather(1, (prior + f * (itm - prior)).argmax(dim=1,
                             keepdim=True)).float().mean().item(), 2) for f in FACTORS}
    print(json.dumps({**record, "machine": machine_record("cpu")}))


if __name__ == "__main__":
    main()
