"""The one writer of synthetic datasets: every format's folders, annotation file and marker, for any style.

A style is one module with the same three names, listed once in ``STYLE_TABLE``:

    picture(who: Identity, rng: random.Random, noise: np.random.Generator) -> Picture
        one encoded picture of ``who`` (file bytes, suffix, the view drawn); all randomness from rng and noise
    caption(who: Identity, view: str, rng: random.Random, always: Sequence[str]) -> str
        one caption of ``who`` that names the garments and every attribute in ``always`` (the key fields)
    MARKER: dict
        what SYNTHETIC.json records about the style's pictures (their size or size ranges)

Adding a style: write its module (drawing.py and captions.py hold the shared primitives), add it to
``STYLE_TABLE``, append its name to ``data.synthetic_style`` in utils/config.py's CHOICES (the config validates
against that list; this module refuses to import when the two differ) and to configs/base.yaml's comment, and
record its checksums with ``PYTHONPATH=. python3 tests/test_synthetic_checksums.py``.
"""
from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from types import ModuleType

import numpy as np

import datasets.synthetic.cctv as cctv
import datasets.synthetic.classic as classic
import datasets.synthetic.mixed as mixed
import datasets.synthetic.street as street
from datasets.synthetic.captions import tokens
from datasets.synthetic.drawing import PARTS
from datasets.synthetic.identities import (FORMATS, LAYOUT, ORIGINAL_STYLE, STYLES, Identity, key_fields,
                                           sample_identities, seed_tag)

logger = logging.getLogger(__name__)

# Part maps (styles that draw them: classic): one PNG per picture, each pixel the index in PARTS of what it shows,
# under PARTS_DIR/<image path>.png; PARTS_FILE names the parts and each picture's attribute words.
PARTS_DIR, PARTS_FILE = "parts", "parts.json"

STYLE_TABLE: dict[str, ModuleType] = {"classic": classic, "street": street, "cctv": cctv, "mixed": mixed}
if tuple(STYLE_TABLE) != STYLES:  # the names live in the config's CHOICES, which validates data.synthetic_style
    raise ImportError(f"datasets/synthetic/writer.py: STYLE_TABLE names {tuple(STYLE_TABLE)}, but the styles "
                      f"utils/config.py accepts are {STYLES} (the same names, in the same order)")


def make_synthetic(fmt: str, out_dir: str | Path, num_ids: int = 100, seed: int = 0, style: str = "classic") -> Path:
    """Write the synthetic dataset for ``fmt`` into ``out_dir`` and return ``out_dir``.

    cuhkpedes -> reid_raw.json, icfg -> ICFG-PEDES.json, rstp -> data_captions.json (images under imgs/);
    pretrain -> pretrain.json ({"image", "caption"} list, image paths relative to ``out_dir``). Always writes
    SYNTHETIC.json with the format, seed, num_ids and counts. The same arguments give the same bytes.
    ``style`` picks how people are drawn and described (``STYLES``, one module each).
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown synthetic format '{fmt}': expected one of {FORMATS}")
    if style not in STYLES:
        raise ValueError(f"unknown synthetic style '{style}': expected one of {STYLES}")
    out = Path(out_dir)
    annotation_name = LAYOUT[fmt][3]
    always = key_fields(num_ids)
    entries: list[dict] = []
    counts: dict[str, dict[str, int]] = {}
    parts: dict[str, dict] = {}
    for split, raw_id, who in sample_identities(fmt, num_ids, seed, style=style):
        stats = counts.setdefault(split, {"ids": 0, "images": 0, "captions": 0})
        stats["ids"] += 1
        for name, captions, has_parts in _write_identity(fmt, style, out, seed, split, raw_id, who, always):
            stats["images"] += 1
            stats["captions"] += len(captions)
            entries.append(_entry(fmt, split, raw_id, name, captions))
            if has_parts:
                parts[name] = attribute_words(who)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / annotation_name, entries)
    if parts:  # a style that draws part maps: where they are, what their values mean, what each image shows
        _write_json(out / PARTS_FILE, {"parts": list(PARTS), "maps": f"{PARTS_DIR}/<image path>.png",
                                       "images": parts})
    # the original style's marker predates styles: it names none
    named = {} if style == ORIGINAL_STYLE else {"style": style}
    _write_json(out / "SYNTHETIC.json", {"format": fmt, "seed": seed, "num_ids": num_ids, **named,
                                         "annotation": annotation_name, **STYLE_TABLE[style].MARKER,
                                         "key_fields": list(always), "counts": counts})
    logger.info("synthetic %s, style %s (%d ids, seed %d) written to %s: %s", fmt, style, num_ids, seed, out,
                counts)
    return out


def attribute_words(who: Identity) -> dict[str, str]:
    """The words a one-attribute query uses for each part ``who`` wears or carries ("upper": "blue coat")."""
    words = {"upper": f"{who.upper_colour} {who.upper_type}", "shoes": f"{who.shoes_colour} shoes"}
    if who.lower_type:
        words["lower"] = f"{who.lower_colour} {who.lower_type}"
    if who.bag:
        words["bag"] = f"{who.bag_colour} {who.bag}"
    if who.hat_colour:
        words["hat"] = f"{who.hat_colour} hat"
    if who.umbrella_colour:
        words["umbrella"] = f"{who.umbrella_colour} umbrella"
    return words


def _write_identity(fmt: str, style: str, out: Path, seed: int, split: str, raw_id: int, who: Identity,
                    always: tuple[str, ...]) -> list[tuple[str, list[str], bool]]:
    """Write the pictures of one identity (and their part maps, for a style that draws them under PARTS_DIR);
    (image path relative to the image root, its captions, whether a part map was written) for each."""
    _, (low, high), per_image, _ = LAYOUT[fmt]
    module = STYLE_TABLE[style]
    image_root = out if fmt == "pretrain" else out / "imgs"
    # the original style's seeds predate styles: its noise has no style number
    style_number = () if style == ORIGINAL_STYLE else (1 + STYLES.index(style),)
    rng = random.Random(f"synthetic:{seed_tag(style)}{fmt}:{seed}:{raw_id}")
    written = []
    for k in range(rng.randint(low, high)):
        noise = np.random.default_rng([seed, raw_id, k, FORMATS.index(fmt), *style_number])
        picture = module.picture(who, rng, noise)
        name = _image_name(fmt, split, raw_id, k).removesuffix(".jpg") + picture.suffix
        path = image_root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(picture.data)
        if picture.parts is not None:
            map_path = out / PARTS_DIR / f"{name}.png"
            map_path.parent.mkdir(parents=True, exist_ok=True)
            map_path.write_bytes(picture.parts)
        captions: list[str] = []
        while len(captions) < per_image:
            caption = module.caption(who, picture.view, rng, always)
            if caption not in captions or len(captions) >= 8:
                captions.append(caption)
        written.append((name, captions, picture.parts is not None))
    return written


def _image_name(fmt: str, split: str, raw_id: int, k: int) -> str:
    """Relative paths shaped like each dataset's own."""
    if fmt == "cuhkpedes":
        return f"SYNTH/{raw_id:05d}_{k:02d}.jpg"
    if fmt == "icfg":
        return f"{split}/{raw_id:04d}/{raw_id:04d}_{k:03d}.jpg"
    if fmt == "rstp":
        return f"{raw_id:04d}_c{k % 15 + 1}_{k:04d}.jpg"
    return f"imgs/{raw_id:06d}_{k}.jpg"


def _entry(fmt: str, split: str, raw_id: int, name: str, captions: list[str]) -> dict:
    if fmt == "pretrain":
        return {"image": name, "caption": captions[0]}
    if fmt == "rstp":
        return {"id": raw_id, "img_path": name, "captions": captions, "split": split}
    return {"split": split, "captions": captions, "file_path": name,
            "processed_tokens": [tokens(c) for c in captions], "id": raw_id}


def _write_json(path: Path, value: object) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(value, handle, indent=1)
