"""A synthetic CUHK-PEDES-shaped dataset for the end-to-end benchmark: the real dataset's counts and image sizes.

    python -m bench.e2e_data --out runs/e2e_cuhk                       # the real counts (34,054 train images, ...)
    python -m bench.e2e_data --out runs/e2e_small --train-images 300 --train-captions 600 --eval-images 40 \
        --eval-captions 80 --train-ids 100 --eval-ids 20

Counts default to CUHK-PEDES's published ones: train 11,003 identities, 34,054 images, 68,126 captions; val and
test 1,000 identities, ~3,076 images, ~6,157 captions each. Images are JPEGs (quality 90) of width U{80..200} and
height U{200..400} pixels drawn as a blurred colour field with a few shapes and sensor noise, so decoding costs
what a photo of that size costs; captions come from datasets.synthetic's CUHK-PEDES-style writer (~24 words).
The annotation file is the raw CUHK-PEDES layout (reid_raw.json), read by the real reader; SYNTHETIC.json marks it.
"""
from __future__ import annotations

import argparse
import json
import random
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from datasets.synthetic import key_fields, sample_identities, write_caption
from utils.errors import user_errors_as_one_line

CUHK_COUNTS = {"train_ids": 11003, "train_images": 34054, "train_captions": 68126,
               "eval_ids": 1000, "eval_images": 3076, "eval_captions": 6157}
WIDTH_RANGE, HEIGHT_RANGE = (80, 200), (200, 400)
JPEG_QUALITY = 90


def draw_image(seed: tuple[int, ...]) -> Image.Image:
    """One photo-like RGB image of a random size in the dataset's range (deterministic in ``seed``)."""
    rng = np.random.default_rng(list(seed))
    width, height = int(rng.integers(*WIDTH_RANGE, endpoint=True)), int(rng.integers(*HEIGHT_RANGE, endpoint=True))
    coarse = rng.integers(0, 256, (6, 3, 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((width, height), Image.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(3, 8))):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        x1, y1 = x0 + int(rng.integers(8, width // 2 + 9)), y0 + int(rng.integers(8, height // 3 + 9))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
    image = image.filter(ImageFilter.GaussianBlur(1.2))
    noisy = np.asarray(image, dtype=np.int16) + rng.normal(0, 6, (height, width, 3)).astype(np.int16)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def _write_image(job: tuple[str, tuple[int, ...]]) -> None:
    path, seed = job
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    draw_image(seed).save(path, "JPEG", quality=JPEG_QUALITY)


def make_e2e_dataset(out: str | Path, train_ids: int, train_images: int, train_captions: int, eval_ids: int,
                     eval_images: int, eval_captions: int, seed: int = 0, workers: int = 0) -> Path:
    """Write the dataset into ``out`` (skipped when its SYNTHETIC.json records the same counts); returns ``out``."""
    out = Path(out)
    counts = {"train_ids": train_ids, "train_images": train_images, "train_captions": train_captions,
              "eval_ids": eval_ids, "eval_images": eval_images, "eval_captions": eval_captions, "seed": seed}
    marker = out / "SYNTHETIC.json"
    if marker.is_file() and json.loads(marker.read_text()).get("e2e_counts") == counts:
        return out
    if min(train_ids, eval_ids) < 2 or train_images < train_ids or eval_images < eval_ids:
        raise ValueError(f"need >= 2 identities per split and >= 1 image per identity, got {counts}")
    people = [who for _, _, who in sample_identities("cuhkpedes", train_ids + 2 * eval_ids, seed)]
    always = key_fields(len(people))
    entries, jobs = [], []
    splits = (("train", 0, train_ids, train_images, train_captions),
              ("val", train_ids, eval_ids, eval_images, eval_captions),
              ("test", train_ids + eval_ids, eval_ids, eval_images, eval_captions))
    for split_no, (split, first_id, ids, images, captions) in enumerate(splits):
        per_image, extra = divmod(captions, images)
        for i in range(images):
            pid = first_id + i % ids
            name = f"E2E/{split}/{pid:05d}_{i:06d}.jpg"
            rng = random.Random(f"e2e:{seed}:{split}:{i}")
            texts = [write_caption(people[pid], rng, always) for _ in range(per_image + (1 if i < extra else 0))]
            entries.append({"split": split, "captions": texts, "file_path": name,
                            "processed_tokens": [t.lower().replace(".", " ").replace(",", " ").split() for t in texts],
                            "id": pid})
            jobs.append((str(out / "imgs" / name), (seed, split_no, i)))
    if workers > 0:
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_write_image, jobs, chunksize=256))
    else:
        for job in jobs:
            _write_image(job)
    (out / "reid_raw.json").write_text(json.dumps(entries))
    marker.write_text(json.dumps({"format": "cuhkpedes", "e2e_counts": counts}))
    return out


@user_errors_as_one_line()
def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    for key, value in CUHK_COUNTS.items():
        parser.add_argument("--" + key.replace("_", "-"), type=int, default=value)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=0, help="processes writing JPEGs (0: this one)")
    args = parser.parse_args(argv)
    return make_e2e_dataset(args.out, args.train_ids, args.train_images, args.train_captions, args.eval_ids,
                            args.eval_images, args.eval_captions, args.seed, args.workers)


if __name__ == "__main__":
    print(main())
