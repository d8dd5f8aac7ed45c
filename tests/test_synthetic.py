"""The synthetic person dataset: loads through the real readers, is byte-deterministic, and its captions
describe what is drawn."""
from __future__ import annotations

import json
import logging
import random
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from datasets import synthetic
from datasets.readers import check_images, load_annotations, load_pretrain_corpora, split_counts
from datasets.synthetic import Identity, classic, make_synthetic, render_image, sample_identities, write_caption
from datasets.synthetic.__main__ import main

# (format, images per identity, captions per image)
LAYOUTS = [("cuhkpedes", (2, 4), 2), ("icfg", (3, 6), 1), ("rstp", (5, 5), 2)]


@pytest.mark.parametrize("fmt, images_per_id, captions_per_image", LAYOUTS)
def test_loads_through_the_readers(tmp_path: Path, caplog: pytest.LogCaptureFixture, fmt: str,
                                   images_per_id: tuple[int, int], captions_per_image: int) -> None:
    root = make_synthetic(fmt, tmp_path / fmt, num_ids=12, seed=3)
    marker = json.loads((root / "SYNTHETIC.json").read_text())
    assert (marker["format"], marker["seed"], marker["num_ids"]) == (fmt, 3, 12)
    with caplog.at_level(logging.WARNING):
        splits = load_annotations(fmt, root)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # no published-count warning
    sizes = synthetic.split_sizes(fmt, 12)
    assert sizes == ({"train": 8, "val": 2, "test": 2} if fmt != "icfg" else {"train": 8, "test": 4})
    for name in ("train", "val", "test"):
        records = getattr(splits, name)
        ids, images, captions = split_counts(records)
        expected = marker["counts"].get(name, {"ids": 0, "images": 0, "captions": 0})
        assert (ids, images, captions) == (expected["ids"], expected["images"], expected["captions"])
        assert ids == sizes.get(name, 0)
        assert captions == images * captions_per_image
        per_id = Counter(pid for pid, _ in {(r.pid, r.image_id) for r in records})
        assert all(images_per_id[0] <= n <= images_per_id[1] for n in per_id.values())
    assert splits.num_train_pids == 8 and {r.pid for r in splits.train} == set(range(8))
    check_images(splits.train + splits.val + splits.test, decode=True)


def test_pretrain_format(tmp_path: Path) -> None:
    root = make_synthetic("pretrain", tmp_path, num_ids=6, seed=0)
    records = load_pretrain_corpora([{"annotation": str(root / "pretrain.json"), "image_root": str(root)}])
    counts = json.loads((root / "SYNTHETIC.json").read_text())["counts"]["train"]
    assert counts["ids"] == 6 and 6 <= counts["images"] <= 12
    assert len(records) == counts["captions"] == counts["images"]
    assert [r.pid for r in records] == list(range(len(records)))
    check_images(records, decode=True)


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_byte_deterministic_for_a_seed(tmp_path: Path) -> None:
    first = _tree(make_synthetic("rstp", tmp_path / "a", num_ids=4, seed=7))
    second = _tree(make_synthetic("rstp", tmp_path / "b", num_ids=4, seed=7))
    other = _tree(make_synthetic("rstp", tmp_path / "c", num_ids=4, seed=8))
    assert len(first) == 4 * 5 * 2 + 3 and first == second  # pictures, their part maps, 3 JSON files
    assert first["data_captions.json"] != other["data_captions.json"]
    assert sum(first[name] != other.get(name) for name in first if name.endswith(".jpg")) > 0


def test_identity_keys_are_unique_and_test_colours_distinct() -> None:
    for num_ids in (60, 1200):
        fields = synthetic.key_fields(num_ids)
        drawn = sample_identities("cuhkpedes", num_ids, seed=1)
        assert sorted(raw_id for _, raw_id, _ in drawn) == list(range(1, num_ids + 1))
        keys = [synthetic.identity_key(who, fields) for _, _, who in drawn]
        assert len(set(keys)) == num_ids  # so no attribute set is shared by two ids, within or across splits
    assert "shoes_colour" in synthetic.key_fields(1200) and "shoes_colour" not in synthetic.key_fields(60)
    test_ids = [who for split, _, who in sample_identities("cuhkpedes", 300, seed=0) if split == "test"]
    assert len(test_ids) == 45
    assert len({(w.upper_colour, w.lower_colour) for w in test_ids}) == 45


def test_captions_name_the_drawn_garments(tmp_path: Path) -> None:
    root = make_synthetic("cuhkpedes", tmp_path, num_ids=40, seed=2)
    identities = {raw_id: who for _, raw_id, who in sample_identities("cuhkpedes", 40, seed=2)}
    entries = json.loads((root / "reid_raw.json").read_text())
    captions = [c for e in entries for c in e["captions"]]
    for entry in entries:
        who = identities[entry["id"]]
        for caption in entry["captions"]:
            words = set(re.findall(r"[a-z-]+", caption.lower()))
            assert who.upper_colour in words, caption
            assert any(set(w.split()) <= words for w in classic.UPPER_WORDS[who.upper_type]), caption
            if who.lower_type is not None:
                assert who.lower_colour in words, caption
                lower_words = classic.LOWER_WORDS[who.lower_type] + ("jeans",)
                assert any(set(w.split()) <= words for w in lower_words), caption
            else:
                assert not words & {"pants", "trousers", "shorts", "skirt", "jeans", "slacks"}, caption
        assert entry["processed_tokens"][0][:2] == re.findall(r"[a-z0-9'-]+", entry["captions"][0].lower())[:2]
    assert sum("," in c for c in captions) > len(captions) // 2
    assert len(set(captions)) > 0.9 * len(captions)
    templates = Counter(" ".join(c.split()[:2]) for c in captions)
    assert len(templates) >= 10


def test_large_sets_always_mention_the_extra_key_fields() -> None:
    who = Identity("woman", "long", "brown", 0, "coat", "red", "plain", "pants", "blue", "white", None, None,
                   None, False, None)
    rng = random.Random(0)
    for _ in range(30):
        caption = write_caption(who, rng, synthetic.key_fields(1200))
        assert re.search(r"white (shoes|sneakers|trainers)", caption), caption


def _fraction(pixels: np.ndarray, low: tuple[int, int, int], high: tuple[int, int, int]) -> float:
    inside = np.all((pixels >= np.array(low)) & (pixels <= np.array(high)), axis=-1)
    return float(inside.mean())


def test_garment_colours_survive_the_noise() -> None:
    """Red upper and blue lower garments cover a clear share of every rendering, whatever the view."""
    who = Identity("man", "short", "black", 1, "jacket", "red", "plain", "pants", "blue", "black", None, None,
                   None, False, None)
    rng = random.Random(5)
    for k in range(12):
        image = render_image(who, rng, np.random.default_rng(k))
        assert image.size == (synthetic.IMAGE_WIDTH, synthetic.IMAGE_HEIGHT)
        pixels = np.asarray(image).astype(int)
        assert _fraction(pixels, (130, 0, 0), (255, 90, 90)) > 0.04
        assert _fraction(pixels, (0, 20, 120), (100, 130, 255)) > 0.04


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown synthetic format 'market'"):
        make_synthetic("market", tmp_path)
    with pytest.raises(ValueError, match="at least 3"):
        make_synthetic("cuhkpedes", tmp_path, num_ids=2)


def test_cli(tmp_path: Path) -> None:
    out = main(["--format", "icfg", "--out", str(tmp_path / "icfg"), "--num-ids", "3", "--seed", "1"])
    splits = load_annotations("icfg", out)
    assert (split_counts(splits.train)[0], split_counts(splits.test)[0]) == (2, 1)


def test_part_maps_show_where_each_attribute_was_drawn(tmp_path: Path) -> None:
    from PIL import Image

    from datasets.synthetic.drawing import PARTS
    from datasets.synthetic.identities import COLOURS

    root = make_synthetic("cuhkpedes", tmp_path / "parts", num_ids=6, seed=3)
    described = json.loads((root / "parts.json").read_text())
    assert described["parts"] == list(PARTS)
    for name, words in described["images"].items():
        image = np.asarray(Image.open(root / "imgs" / name).convert("RGB"), dtype=np.float64)
        parts = np.asarray(Image.open(root / "parts" / f"{name}.png"))
        assert parts.shape == image.shape[:2] and parts.max() < len(PARTS)
        upper = parts == PARTS.index("upper")
        assert upper.mean() > 0.02  # the garment every caption names is always in sight
        # its pixels are far closer to the named colour than the rest of the picture is
        named = np.array(COLOURS[words["upper"].split()[0]], dtype=np.float64)
        inside = np.abs(image[upper] - named).mean()
        outside = np.abs(image[~upper & (parts == 0)] - named).mean()
        assert inside < outside, (name, inside, outside)
