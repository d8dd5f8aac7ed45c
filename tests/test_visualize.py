"""Example pictures: hit/miss frames and symbols, the first true match set apart, file names, the index page."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from utils import visualize as vis


def _gallery(tmp_path, n=12):
    gallery = []
    for i in range(n):
        path = tmp_path / f"img_{i:02d}.jpg"
        Image.new("RGB", (20, 40), (10 * i, 120, 200)).save(path)
        gallery.append((str(path), i % 4))  # persons 0..3
    return gallery


def _cell_top(image) -> int:
    """The y of the thumbnail row: cells sit at the bottom, under the header lines."""
    cell_h = vis.THUMB_SIZE[1] + 2 * vis.FRAME + vis._line_height(vis._font()) + vis._line_height(
        vis._font(vis.SMALL_FONT_SIZE))
    return image.height - vis.GAP - cell_h


def test_query_picture_marks_hits_and_adds_the_first_true_match(tmp_path):
    gallery = _gallery(tmp_path)
    queries = [("a person in a coat", 0), ("a person with a bag", 3)]
    top = torch.tensor([[0, 1, 2, 5, 6], [0, 1, 2, 5, 6]])  # query 0: hit, then misses; query 1: five misses
    scores = torch.linspace(0.9, 0.5, 5).repeat(2, 1)
    plain, extra = vis.save_query_examples(tmp_path / "out", queries, gallery, top, scores, 2, query_ids=[4, 7],
                                           first_matches=[None, (11, 37, 0.1)])
    assert (plain.name, extra.name) == ("query_00004.png", "query_00007.png")
    a, b = Image.open(plain).convert("RGB"), Image.open(extra).convert("RGB")
    cell = vis.THUMB_SIZE[0] + 2 * vis.FRAME
    assert b.width - a.width == vis.MATCH_GAP + cell + vis.GAP  # one more thumbnail, set apart
    xs = [vis.GAP + i * (cell + vis.GAP) for i in range(5)]

    def frame(image, x):  # the left edge of a cell, halfway down
        return image.getpixel((x + 1, _cell_top(image) + vis.THUMB_SIZE[1] // 2))

    def badge(image, x):  # the symbol's colour on its ring, and white strokes inside it
        cx = x + vis.FRAME + vis.MARK_RADIUS + 2
        cy = _cell_top(image) + vis.FRAME + vis.MARK_RADIUS + 2
        ring = image.getpixel((cx, cy - vis.MARK_RADIUS + 3))
        strokes = any(image.getpixel((cx + dx, cy + dy)) == vis.BACKGROUND for dx in range(-4, 5)
                      for dy in range(-4, 5))
        return ring, strokes

    assert [frame(a, x) for x in xs] == [vis.HIT_COLOUR] + [vis.MISS_COLOUR] * 4
    assert [frame(b, x) for x in xs] == [vis.MISS_COLOUR] * 5
    match_x = xs[-1] + cell + vis.GAP + vis.MATCH_GAP
    assert frame(b, match_x) == vis.HIT_COLOUR
    assert badge(a, xs[0]) == (vis.HIT_COLOUR, True) and badge(a, xs[1]) == (vis.MISS_COLOUR, True)
    assert badge(b, match_x) == (vis.HIT_COLOUR, True)


def test_elide_keeps_both_ends_of_a_file_name():
    font = vis._font(vis.SMALL_FONT_SIZE)
    name = "a_very_long_file_name_from_the_market_subset_0001.jpg"
    short = vis._elide(name, font, 100)
    assert vis._text_width(font, short) <= 100 and short.startswith("a_") and short.endswith(".jpg")
    assert "..." in short and vis._elide("p1.jpg", font, 100) == "p1.jpg"


def test_index_page_escapes_text(tmp_path):
    page = vis.write_examples_index(tmp_path / "index.html", "Examples <test>", [("R1", "50.00%")],
                                    [{"picture": "query_00001.png", "heading": "query 1",
                                      "text": 'a "tall" man & <dog>', "details": [("first true match", "rank 3")]}])
    text = page.read_text()
    assert "Examples &lt;test&gt;" in text and "a &quot;tall&quot; man &amp; &lt;dog&gt;" in text
    assert 'src="query_00001.png"' in text and "rank 3" in text and "50.00%" in text


def test_heat_overlay_marks_raising_regions_red_and_lowering_ones_blue(tmp_path):
    from types import SimpleNamespace

    from utils.visualize import contact_sheet, heat_overlay

    grey = Image.new("RGB", (20, 40), (128, 128, 128))
    shown = np.asarray(heat_overlay(grey, torch.tensor([[1.0], [0.0], [-1.0]]))).astype(int)
    top, middle, bottom = shown[2, 10], shown[20, 10], shown[37, 10]
    assert top[0] > 128 + 40 and top[2] < 128 - 40  # red where the share is largest
    assert bottom[2] > 128 + 40 and bottom[0] < 128 - 40  # blue where it is most negative
    assert abs(middle - 128).max() <= 2  # nothing where it is 0
    assert np.array_equal(np.asarray(heat_overlay(grey, torch.zeros(3, 1))), np.asarray(grey))
    # a contact sheet with explanations draws each image twice (the second with its map) and the best words
    path = tmp_path / "p.png"
    grey.save(path)
    why = SimpleNamespace(patch_map=torch.tensor([[1.0], [-1.0]]), method="gradient x input",
                          top_words=lambda: ["red", "coat"])
    plain = Image.open(contact_sheet([path], [0.5], "q", tmp_path / "plain.png"))
    explained = Image.open(contact_sheet([path], [0.5], "q", tmp_path / "why.png", [why]))
    assert explained.height > plain.height + 200


def test_heat_overlay_shows_where_most_comes_from_when_every_region_raises_the_score():
    """The demo model's contrastive maps raise the score everywhere (each patch 64-100% of the largest share):
    drawn by |share| / max, the whole picture turns red. Min-max among the raising regions, a coat named in the
    query (rows 2-3 of an 8 x 4 map, the largest shares) stands out and most of the picture stays unmarked."""
    from utils.visualize import heat_overlay, heat_weights

    shares = torch.full((8, 4), 0.64)
    shares[1], shares[4:] = 0.70, torch.tensor([0.72, 0.75, 0.68, 0.66])  # the rest: 64-75% of the largest
    shares[2:4, 1:3] = torch.tensor([[1.0, 0.97], [0.95, 0.92]])  # the coat
    weights = heat_weights(shares)
    assert float(weights.min()) == 0.0 and float(weights.max()) == 1.0
    assert weights[1, 0] == pytest.approx(0.06 / 0.36) and weights[2, 1] == 1.0
    grey = Image.new("RGB", (64, 128), (128, 128, 128))
    shown = np.asarray(heat_overlay(grey, shares)).astype(float)
    redness = shown[..., 0] - shown[..., 2]  # [H, W]; 0 on unmarked grey
    strong = redness >= redness.max() / 2
    assert strong.mean() < 0.2  # the coat's patches are 4 / 32 = 12.5% of the picture, blurred a little
    assert strong[32:64, 16:48].mean() > 0.6  # the pixels of the coat's patches
    assert redness[:16].max() < redness.max() / 4  # the head row, 64% like most: almost unmarked


def test_heat_weights_draw_lowering_regions_by_their_size_against_the_largest_share():
    from utils.visualize import heat_weights

    weights = heat_weights(torch.tensor([[2.0, 1.0], [-0.5, -2.0]]))
    assert weights.tolist() == [[1.0, 0.0], [-0.25, -1.0]]
    assert torch.equal(heat_weights(torch.tensor([[0.3, 0.3]])), torch.ones(1, 2))  # one value: all of it
    assert torch.equal(heat_weights(torch.zeros(2, 2)), torch.zeros(2, 2))
