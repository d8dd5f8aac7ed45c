"""Do the "why this person" heatmaps point at the garment a query names? The pointing game on synthetic data.

    python -m bench.bench_pointing --checkpoint runs/demo/best.pth --data-root runs/parts/classic-400 \
        --out bench/results/pointing.json

The classic synthetic style writes a part map beside every picture (which part each pixel shows: upper garment,
lower garment, shoes, bag, hat, ...; ``parts.json`` names each picture's attribute words). For every picture of
the split and every part it shows, a one-attribute query ("a person in a blue coat", "a person with a red
backpack") is explained against the split's gallery; a hit is a heatmap peak (the patch with the largest share)
whose centre pixel shows that part. Chance is the share of patch centres that show it (the hit rate of a peak
drawn at random), per picture, averaged like the hits. Two heatmaps: the plain split of the score and the
contrastive one (against the gallery's average picture, models/explain.py); the data set is written when missing.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from utils.errors import user_errors_as_one_line

ROOT = Path(__file__).resolve().parents[1]

# How a one-attribute query names each part.
QUERY = {"upper": "a person in {}", "lower": "a person in {}", "shoes": "a person wearing {}",
         "bag": "a person with {}", "hat": "a person with {}", "umbrella": "a person holding {}"}
PLURAL = ("shoes", "pants", "shorts")


def query_for(part: str, words: str) -> str:
    """The one-attribute query of ``part`` described by ``words`` ("blue coat" -> "a person in a blue coat")."""
    if words.split()[-1] not in PLURAL:
        words = ("an " if words[0] in "aeiou" else "a ") + words
    return QUERY[part].format(words)


def peak_hits(patch_map: torch.Tensor, parts: np.ndarray, code: int) -> tuple[bool, float, float]:
    """(the peak patch's centre shows ``code``, chance: the share of patch centres that do, the part's area
    share of the picture). patch_map [rows, cols]; parts [H, W] the picture's part map."""
    rows, cols = patch_map.shape
    height, width = parts.shape
    ys = ((np.arange(rows) + 0.5) * height / rows).astype(int)
    xs = ((np.arange(cols) + 0.5) * width / cols).astype(int)
    centres = parts[np.ix_(ys, xs)] == code  # [rows, cols]
    peak = int(torch.argmax(patch_map))
    return bool(centres.reshape(-1)[peak]), float(centres.mean()), float((parts == code).mean())


def play(checkpoint: str, data_root: Path, split: str, limit: int) -> dict:
    """Hits and chance per part kind, for the plain and the contrastive heatmap."""
    from PIL import Image

    from datasets.readers import load_annotations
    from datasets.synthetic.drawing import PARTS
    from datasets.synthetic.writer import PARTS_DIR, PARTS_FILE
    from engine.checkpoints import load_for_inference
    from engine.explanation import explain_with, gallery_baseline

    model, cfg, tokenizer, _ = load_for_inference(checkpoint, None, [], "cpu")
    records = getattr(load_annotations("cuhkpedes", data_root), split)
    images = list(dict.fromkeys(r.image_path for r in records))[:limit or None]
    described = json.loads((data_root / PARTS_FILE).read_text())["images"]
    baseline = gallery_baseline(model, cfg, "cpu", images, limit=len(images))
    tally: dict[str, dict[str, list]] = {}
    for path in images:
        name = Path(path).relative_to(data_root / "imgs").as_posix()
        parts = np.asarray(Image.open(data_root / PARTS_DIR / f"{name}.png"))
        for part, words in described[name].items():
            code = PARTS.index(part)
            if not (parts == code).any():
                continue  # hidden in this picture (an occluder, the view)
            text = query_for(part, words)
            row = tally.setdefault(part, {"plain": [], "contrastive": [], "chance": [], "area": []})
            for kind, against in (("plain", None), ("contrastive", baseline)):
                hit, chance, area = peak_hits(explain_with(model, tokenizer, cfg, "cpu", text, path, against).patch_map,
                                              parts, code)
                row[kind].append(hit)
            row["chance"].append(chance)
            row["area"].append(area)
    return {part: {"queries": len(row["chance"]), "plain_hit_rate": float(np.mean(row["plain"])),
                   "contrastive_hit_rate": float(np.mean(row["contrastive"])),
                   "chance": float(np.mean(row["chance"])), "area_share": float(np.mean(row["area"])),
                   "contrastive_over_chance": float(np.mean(row["contrastive"]) / max(np.mean(row["chance"]), 1e-9))}
            for part, row in sorted(tally.items())}


@user_errors_as_one_line()
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data-root", required=True, help="a classic synthetic CUHK-PEDES-format set (written "
                                                           "when missing: 400 identities, seed 0, the demo's)")
    parser.add_argument("--split", default="val", choices=("val", "test"))
    parser.add_argument("--limit", type=int, default=0, help="at most this many pictures (0: all)")
    parser.add_argument("--out", default=None, help="JSON file for the results")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    root = Path(args.data_root)
    if not (root / "SYNTHETIC.json").is_file():
        from datasets.synthetic import make_synthetic

        make_synthetic("cuhkpedes", root, num_ids=400, seed=0, style="classic")
    began = time.perf_counter()
    results = play(args.checkpoint, root, args.split, args.limit)
    from utils.environment import environment_record

    record = {"command": "python -m bench.bench_pointing " + " ".join(argv if argv is not None else sys.argv[1:]),
              "split": args.split, "results": results, "seconds": round(time.perf_counter() - began, 1),
              "threads": 1, "environment": environment_record("cpu"),
              "load_average": [round(x, 2) for x in __import__("os").getloadavg()]}
    print(json.dumps(record["results"], indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    return record


if __name__ == "__main__":
    main()
