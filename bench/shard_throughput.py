"""Images per second per core for decode + the pretraining transforms: loose files vs webdataset shards, in one run.

    python -m bench.shard_throughput --num-ids 8000 --work runs/throughput --out bench/results/shard_throughput.json

Writes (once) a synthetic pretraining corpus of the ``mixed`` style with ``--num-ids`` identities (about 1.5
pairs each) under ``--work`` and its shards (images as stored), then, on one thread: loose = open each record's
file in the epoch's shuffled order, decode, and run the pretraining transforms (configs/pretrain.yaml: resize to
input.image_size, pad, crop, flip, normalise, erase); shards = read the tars in order through webdataset, decode and
transform the same images. Also the model FLOPs per pretraining pair (models/flops.py: the encoder over one image
and two texts, and the fusion stack for ITM's three pairs and MLM's one), for the projection in docs/scale.md.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bench.base import machine_record, report
from datasets.readers import load_pretrain_corpora
from datasets.shards import ShardManifest, decode_sample, read_shard, write_shards
from datasets.synthetic import make_synthetic
from datasets.transforms import build_train_transform, load_image
from models.config import IVTConfig
from models.flops import expected_step_flops
from utils.config import load_config
from utils.errors import user_errors_as_one_line

TEXT_TOKENS = 48  # a pretraining caption in word pieces (pretrain_max_words 50 words, most captions shorter)


def pair_flops(cfg) -> dict:
    """Training FLOPs per image-caption pair of the pretraining recipe (forward + backward = 3 x forward)."""
    config = IVTConfig.from_config(cfg)
    encoder = expected_step_flops(config, image_views=1, texts=2, text_length=TEXT_TOKENS)  # caption + masked copy
    d, n_t, n_i = config.embed_dim, TEXT_TOKENS, encoder.image_tokens
    # a fusion layer: self-attention, cross-attention to the image tokens, feed-forward (4d), per text
    fusion_layer = 28 * n_t * d * d + 4 * n_i * d * d + 4 * n_t * n_t * d + 4 * n_t * n_i * d
    fusion = config.fusion_layers * fusion_layer * 4  # ITM: positive + 2 negatives; MLM: 1
    forward = encoder.forward + fusion
    return {"encoder_forward": encoder.forward, "fusion_forward": fusion, "train_per_pair": 3 * forward,
            "image_tokens": encoder.image_tokens, "text_tokens": TEXT_TOKENS, "fusion_layers": config.fusion_layers}


def time_loose(paths: list[str], transform, seed: int = 0) -> tuple[int, float]:
    order = np.random.default_rng(seed).permutation(len(paths))
    start = time.perf_counter()
    for index in order:
        transform(load_image(paths[index]))
    return len(paths), time.perf_counter() - start


def time_shards(manifest: ShardManifest, transform) -> tuple[int, float]:
    count, start = 0, time.perf_counter()
    for shard in manifest.shards:
        for sample in read_shard(manifest.folder / shard["name"], shard["samples"]):
            image, _, _ = decode_sample(sample)
            transform(image)
            count += 1
    return count, time.perf_counter() - start


def prepare(work: Path, num_ids: int, per_shard: int) -> tuple[list[str], ShardManifest]:
    root, shards = work / "corpus", work / "shards"
    if not (root / "pretrain.json").is_file():
        make_synthetic("pretrain", root, num_ids=num_ids, seed=0, style="mixed")
    corpora = [{"annotation": str(root / "pretrain.json"), "image_root": str(root)}]
    if not (shards / "manifest.json").is_file():
        write_shards(corpora, shards, per_shard)
    return [r.image_path for r in load_pretrain_corpora(corpora)], ShardManifest.load(shards / "manifest.json")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-ids", type=int, default=8000)
    parser.add_argument("--work", default="runs/throughput")
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--config", default="configs/pretrain.yaml")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    with user_errors_as_one_line():
        torch.set_num_threads(1)
        cfg = load_config(args.config)
        transform = build_train_transform(cfg.input)
        paths, manifest = prepare(Path(args.work), args.num_ids, args.samples_per_shard)
        load_before = os.getloadavg()
        rounds = [(time_loose(paths, transform, seed), time_shards(manifest, transform)) for seed in range(2)]
        load_after = os.getloadavg()
        # the faster of two alternating rounds of each: the machine is shared, the slower round measures others
        (loose_n, loose_s), (shard_n, shard_s) = min(r[0] for r in rounds), min(r[1] for r in rounds)
        tar_bytes = sum(s["bytes"] for s in manifest.shards)
        result = {
            "command": "python -m bench.shard_throughput " + " ".join(argv if argv is not None else sys.argv[1:]),
            "machine": "2 CPU cores shared with other jobs, no GPU", "threads": 1,
            "load_avg_1_5_15_before": [round(x, 2) for x in load_before],
            "load_avg_1_5_15_after": [round(x, 2) for x in load_after],
            "pairs": len(paths), "shard_files": len(manifest.shards), "shard_bytes": tar_bytes,
            "image_size": list(cfg.input.image_size),
            "loose": {"images": loose_n, "seconds": round(loose_s, 2), "images_per_s_per_core": round(loose_n / loose_s, 1)},
            "shards": {"images": shard_n, "seconds": round(shard_s, 2),
                       "images_per_s_per_core": round(shard_n / shard_s, 1)},
            "rounds_seconds": [[round(r[0][1], 2), round(r[1][1], 2)] for r in rounds],
            "flops": pair_flops(cfg), "environment": machine_record(),
        }
        return report(result, args.out)


if __name__ == "__main__":
    main()
