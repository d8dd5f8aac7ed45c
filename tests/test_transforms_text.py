"""Image transforms (normalisation, flip, padding, erasing, load errors) and the text levels / caption cleaning."""
import random

import numpy as np
import pytest
import torch
from PIL import Image

from datasets.text_levels import (
    attribute_phrases,
    make_levels,
    phrase_level,
    pre_caption,
    sentence_level,
    word_level,
)
from datasets.transforms import build_test_transform, build_train_transform, load_image
from utils.config import load_config

GRAY = (128 / 255 - 0.5) / 0.5  # ToTensor then Normalize(0.5, 0.5) of pixel value 128


def input_cfg(*overrides):
    base = ["input.image_size=[32,16]", "input.random_erasing_prob=0.0", "input.hflip_prob=0.0", "input.pad_pixels=0"]
    return load_config(overrides=base + list(overrides)).input


def gray_image(w=20, h=40):
    return Image.new("RGB", (w, h), (128, 128, 128))


def noise_image(seed=0, w=20, h=40):
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


# ---------------------------------------------------------------- transforms


def test_train_transform_gray_image_normalises_to_known_value():
    out = build_train_transform(input_cfg())(gray_image())
    assert out.shape == (3, 32, 16) and out.dtype == torch.float32
    assert torch.allclose(out, torch.full_like(out, GRAY), atol=1e-6)


def test_test_transform_shape_and_mean_std():
    cfg = input_cfg("input.pixel_mean=[0.25,0.5,0.75]", "input.pixel_std=[0.5,0.25,0.125]")
    out = build_test_transform(cfg)(gray_image(w=7, h=9))
    assert out.shape == (3, 32, 16)
    v = 128 / 255
    expected = torch.tensor([(v - 0.25) / 0.5, (v - 0.5) / 0.25, (v - 0.75) / 0.125])
    assert torch.allclose(out.mean(dim=(1, 2)), expected, atol=1e-5)
    assert torch.allclose(out.std(dim=(1, 2)), torch.zeros(3), atol=1e-5)


def test_flip_prob_one_mirrors_the_test_pipeline():
    image = noise_image()
    train = build_train_transform(input_cfg("input.hflip_prob=1.0", "input.interpolation=bilinear"))
    test = build_test_transform(input_cfg())
    assert torch.allclose(train(image), test(image).flip(-1), atol=1e-6)


def test_padding_and_crop_shift_in_zero_border():
    train = build_train_transform(input_cfg("input.pad_pixels=4"))
    torch.manual_seed(0)
    outs = [train(gray_image()) for _ in range(20)]
    values = torch.stack(outs).unique()
    # Only the gray content or the zero padding (0 -> -1 after normalisation) can appear.
    assert all(abs(v - GRAY) < 1e-5 or abs(v + 1.0) < 1e-6 for v in values.tolist())
    padded = [bool((o < -0.99).any()) for o in outs]
    assert any(padded)  # a crop offset other than the centre shows the border
    assert all(o.shape == (3, 32, 16) for o in outs)


def test_random_erasing_prob_one_erases_a_bounded_rectangle():
    train = build_train_transform(input_cfg("input.random_erasing_prob=1.0"))
    random.seed(3)
    torch.manual_seed(3)
    for _ in range(10):
        out = train(gray_image())
        changed = (out - GRAY).abs().amax(dim=0) > 1e-4  # [H, W]
        rows, cols = changed.any(1).nonzero(), changed.any(0).nonzero()
        area = changed.sum().item() / changed.numel()
        assert 0.005 < area < 0.4  # timm's area range 0.02..1/3, with rounding of h and w
        box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        assert changed.sum().item() >= 0.9 * box.item()  # one rectangle (noise can hit GRAY only by chance)


def test_unknown_interpolation_is_a_clear_error():
    with pytest.raises(ValueError, match="input.interpolation"):
        build_train_transform(input_cfg("input.interpolation=cubicish"))


def test_load_image_errors_name_the_path(tmp_path):
    missing = tmp_path / "nope.jpg"
    with pytest.raises(FileNotFoundError, match="nope.jpg"):
        load_image(missing)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"this is not a jpeg")
    with pytest.raises(OSError, match="broken.jpg"):
        load_image(broken)
    good = tmp_path / "ok.png"
    Image.new("L", (5, 6), 7).save(good)
    image = load_image(good)
    assert image.mode == "RGB" and image.size == (5, 6) and image.getpixel((0, 0)) == (7, 7, 7)


# ---------------------------------------------------------------- text levels

EDGE_CAPTIONS = [
    "",
    "   ",
    ".",
    "...,,,[]",
    "[]",
    "a",
    "man.",
    "no comma in this caption at all",
    "[A woman in a blue coat, black boots.]",
    "short,x,y",
    "A man in a red jacket and black pants carrying a black backpack.",
    "The woman has long black hair, wears white shoes. She carries a bag, and a phone.",
]


def test_sentence_level():
    assert sentence_level("  A Man In RED. ") == "a man in red."
    assert sentence_level("A Man", lowercase=False) == "A Man"


def test_phrase_level_hand_checked():
    caption = "[The man wears a black coat, blue jeans and white shoes. He carries a bag, a cup.]"
    # sentence 1: longest piece "The man wears a black coat", rest " blue jeans and white shoes";
    # sentence 2: longest " He carries a bag", rest " a cup" (6 chars > 5).
    expected = {"The man wears a black coat", "blue jeans and white shoes", "He carries a bag", "a cup"}
    seen = {phrase_level(caption, random.Random(s)) for s in range(200)}
    assert seen == expected


def test_phrase_level_short_pieces_fall_back_to_caption():
    assert phrase_level("ab,cd,ef", random.Random(0)) == "ab,cd,ef"  # "ab" and "cd,ef" are <= 5 chars
    assert phrase_level("", random.Random(0)) == ""


@pytest.mark.parametrize("caption", EDGE_CAPTIONS)
@pytest.mark.parametrize("phrases", [None, (), ("",), ("red hat", "  ")])
def test_levels_never_crash_and_are_seeded(caption, phrases):
    levels = ("word", "phrase", "sentence")
    first = make_levels(caption, phrases, levels, random.Random(42))
    again = make_levels(caption, phrases, levels, random.Random(42))
    assert first == again
    assert len(first) == 3 and all(isinstance(t, str) for t in first)
    assert first[2] == caption.strip().lower()


def test_word_level_uses_annotated_phrases():
    phrases = ("red hat", "blue bag", "white shoes", "long hair")
    draws = [word_level("ignored caption", phrases, random.Random(s)) for s in range(300)]
    sizes = [len(d.split(",")) for d in draws]
    assert set(sizes) == {1, 2, 3, 4}  # k is uniform in 1..4
    for d in draws:
        parts = d.split(",")
        assert len(set(parts)) == len(parts) and set(parts) <= set(phrases)
    assert abs(np.mean(sizes) - 2.5) < 0.25


def test_word_level_falls_back_to_chunker_then_clause_then_caption():
    caption = "a man in a red jacket and black pants carrying a black backpack"
    draws = {word_level(caption, None, random.Random(s)) for s in range(100)}
    assert all(set(d.split(",")) <= {"red jacket", "black pants", "black backpack"} for d in draws)
    assert len(draws) > 3  # several subsets occur
    for s in range(5):  # an empty phrase tuple behaves like no phrases
        assert word_level(caption, (), random.Random(s)) == word_level(caption, None, random.Random(s))
    # no attribute phrase: the clause rule
    assert word_level("somebody walks, along the street", None, random.Random(0)) in {
        "somebody walks",
        "along the street",
    }
    assert word_level("hi", None, random.Random(0)) == "hi"


def test_make_levels_order_and_lowercase():
    caption = "A Man in a RED jacket, carrying a black backpack."
    texts = make_levels(caption, ("Red Jacket",), ("sentence", "word"), random.Random(0))
    assert texts == ["a man in a red jacket, carrying a black backpack.", "red jacket"]
    with pytest.raises(ValueError, match="text.levels"):
        make_levels(caption, None, ("paragraph",), random.Random(0))


def test_attribute_phrases_typical_captions():
    got = attribute_phrases("a man in a red jacket and black pants carrying a black backpack")
    assert got == ["red jacket", "black pants", "black backpack"]
    got = attribute_phrases(
        "The woman has long black hair. She wears white shoes, a light-blue t-shirt and black and white "
        "striped shorts; a shoulder bag."
    )
    assert got == [
        "long black hair",
        "white shoes",
        "light-blue t-shirt",
        "black and white striped shorts",
        "shoulder bag",
    ]
    assert attribute_phrases("") == [] and attribute_phrases("a person walking down the street") == []
    assert attribute_phrases("Red hat, red hat.") == ["red hat"]  # lower-cased, no duplicates


def test_pre_caption():
    text = "A <person> riding a bike-path/road, (happily)!  \"Yes\":  it's #1~ ok;*?"
    assert pre_caption(text, 50) == "a person riding a bike path road happily yes its 1 ok"
    assert pre_caption(text, 3) == "a person riding"
    assert pre_caption("", 5) == "" and pre_caption("...", 5) == ""
