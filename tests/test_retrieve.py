"""retrieve.py / engine.retrieval: indexing a folder, reusing the index, skipping bad files, search scores."""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pytest
import torch

from utils.checkpoint import atomic_save
from utils.config import load_config
from engine.retrieval import GalleryError, Retriever

TINY = ["model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.patch_size=16", "model.stride=16",
        "input.image_size=[64,32]", "text.tokenizer=train", "text.tokenizer_vocab_size=200", "model.vocab_size=200",
        "eval.batch_size=2", "data.num_workers=0", "eval.amp=false"]
QUERY = "a woman in a red coat and black pants with a backpack"


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory) -> Path:
    from datasets.synthetic import make_synthetic

    return make_synthetic("cuhkpedes", tmp_path_factory.mktemp("synth") / "cuhk", num_ids=8, seed=1)


def _checkpoint(path: Path, synth_root: Path, seed: int) -> Path:
    from datasets.readers import load_annotations
    from datasets.tokenizer import build_tokenizer, tokenizer_vocab
    from models.ivt import build_model

    cfg = load_config(None, TINY)
    captions = [r.caption for r in load_annotations("cuhkpedes", synth_root).train]
    tokenizer = build_tokenizer(cfg.text, captions)
    torch.manual_seed(seed)
    atomic_save({"format": "ivt-retrieval-checkpoint", "format_version": 1, "model": build_model(cfg).state_dict(),
                 "config": cfg.to_dict(), "tokenizer": {"vocab": tokenizer_vocab(tokenizer), "lowercase": True},
                 "epoch": 0, "step": 0}, path)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, synth_root) -> Path:
    return _checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pth", synth_root, seed=0)


@pytest.fixture
def gallery(tmp_path, synth_root) -> Path:
    """Five readable images (one in a subfolder), a broken .jpg and a text file that must be ignored."""
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    images = sorted((synth_root / "imgs").rglob("*.jpg"))[:5]
    for i, image in enumerate(images):
        shutil.copy(image, folder / ("sub" if i == 4 else "") / f"p{i}.jpg")
    (folder / "broken.jpg").write_bytes(b"not a jpeg at all")
    (folder / "notes.txt").write_text("not an image")
    return folder


def run(*argv: str):
    """retrieve.py's ranking of its one query as (path, score) pairs."""
    import retrieve

    records = retrieve.main(list(argv))
    assert len(records) == 1
    return [(hit.path, hit.score) for hit in records[0]["results"]]


def test_retrieve_writes_index_and_sheet_then_reuses_the_index(checkpoint, gallery, tmp_path, monkeypatch, caplog):
    from datasets.transforms import build_test_transform, load_image

    index_file, sheet = tmp_path / "photos.index.pt", tmp_path / "grid.png"
    args = ["--checkpoint", str(checkpoint), "--gallery", str(gallery), "--query", QUERY, "--top-k", "3",
            "--out", str(sheet), "--index-file", str(index_file)]
    with caplog.at_level(logging.WARNING, logger="engine.retrieval"):
        first = run(*args)
    assert "skipped 1 unreadable image(s) of 6" in caplog.text and "broken.jpg" in caplog.text
    assert index_file.is_file() and sheet.is_file()
    saved = torch.load(index_file, weights_only=True)
    assert sorted(Path(p).name for p in saved["paths"]) == ["p0.jpg", "p1.jpg", "p2.jpg", "p3.jpg", "p4.jpg"]
    assert [Path(p).name for p, _ in saved["skipped"]] == ["broken.jpg"]

    # the scores are the cosine similarities of the query and each image, encoded one at a time
    retriever = Retriever.from_checkpoint(checkpoint, device="cpu")
    transform = build_test_transform(retriever.cfg.input)
    query = retriever.encode_query(QUERY)
    with torch.no_grad():
        expected = {p: float(torch.nn.functional.normalize(
            retriever.model.encode_image(transform(load_image(p))[None], bmm=False)[1], dim=1)[0] @ query)
            for p in saved["paths"]}
    best = sorted(expected, key=expected.get, reverse=True)[:3]
    assert [p for p, _ in first] == best
    for path, score in first:
        assert score == pytest.approx(expected[path], abs=1e-5)

    # a second run reuses the file: encoding images now would fail
    def no_encoding(*_, **__):
        raise AssertionError("the index should have been reused")

    monkeypatch.setattr(Retriever, "_encode_images", no_encoding)
    assert run(*args) == first
    # the index file alone is a gallery too
    assert run("--checkpoint", str(checkpoint), "--gallery", str(index_file), "--query", QUERY, "--top-k", "3",
               "--out", str(sheet)) == first
    # a changed image invalidates the index
    os.utime(gallery / "p0.jpg", ns=(1, 1))
    with pytest.raises(AssertionError, match="reused"):
        run(*args)


def test_index_from_another_checkpoint_is_refused(checkpoint, synth_root, gallery, tmp_path):
    index_file = tmp_path / "idx.pt"
    Retriever.from_checkpoint(checkpoint, device="cpu").index(gallery, index_file=index_file)
    other = Retriever.from_checkpoint(_checkpoint(tmp_path / "other.pth", synth_root, seed=1), device="cpu")
    with pytest.raises(GalleryError, match="another checkpoint"):
        other.load_index(index_file)
    # given the folder, the other model re-encodes and overwrites the stale file
    gallery_index = other.index(gallery, index_file=index_file)
    assert torch.load(index_file, weights_only=True)["model_digest"] == gallery_index.model_digest == other.digest


def test_bad_galleries_give_one_line_errors(checkpoint, gallery, tmp_path):
    import retrieve

    def error(*argv: str) -> str:
        with pytest.raises(SystemExit) as info:
            retrieve.main(["--checkpoint", str(checkpoint), "--query", QUERY, "--out", str(tmp_path / "g.png"),
                           *argv])
        message = str(info.value.code)
        assert message.startswith("error: ") and "\n" not in message
        return message

    (tmp_path / "empty").mkdir()
    assert "no images found" in error("--gallery", str(tmp_path / "empty"))
    assert "gallery folder not found" in error("--gallery", str(tmp_path / "nowhere"))
    assert "broken.jpg: unreadable image" in error("--gallery", str(gallery), "--strict")
    assert "cannot be read as a gallery index" in error("--gallery", str(gallery / "notes.txt"))
    for name in ("p0.jpg", "p1.jpg", "p2.jpg", "p3.jpg", "sub/p4.jpg"):
        (gallery / name).unlink()
    assert "none of the 1 gallery images could be read" in error("--gallery", str(gallery))


def test_search_needs_a_gallery(checkpoint):
    with pytest.raises(GalleryError, match="no gallery"):
        Retriever.from_checkpoint(checkpoint, device="cpu").search(QUERY)
