"""What recording the training captions' words costs on a large corpus: time, distinct words, checkpoint bytes.

    python -m bench.bench_caption_words --captions 1000000 --out bench/results/caption_words_1m.json

The captions are pseudo-text: 20-40 words drawn by Zipf's law (rank r: weight 1/r) from ``--vocabulary``
pseudo-words of 1-4 syllables, so the long tail of words seen once or twice is there, as typos make it in real
corpora. Measured: the seconds ``datasets.tokenizer.caption_word_list`` takes (one thread), the distinct words,
the words kept under text.caption_words_max / _min_count as configured in configs/base.yaml, and the bytes the
list adds to a checkpoint (torch.save) and to a model folder (caption_words.txt).
"""
from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import random
import sys
import time
from pathlib import Path

from utils.errors import user_errors_as_one_line


def pseudo_captions(count: int, vocabulary: int, seed: int) -> list[str]:
    """``count`` captions of 20-40 Zipf-drawn pseudo-words from a vocabulary of ``vocabulary`` words."""
    rng = random.Random(seed)
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"]
    words = sorted({"".join(rng.choices(syllables, k=rng.randint(1, 4))) for _ in range(vocabulary * 2)})
    rng.shuffle(words)
    words = words[:vocabulary]
    cumulative = list(itertools.accumulate(1.0 / rank for rank in range(1, len(words) + 1)))
    return [" ".join(rng.choices(words, cum_weights=cumulative, k=rng.randint(20, 40))) for _ in range(count)]


def measure(captions: list[str], min_count: int, max_words: int) -> dict:
    import torch

    from datasets.tokenizer import caption_word_list

    began = time.perf_counter()
    everything = caption_word_list(captions)
    all_s = time.perf_counter() - began
    began = time.perf_counter()
    kept = caption_word_list(captions, min_count, max_words)
    kept_s = time.perf_counter() - began
    buffer = io.BytesIO()
    torch.save({"caption_words": kept}, buffer)
    return {"distinct_words": len(everything), "seconds_uncapped": round(all_s, 2), "kept_words": len(kept),
            "seconds_as_configured": round(kept_s, 2), "min_count": min_count, "max_words": max_words,
            "checkpoint_bytes": buffer.tell(), "caption_words_txt_bytes": sum(len(w.encode()) + 1 for w in kept)}


@user_errors_as_one_line()
def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--captions", type=int, default=1_000_000)
    parser.add_argument("--vocabulary", type=int, default=500_000, help="pseudo-words the captions are drawn from")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="the JSON result file")
    args = parser.parse_args(argv)
    from bench.base import machine_record, write_record
    from utils.config import load_config

    text = load_config(None).text
    load_before = os.getloadavg()
    began = time.perf_counter()
    captions = pseudo_captions(args.captions, args.vocabulary, args.seed)
    result = {"command": "python -m bench.bench_caption_words " + " ".join(argv), "machine": machine_record("cpu"),
              "captions": args.captions, "vocabulary": args.vocabulary,
              "generate_seconds": round(time.perf_counter() - began, 2),
              **measure(captions, int(text.caption_words_min_count), int(text.caption_words_max)),
              "load_avg_1_5_15_before": list(load_before), "load_avg_1_5_15_after": list(os.getloadavg())}
    write_record(Path(args.out), result)
    print(json.dumps(result, indent=1, default=str))
    return result


if __name__ == "__main__":
    main()
