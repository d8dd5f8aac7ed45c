"""The further synthetic styles (street, cctv): every format loads through the readers, each style is
byte-deterministic per seed, the classic style is unchanged, and the styles really differ in pictures and words."""
from __future__ import annotations

import hashlib
import io
import json
import logging
import random
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datasets import synthetic
from datasets.readers import check_images, load_annotations, load_pretrain_corpora, split_counts
from datasets.synthetic import STYLE_TABLE, STYLES, caption_words, make_synthetic
from datasets.synthetic.__main__ import main

NEW_STYLES = [s for s in STYLES if s != "classic"]
RETRIEVAL = ("cuhkpedes", "icfg", "rstp")


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 24-identity CUHK-PEDES-format set of every style (seed 4)."""
    base = tmp_path_factory.mktemp("styles")
    return {style: make_synthetic("cuhkpedes", base / style, num_ids=24, seed=4, style=style) for style in STYLES}


def test_the_held_out_style_is_a_known_style() -> None:
    assert synthetic.HELD_OUT_STYLE in NEW_STYLES and len(NEW_STYLES) >= 2


@pytest.mark.parametrize("style", NEW_STYLES)
@pytest.mark.parametrize("fmt", RETRIEVAL)
def test_every_format_loads_through_the_readers(tmp_path: Path, caplog: pytest.LogCaptureFixture, style: str,
                                                fmt: str) -> None:
    root = make_synthetic(fmt, tmp_path / fmt, num_ids=10, seed=1, style=style)
    marker = json.loads((root / "SYNTHETIC.json").read_text())
    assert (marker["format"], marker["style"], marker["num_ids"]) == (fmt, style, 10)
    with caplog.at_level(logging.WARNING):
        splits = load_annotations(fmt, root)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    sizes = synthetic.split_sizes(fmt, 10)
    for name in ("train", "val", "test"):
        ids, images, captions = split_counts(getattr(splits, name))
        expected = marker["counts"].get(name, {"ids": 0, "images": 0, "captions": 0})
        assert (ids, images, captions) == (expected["ids"], expected["images"], expected["captions"])
        assert ids == sizes.get(name, 0)
    check_images(splits.train + splits.val + splits.test, decode=True)


@pytest.mark.parametrize("style", NEW_STYLES)
def test_pretrain_format(tmp_path: Path, style: str) -> None:
    root = make_synthetic("pretrain", tmp_path, num_ids=5, seed=0, style=style)
    records = load_pretrain_corpora([{"annotation": str(root / "pretrain.json"), "image_root": str(root)}])
    assert len(records) == json.loads((root / "SYNTHETIC.json").read_text())["counts"]["train"]["images"]
    check_images(records, decode=True)


@pytest.mark.parametrize("style", NEW_STYLES)
def test_byte_deterministic_for_a_seed(tmp_path: Path, style: str) -> None:
    first = _tree(make_synthetic("rstp", tmp_path / "a", num_ids=4, seed=7, style=style))
    second = _tree(make_synthetic("rstp", tmp_path / "b", num_ids=4, seed=7, style=style))
    other = _tree(make_synthetic("rstp", tmp_path / "c", num_ids=4, seed=8, style=style))
    assert len(first) == 4 * 5 + 2 and first == second
    assert first["data_captions.json"] != other["data_captions.json"]


def test_classic_is_the_default_and_unchanged(tmp_path: Path) -> None:
    """The README's figures come from the classic style: these digests were taken before the styles existed."""
    digests = {"cuhkpedes": "de5bd00196b5a05cdd86b12e55072db51d9d97b378641a6b4d5f001c8b351d4d",
               "pretrain": "104cd7effc6eb5226bb7d7bb7c15486f47f050583a0684f20a2c8bc9c3a82020"}
    for fmt, digest in digests.items():
        root = make_synthetic(fmt, tmp_path / fmt, num_ids=12, seed=3)  # no style: the classic one
        h = hashlib.sha256()
        for name, data in _tree(root).items():
            if name.startswith("parts"):  # the part maps came later, beside the pinned files (which stay as they were)
                continue
            h.update(name.encode())
            h.update(data)
        assert h.hexdigest() == digest, fmt
    assert _tree(make_synthetic("icfg", tmp_path / "x", num_ids=4, seed=1)) == _tree(
        make_synthetic("icfg", tmp_path / "y", num_ids=4, seed=1, style="classic"))


def _captions(root: Path) -> list[str]:
    return [c for e in json.loads((root / "reid_raw.json").read_text()) for c in e["captions"]]


def _images(root: Path) -> list[np.ndarray]:
    entries = json.loads((root / "reid_raw.json").read_text())
    return [np.asarray(Image.open(root / "imgs" / e["file_path"]).convert("RGB"), dtype=np.float64)
            for e in entries]


def test_styles_differ_in_their_words(made: dict[str, Path]) -> None:
    """Jaccard overlap of the caption vocabularies stays below a half for every pair of styles."""
    words = {style: caption_words(_captions(root)) for style, root in made.items()}
    for i, a in enumerate(STYLES):
        for b in STYLES[i + 1:]:
            overlap = len(words[a] & words[b]) / len(words[a] | words[b])
            assert overlap < 0.5, (a, b, overlap)
    # each new style has attribute words no other style uses
    assert {"navy", "crimson", "chinos"} <= words["street"] - words["classic"] - words["cctv"]
    assert {"scarlet", "cobalt", "joggers"} <= words["cctv"] - words["classic"] - words["street"]


def test_styles_differ_in_their_pictures(made: dict[str, Path]) -> None:
    """Image sizes (classic one fixed size, the others varied, cctv smaller) and brightness/saturation differ."""
    stats = {}
    for style, root in made.items():
        images = _images(root)
        heights = [im.shape[0] for im in images]
        aspect = [im.shape[0] / im.shape[1] for im in images]
        saturation = [float((im.max(axis=2) - im.min(axis=2)).mean()) for im in images]
        stats[style] = (heights, float(np.mean(aspect)), float(np.mean([im.mean() for im in images])),
                        float(np.mean(saturation)))
    assert set(stats["classic"][0]) == {synthetic.IMAGE_HEIGHT}
    assert len(set(stats["street"][0])) > 5 and min(stats["street"][0]) >= 160
    assert len(set(stats["cctv"][0])) > 5 and max(stats["cctv"][0]) <= 150
    assert stats["street"][1] > stats["classic"][1] + 0.3  # taller, narrower crops
    assert stats["cctv"][2] < stats["classic"][2] - 15  # dim
    assert stats["cctv"][3] < 0.9 * stats["classic"][3]  # washed-out colours (the muted backgrounds dilute it)


def test_street_mixes_png_and_jpeg_and_cctv_compresses_hard(made: dict[str, Path]) -> None:
    names = [e["file_path"] for e in json.loads((made["street"] / "reid_raw.json").read_text())]
    assert any(n.endswith(".png") for n in names) and any(n.endswith(".jpg") for n in names)
    cctv = [p.stat().st_size / (Image.open(p).width * Image.open(p).height)
            for p in (made["cctv"] / "imgs").rglob("*.jpg")]
    classic = [p.stat().st_size / (Image.open(p).width * Image.open(p).height)
               for p in (made["classic"] / "imgs").rglob("*.jpg")]
    assert np.mean(cctv) < 0.8 * np.mean(classic)  # bytes per pixel: heavy JPEG


@pytest.mark.parametrize("style", NEW_STYLES)
def test_captions_single_out_the_identity(made: dict[str, Path], style: str) -> None:
    """Every caption names the upper garment's colour (in this style's words); lower garments too when worn."""
    words_of = STYLE_TABLE[style].COLOUR_WORDS
    identities = {raw_id: who for _, raw_id, who in synthetic.sample_identities("cuhkpedes", 24, 4, style=style)}
    typos = 0
    for entry in json.loads((made[style] / "reid_raw.json").read_text()):
        who = identities[entry["id"]]
        for caption in entry["captions"]:
            text = caption.lower()
            found = any(re.search(rf"\b{re.escape(w)}\b", text) for w in words_of[who.upper_colour])
            if who.lower_colour is not None:
                found &= any(re.search(rf"\b{re.escape(w)}\b", text) for w in words_of[who.lower_colour])
            typos += not found  # a typo may hit a colour word (cctv only)
    assert typos == 0 if style == "street" else typos < 10


def test_unknown_style(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown synthetic style 'anime'"):
        make_synthetic("cuhkpedes", tmp_path, num_ids=5, style="anime")


def test_cli_style(tmp_path: Path) -> None:
    out = main(["--format", "rstp", "--out", str(tmp_path / "r"), "--num-ids", "3", "--style", "cctv"])
    assert json.loads((out / "SYNTHETIC.json").read_text())["style"] == "cctv"
    assert split_counts(load_annotations("rstp", out).train)[0] == 1


def test_config_key_declares_the_default_style() -> None:
    import inspect

    from utils.config import load_config

    default = inspect.signature(make_synthetic).parameters["style"].default
    assert load_config(None).data.synthetic_style == default == "classic"
    assert load_config(None, ["data.synthetic_style=cctv"]).data.synthetic_style in STYLES


def test_the_engine_synthesises_the_configured_style(tmp_path):
    from engine.data import synthesize_if_missing
    from utils.config import load_config

    root = tmp_path / "street"
    synthesize_if_missing(load_config(None, [f"data.root={root}", "data.synthesize_if_missing=true",
                                             "data.synthetic_num_ids=6", "data.synthetic_style=street"]))
    first = load_annotations("cuhkpedes", root).train[0].image_path
    height, width = Image.open(first).size[::-1]
    assert height >= 160 and height / width >= 2.4  # street's tall crops, not classic's 128x64


def test_the_style_table_is_the_configs_list_of_styles() -> None:
    from utils.config import CHOICES, load_config

    assert tuple(STYLE_TABLE) == STYLES == CHOICES["data.synthetic_style"]
    with pytest.raises(ValueError, match="synthetic_style"):
        load_config(None, ["data.synthetic_style=anime"])


@pytest.mark.parametrize("style", STYLES)
def test_every_style_module_has_the_interface(style: str) -> None:
    module = STYLE_TABLE[style]
    who = synthetic.sample_identities("cuhkpedes", 5, 0, style=style)[0][2]
    rng = random.Random(0)
    picture = module.picture(who, rng, np.random.default_rng(0))
    assert picture.suffix in (".jpg", ".png") and picture.view in ("front", "back", "left", "right")
    image = Image.open(io.BytesIO(picture.data))
    assert image.format == {".jpg": "JPEG", ".png": "PNG"}[picture.suffix] and image.mode == "RGB"
    caption = module.caption(who, picture.view, rng, synthetic.key_fields(5))
    assert len(caption.split()) >= 3
    assert set(module.MARKER) <= {"image_size", "image_height_range", "aspect_range"} and module.MARKER


def test_a_new_style_is_one_module_and_one_table_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The one writer loop dispatches through the table: a style it has never seen writes every file of a set."""
    from datasets.synthetic import writer
    from datasets.synthetic.drawing import Picture, encode

    class Plain:  # stands for a new module: grey pictures, captions naming the upper garment
        MARKER = {"image_size": [8, 4]}

        @staticmethod
        def picture(who, rng, noise) -> Picture:
            return Picture(encode(Image.new("RGB", (4, 8), (128, 128, 128)), "PNG", 0), ".png", "front")

        @staticmethod
        def caption(who, view, rng, always) -> str:
            return f"a person in {who.upper_colour} number {rng.randrange(10**6)}"

    monkeypatch.setitem(writer.STYLE_TABLE, "plain", Plain)
    monkeypatch.setattr(writer, "STYLES", (*STYLES, "plain"))
    root = make_synthetic("rstp", tmp_path / "plain", num_ids=6, seed=0, style="plain")
    marker = json.loads((root / "SYNTHETIC.json").read_text())
    assert marker["style"] == "plain" and marker["image_size"] == [8, 4]
    train = load_annotations("rstp", root).train
    assert len(train) == marker["counts"]["train"]["captions"] == 4 * 5 * 2  # 4 train ids x 5 images x 2 captions
    assert all(r.image_path.endswith(".png") and r.caption.startswith("a person in ") for r in train)
