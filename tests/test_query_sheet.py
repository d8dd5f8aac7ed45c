"""The image-query contact sheet shows the query image first (top left), then the ranked gallery images."""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from tests.search_fixtures import copy_gallery, make_checkpoint
from utils.visualize import THUMB_SIZE, contact_sheet


def letterboxed(path: Path) -> np.ndarray:
    """The image fitted into THUMB_SIZE and centred on white, computed here with PIL alone."""
    with Image.open(path) as image:
        small = ImageOps.contain(image.convert("RGB"), THUMB_SIZE)
    canvas = Image.new("RGB", THUMB_SIZE, (255, 255, 255))
    canvas.paste(small, ((THUMB_SIZE[0] - small.width) // 2, (THUMB_SIZE[1] - small.height) // 2))
    return np.asarray(canvas)


def where(sheet: Path, thumb: np.ndarray) -> list[tuple[int, int]]:
    """Every (x, y) at which ``thumb`` appears exactly in the picture ``sheet`` (PNG: lossless)."""
    pixels = np.asarray(Image.open(sheet).convert("RGB"))
    h, w = thumb.shape[:2]
    rows, cols = pixels.shape[0] - h + 1, pixels.shape[1] - w + 1
    r, c = np.argwhere((thumb != 255).any(axis=2))[0]  # a pixel of the person, not of the white margin
    candidates = np.argwhere((pixels[r:r + rows, c:c + cols] == thumb[r, c]).all(axis=2))
    return [(int(x), int(y)) for y, x in candidates if (pixels[y:y + h, x:x + w] == thumb).all()]


@pytest.fixture(scope="module")
def people(tmp_path_factory) -> list[Path]:
    from datasets.synthetic import make_synthetic

    root = make_synthetic("cuhkpedes", tmp_path_factory.mktemp("synth") / "cuhk", num_ids=4, seed=5)
    return copy_gallery(root, tmp_path_factory.mktemp("gallery"), count=4)


def test_the_query_comes_first_and_the_results_follow(people, tmp_path):
    query, results = people[0], people[1:3]
    sheet = contact_sheet(results, [0.9, 0.5], "image query", tmp_path / "q.png", query_image=query)
    (qx, qy), = where(sheet, letterboxed(query))
    (rx, ry), = where(sheet, letterboxed(results[0]))
    assert qx < THUMB_SIZE[0] // 2 and qy < 2 * THUMB_SIZE[1] // 3  # top left: before any result, on the first row
    assert ry == qy and rx > qx + THUMB_SIZE[0]  # the best result on the same row, to its right
    plain = contact_sheet(results, [0.9, 0.5], "image query", tmp_path / "plain.png")
    assert where(plain, letterboxed(query)) == [] and where(plain, letterboxed(results[0]))[0] == (qx, qy)


def test_retrieve_s_image_query_sheet_shows_the_query(people, tmp_path):
    from engine.retrieval import Retriever
    from engine.search_session import search_all

    from datasets.synthetic import make_synthetic

    synth = make_synthetic("cuhkpedes", tmp_path / "cuhk", num_ids=4, seed=6)
    retriever = Retriever.from_checkpoint(make_checkpoint(tmp_path / "m.pth", synth, seed=0), device="cpu")
    retriever.index([str(p) for p in people[1:]])
    args = argparse.Namespace(image=[str(people[0])], top_k=2, rerank=False, why=False)
    records = search_all(retriever, [], args, tmp_path / "sheet.png")
    sheet = Path(records[0]["sheet"])
    assert records[0]["kind"] == "image" and sheet == tmp_path / "sheet.png"
    (qx, qy), = where(sheet, letterboxed(people[0]))
    best = Path(records[0]["results"][0].path)
    (bx, by), = where(sheet, letterboxed(best))
    assert by == qy and bx > qx + THUMB_SIZE[0]
