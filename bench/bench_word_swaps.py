"""Does the model know which part each colour belongs to? Each caption against itself with two colours exchanged.

    python -m bench.bench_word_swaps --checkpoint runs/demo_rerank/best.pth \
        --data-root data/synthetic-cuhkpedes --out bench/results/word_swaps.json

For every val/test caption with two different words of the list (``--words``, else the checkpoint's own
``loss.itm_swap_words``), the first of them and the next different one (not of the same compound colour) are
exchanged ("a pink shirt, green shorts" -> "a green shirt, pink shorts", datasets.collate.swap_two_words) and both
texts are scored against the caption's own image. Reported per split and per score: the share of those captions
that score above their swap (``prefers_caption``; 50% is a coin, ties count half). The scores: the cosine, the
ITM match logit (models with a fusion stack; with a residual head also the head alone), and for models trained
with MLM the image-conditioned MLM's verdict with both words masked (``mlm_scores``), a generative check of the
same question. A model that places each colour on its part scores near 100%; one that only knows which colours
are named, near 50%. Any synthetic style or real dataset in a supported format: nothing here reads the generator.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

from bench.bench_no_match import add_checkpoint_arguments
from utils.errors import user_errors_as_one_line


def preference(own: torch.Tensor, swapped: torch.Tensor) -> float:
    """own, swapped [N]: the percentage of pairs where ``own`` is higher, ties counted half."""
    return round(100 * float(((own > swapped).float() + 0.5 * (own == swapped).float()).mean()), 2)


def word_list(arguments: list[str]) -> list[str]:
    """The words of ``--words``, written apart ("red blue") or as the config writes a list ("[red,blue]", as
    loss.itm_swap_words=... takes it), lowercased. A word holding anything but letters and hyphens would never
    match a caption's word, so it is an error rather than a silent measurement of nothing."""
    words = [w.strip().lower() for a in arguments for w in a.strip().strip("[]").split(",") if w.strip()]
    odd = [w for w in words if not w.replace("-", "").isalpha()]
    if odd:
        raise SystemExit(f"--words: {odd[0]!r} is not a word (letters and hyphens; a list is 'red blue' or "
                         "'[red,blue]')")
    return words


def measure_split(model, cfg, tokenizer, records, words: frozenset[str], batch_size: int) -> dict:
    from datasets.collate import swap_two_words
    from datasets.text_levels import sentence_level
    from datasets.transforms import build_test_transform
    from engine.encoding import encode_images, encode_texts, rerank_scores
    from engine.evaluation import query_token_limit

    captions = [sentence_level(r.caption, cfg.text.lowercase) for r in records]
    swaps = [swap_two_words(c, words) for c in captions]
    kept = [i for i, s in enumerate(swaps) if s is not None]
    if not kept:
        return {"captions": len(records), "swappable": 0}
    paths = sorted({records[i].image_path for i in kept})
    position = {path: index for index, path in enumerate(paths)}
    image_of = torch.tensor([position[records[i].image_path] for i in kept])
    texts = [captions[i] for i in kept] + [swaps[i] for i in kept]
    transform, limit = build_test_transform(cfg.input), query_token_limit(cfg, "standard")
    images = F.normalize(encode_images(model, paths, transform, batch_size, "cpu", False, 0).float(), dim=-1)
    text_feats = F.normalize(encode_texts(model, tokenizer, texts, limit, batch_size, "cpu", False).float(), dim=-1)
    cosine = (text_feats * images[image_of.repeat(2)]).sum(dim=-1)
    n = len(kept)
    out = {"captions": len(records), "swappable": n,
           "example": {"caption": texts[0], "swapped": texts[n]},
           "prefers_caption": {"cosine": preference(cosine[:n], cosine[n:])}}
    if getattr(model, "has_fusion", False):
        itm = rerank_scores(model, tokenizer, texts, paths, image_of.repeat(2)[:, None], transform, limit,
                            batch_size, "cpu", False, 0)[:, 0]  # the match logit, as evaluation re-ranks
        out["prefers_caption"]["itm"] = preference(itm[:n], itm[n:])
        if model.config.itm_residual:
            head = itm - cosine / float(model.temperature)
            out["prefers_caption"]["itm_head_alone"] = preference(head[:n], head[n:])
    if getattr(model, "has_fusion", False) and float(cfg.loss.mlm_weight) > 0:
        own, swapped, skipped = mlm_scores(model, cfg, tokenizer, texts[:n], texts[n:],
                                           [paths[int(i)] for i in image_of], batch_size)
        out["prefers_caption"]["mlm"] = preference(own, swapped)
        out["mlm_skipped"] = skipped
    return out


def mlm_scores(model, cfg, tokenizer, captions: list[str], swaps: list[str], image_paths: list[str],
               batch_size: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The image-conditioned MLM's verdict on each caption against its swap: both exchanged words masked at once
    in the same text ("a [MASK] shirt, [MASK] shorts"), log P(first word at its place) + log P(second at its) for
    the caption, the same with the two exchanged for the swap, on the caption's own image. A generative score:
    the masked text is the same for both, so only which word the image puts where decides. Returns (caption
    [M], swap [M], pairs skipped): a pair is skipped when the exchange does not change exactly two tokens (a
    colour of several word pieces)."""
    from engine.encoding import tokenize
    from engine.explanation import pixels_of

    limit = int(cfg.text.max_text_len)
    own_ids = tokenizer(captions, truncation=True, max_length=limit)["input_ids"]
    swap_ids = tokenizer(swaps, truncation=True, max_length=limit)["input_ids"]
    kept, places = [], []
    for i, (a, b) in enumerate(zip(own_ids, swap_ids)):
        changed = [t for t, (x, y) in enumerate(zip(a, b)) if x != y] if len(a) == len(b) else []
        if len(changed) == 2:
            kept.append(i)
            places.append(changed)
    own, swapped = [], []
    for start in range(0, len(kept), batch_size):
        rows = kept[start:start + batch_size]
        ids, mask = tokenize(tokenizer, [captions[i] for i in rows], limit, "cpu")  # right-padded: places hold
        at = torch.tensor(places[start:start + batch_size])  # [R, 2]
        first, second = ids.gather(1, at).unbind(1)  # the caption's two words, in its order
        ids.scatter_(1, at, tokenizer.mask_token_id)
        positions = torch.zeros_like(ids, dtype=torch.bool).scatter_(1, at, True)
        image_tokens, _ = model.encode_image(pixels_of(cfg, [image_paths[i] for i in rows], "cpu"), bmm=False,
                                             for_fusion=True)
        text_tokens, _ = model.encode_text(ids, mask, bmm=False, for_fusion=True)
        logp = torch.log_softmax(model.mlm_logits(text_tokens, mask, image_tokens, positions=positions).float(),
                                 dim=-1).reshape(len(rows), 2, -1)  # row-major: each row's two places in order
        index = torch.arange(len(rows))
        own.append(logp[index, 0, first] + logp[index, 1, second])
        swapped.append(logp[index, 0, second] + logp[index, 1, first])
    empty = torch.zeros(0)
    return (torch.cat(own) if own else empty, torch.cat(swapped) if swapped else empty, len(captions) - len(kept))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_checkpoint_arguments(parser)
    parser.add_argument("--words", nargs="+", default=None,
                        help="the words to exchange, 'red blue' or '[red,blue]' (default: the checkpoint's "
                             "loss.itm_swap_words)")
    parser.add_argument("--splits", nargs="+", default=["val", "test"], choices=("val", "test"))
    parser.add_argument("--out", default=None, help="the JSON record")
    args = parser.parse_args(argv)
    from bench.base import machine_record, report
    from bench.bench_no_match import load_checkpoint

    began = time.time()
    with user_errors_as_one_line():
        model, cfg, tokenizer, splits = load_checkpoint(args)
        words = word_list(args.words) if args.words else [w.lower() for w in cfg.loss.get("itm_swap_words") or ()]
        if not words:
            raise SystemExit(f"{args.checkpoint}: its config has no loss.itm_swap_words; name the words with --words")
    with torch.inference_mode():
        measured = {split: measure_split(model, cfg, tokenizer, splits.split(split), frozenset(words),
                                         args.batch_size) for split in args.splits}
    if not any(m["swappable"] for m in measured.values()):  # a record of nothing measured reads as a result
        raise SystemExit(f"{args.data_root}: no {'/'.join(args.splits)} caption holds two different of the "
                         f"{len(words)} words {sorted(words)[:5]}{'...' if len(words) > 5 else ''}; nothing measured")
    payload = {"bench": "word_swaps",
               "command": " ".join(["python -m bench.bench_word_swaps", *(argv or sys.argv[1:])]),
               "checkpoint": args.checkpoint, "words": sorted(words), **measured,
               "seconds": round(time.time() - began, 1), "machine": machine_record("cpu")}
    return report(payload, args.out)


if __name__ == "__main__":
    main()
