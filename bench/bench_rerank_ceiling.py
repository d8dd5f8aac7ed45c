"""How much could re-ranking the cosine top k gain, and how much of it does the ITM head see? (classic style)

    python -m bench.bench_rerank_ceiling --checkpoint runs/demo_rerank/best.pth \
        --data-root data/synthetic-cuhkpedes --out bench/results/rerank_ceiling.json

For the test (and val) split of a classic-style synthetic set, each caption ranks the split's gallery by cosine. The
generator's identities are drawn again (bench.bench_no_match), and a top-k image *fits* a caption when its person
shares every attribute the caption names. Reported per split:

- ``verifier_R1``: the R@1 of a perfect attribute checker that moves the fitting images of the top k ahead of the
  others, cosine order kept otherwise: what a re-ranker reading only the caption could reach. Beside it the cosine's
  R@1 and how often the right person is in the top k at all.
- ``wrong_first_fits``: queries whose wrong #1 fits the caption (a tie no re-ranker can break), and per attribute,
  how often the wrong #1 contradicts the caption on it (``wrong_first_contradicts``).
- ``pairs_ordered``: the share of (right, wrong) image pairs of the top k each score orders right
  (engine.calibration.itm_pair_accuracy): the cosine, the ITM match logit (what evaluation re-ranks by), and with
  ``model.itm_residual`` the head's own part (the match logit minus cosine / temperature): above 50% it adds
  knowledge of its own, below 50% it mostly undoes the cosine's spread.
- ``head_spread`` (residual heads): how much the head's part and the cosine prior's part of the match logit vary
  within a query's top k, and their correlation (``within_query_spread``).
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
import torch
import torch.nn.functional as F

from bench.bench_no_match import add_checkpoint_arguments
from utils.errors import user_errors_as_one_line


def fits_caption(texts, query_pids: torch.Tensor, candidate_pids: torch.Tensor, people: dict
                 ) -> tuple[torch.Tensor, list[dict]]:
    """([Q, k] bool: the candidate's person shares every attribute the caption names about its own person,
    the named attributes of each query). people: raw id -> Identity."""
    from bench.bench_no_match import attribute_values, named_attributes

    values = {p: attribute_values(people[p]) for p in set(candidate_pids.flatten().tolist())}
    named = [named_attributes(text, people[int(pid)]) for text, pid in zip(texts, query_pids.tolist())]
    fits = torch.tensor([[all(values[p][f] == v for f, v in wanted.items()) for p in row]
                         for wanted, row in zip(named, candidate_pids.tolist())], dtype=torch.bool)
    return fits, named


def ceiling(texts, query_pids: torch.Tensor, candidate_pids: torch.Tensor, fits: torch.Tensor, named: list[dict],
            people: dict) -> dict:
    """The verifier's R@1 and what the wrong #1 gets wrong; candidate_pids [Q, k] in cosine order."""
    from bench.bench_no_match import attribute_values

    right = candidate_pids == query_pids[:, None]
    k = right.shape[1]
    verifier_order = ((~fits).float() * k + torch.arange(k).float()).argsort(dim=1)
    wrong_first = (~right[:, 0]).nonzero().flatten().tolist()
    contradicts = Counter(f for q in wrong_first for f, v in named[q].items()
                          if attribute_values(people[int(candidate_pids[q, 0])])[f] != v)
    return {"queries": len(texts), "cosine_R1": round(100 * right[:, 0].float().mean().item(), 2),
            "right_in_top_k": round(100 * right.any(dim=1).float().mean().item(), 2),
            "verifier_R1": round(100 * right.gather(1, verifier_order)[:, 0].float().mean().item(), 2),
            "wrong_first": len(wrong_first), "wrong_first_fits": int(fits[wrong_first, 0].sum()),
            "wrong_first_contradicts": dict(contradicts.most_common()),
            "fields_named": dict(Counter(f for n in named for f in n).most_common())}


def within_query_spread(prior: torch.Tensor, head: torch.Tensor) -> dict:
    """prior, head [Q, k]: the two parts of a residual ITM logit over each query's top k.

    Re-ranking compares the k scores of one query, so only their spread within a query matters: the root mean
    square of each part about its query's mean, pooled over the queries, and the correlation of the two parts over
    the same centred values (negative: the head mostly pulls the cosine's spread back in)."""
    prior = prior - prior.mean(dim=1, keepdim=True)
    head = head - head.mean(dim=1, keepdim=True)
    correlation = float((prior * head).sum() / (prior.norm() * head.norm()).clamp(min=1e-12))
    return {"prior_std": round(float(prior.pow(2).mean().sqrt()), 3),
            "head_std": round(float(head.pow(2).mean().sqrt()), 3), "correlation": round(correlation, 3)}


def measure_split(model, cfg, tokenizer, records, people: dict, top_k: int, batch_size: int) -> dict:
    from datasets.transforms import build_test_transform
    from engine.calibration import itm_pair_accuracy
    from engine.encoding import encode_images, encode_texts, rerank_scores
    from engine.evaluation import build_eval_protocol, query_token_limit

    sets = build_eval_protocol(records, "standard", cfg.data.format)
    transform, limit, texts = build_test_transform(cfg.input), query_token_limit(cfg, "standard"), list(sets.texts)
    images = F.normalize(encode_images(model, sets.image_paths, transform, batch_size, "cpu", False, 0).float(), dim=-1)
    queries = F.normalize(encode_texts(model, tokenizer, texts, limit, batch_size, "cpu", False).float(), dim=-1)
    cosine, top = (queries @ images.T).topk(top_k, dim=1)  # [Q, k] each
    candidate_pids = sets.gallery_pids[top]
    fits, named = fits_caption(texts, sets.query_pids, candidate_pids, people)
    out = ceiling(texts, sets.query_pids, candidate_pids, fits, named, people)
    if getattr(model, "has_fusion", False):
        itm = rerank_scores(model, tokenizer, texts, sets.image_paths, top, transform, limit, batch_size, "cpu",
                            False, 0)  # the match logit, as evaluation re-ranks
        scores = {"cosine": cosine, "itm": itm}
        if model.config.itm_residual:
            prior = cosine / float(model.temperature)
            scores["itm_head_alone"] = itm - prior
            out["head_spread"] = within_query_spread(prior, scores["itm_head_alone"])
        out["pairs_ordered"] = {name: round(itm_pair_accuracy(candidate_pids, sets.query_pids, cosine, s)["itm"], 1)
                                for name, s in scores.items()}
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_checkpoint_arguments(parser)  # --data-root: a classic-style synthetic set
    parser.add_argument("--top-k", type=int, default=16, help="the re-ranking depth")
    parser.add_argument("--splits", nargs="+", default=["val", "test"], choices=("val", "test"))
    parser.add_argument("--out", default=None, help="the JSON record")
    args = parser.parse_args(argv)
    from bench.base import machine_record, report
    from bench.bench_no_match import load_checkpoint, synthetic_people

    began = time.time()
    with user_errors_as_one_line():
        people = synthetic_people(args.data_root)
        if people is None:
            raise SystemExit(f"{args.data_root}: not a classic-style synthetic set (SYNTHETIC.json with style "
                             f"classic): the attributes a caption names are read from classic captions only")
        model, cfg, tokenizer, splits = load_checkpoint(args)
    with torch.inference_mode():
        measured = {split: measure_split(model, cfg, tokenizer, splits.split(split), people, args.top_k,
                                         args.batch_size) for split in args.splits}
    payload = {"bench": "rerank_ceiling",
               "command": " ".join(["python -m bench.bench_rerank_ceiling", *(argv or sys.argv[1:])]),
               "checkpoint": args.checkpoint, "top_k": args.top_k, "itm_residual": bool(model.config.itm_residual),
               **measured,
               "seconds": round(time.time() - began, 1), "machine": machine_record("cpu")}
    return report(payload, args.out)


if __name__ == "__main__":
    main()
