"""retrieve.py / engine.retrieval: indexing, index reuse, bad files, scores, batched search, image queries,
re-ranking, out-of-vocabulary words, several queries, JSON lines, the interactive prompt."""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pytest
import torch

from engine.gallery_index import open_gallery
from engine.retrieval import CaptionResult, GalleryError, QueryError, Retriever, SearchResult
from tests.search_fixtures import QUERY, make_checkpoint


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory) -> Path:
    from datasets.synthetic import make_synthetic

    return make_synthetic("cuhkpedes", tmp_path_factory.mktemp("synth") / "cuhk", num_ids=8, seed=1)


def _checkpoint(path: Path, synth_root: Path, seed: int) -> Path:
    return make_checkpoint(path, synth_root, seed)


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

    index_file, sheet = tmp_path / "photos.index", tmp_path / "grid.png"
    args = ["--checkpoint", str(checkpoint), "--gallery", str(gallery), "--query", QUERY, "--top-k", "3",
            "--out", str(sheet), "--index-file", str(index_file)]
    with caplog.at_level(logging.WARNING, logger="engine.retrieval"):
        first = run(*args)
    assert "skipped 1 unreadable image(s) of 6" in caplog.text and "broken.jpg" in caplog.text
    assert (index_file / "manifest.json").is_file() and sheet.is_file()
    saved = open_gallery(index_file)
    assert sorted(Path(p).name for p in saved.paths) == ["p0.jpg", "p1.jpg", "p2.jpg", "p3.jpg", "p4.jpg"]
    assert [Path(p).name for p, _ in saved.skipped] == ["broken.jpg"]

    # the scores are the cosine similarities of the query and each image, encoded one at a time
    retriever = Retriever.from_checkpoint(checkpoint, device="cpu")
    transform = build_test_transform(retriever.cfg.input)
    query = retriever.encode_query(QUERY)
    with torch.no_grad():
        expected = {p: float(torch.nn.functional.normalize(
            retriever.model.encode_image(transform(load_image(p))[None], bmm=False)[1], dim=1)[0] @ query)
            for p in saved.paths}
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
    index_file = tmp_path / "idx.index"
    built = Retriever.from_checkpoint(checkpoint, device="cpu").index(gallery, index_file=index_file)
    other = Retriever.from_checkpoint(_checkpoint(tmp_path / "other.pth", synth_root, seed=1), device="cpu")
    with pytest.raises(GalleryError, match="another checkpoint"):
        other.load_index(index_file)
    # given the folder, the other model refuses to add its features to this index: two models never mix
    with pytest.raises(GalleryError, match="another model"):
        other.index(gallery, index_file=index_file)
    assert torch.equal(open_gallery(index_file).features, built.features)  # and the index is untouched


def test_a_flipped_byte_in_an_index_is_refused_or_rebuilt(checkpoint, gallery, tmp_path, caplog):
    import retrieve

    index_file = tmp_path / "g.index"
    retriever = Retriever.from_checkpoint(checkpoint, device="cpu")
    built = retriever.index(gallery, index_file=index_file).features  # a copy: the index itself is memory-mapped
    shard = next((index_file / "shards").glob("*.npy"))
    raw = bytearray(shard.read_bytes())
    at = bytes(raw).find(built[0].numpy().tobytes())  # the first feature row, stored as is
    assert at > 0
    raw[at + 3] ^= 0x40  # an exponent bit of its first value: the score of that image would be off by far
    shard.write_bytes(bytes(raw))
    assert abs(float(open_gallery(index_file, verify_max_mib=0).features[0, 0])) > 1e30  # it still opens as such
    with pytest.raises(GalleryError, match="does not match its sha256"):
        Retriever.from_checkpoint(checkpoint, device="cpu").load_index(index_file)
    with pytest.raises(SystemExit) as info:
        retrieve.main(["--checkpoint", str(checkpoint), "--gallery", str(index_file), "--query", QUERY,
                       "--out", str(tmp_path / "s.png")])
    assert str(info.value.code).startswith("error: ") and "g.index" in str(info.value.code)
    # given the folder as well, the corrupt shard is encoded again and the rebuilt index verifies
    with caplog.at_level(logging.WARNING):
        again = Retriever.from_checkpoint(checkpoint, device="cpu").index(gallery, index_file=index_file)
    assert "encoded again" in caplog.text
    assert torch.equal(again.features, built)
    assert torch.equal(Retriever.from_checkpoint(checkpoint, device="cpu").load_index(index_file).features, built)


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


# ------------------------------------------------------------------------------------- the Python API
QUERIES = [QUERY, "a man in a blue jacket and gray shorts", "a girl with long black hair in a yellow dress",
           "a person carrying a handbag"]


@pytest.fixture(scope="module")
def indexed(checkpoint, synth_root) -> Retriever:
    retriever = Retriever.from_checkpoint(checkpoint, device="cpu")
    retriever.index(sorted(str(p) for p in (synth_root / "imgs").rglob("*.jpg"))[:12])
    return retriever


def test_batched_search_equals_single_searches(indexed):
    batched = indexed.search(QUERIES, k=5)
    assert len(batched) == len(QUERIES)
    for query, results in zip(QUERIES, batched):
        single = indexed.search(query, k=5)
        assert all(isinstance(r, SearchResult) for r in single)
        assert [tuple(r) for r in single] == [(r.path, r.score) for r in single]  # unpacks as (path, score)
        assert [r.path for r in results] == [r.path for r in single]
        assert [r.rank for r in results] == [1, 2, 3, 4, 5]
        assert [r.score for r in results] == pytest.approx([r.score for r in single], abs=1e-5)
        assert [r.score for r in single] == sorted((r.score for r in single), reverse=True)
    # the features of a batch (padded to its longest caption) are those of one caption at a time
    one_by_one = torch.stack([indexed.encode_query(q) for q in QUERIES])
    assert torch.allclose(indexed.encode_texts(QUERIES), one_by_one, atol=1e-5)
    # k larger than the gallery gives the whole gallery; bad k and empty queries are user errors
    assert len(indexed.search(QUERY, k=100)) == 12
    with pytest.raises(QueryError, match="k must be"):
        indexed.search(QUERY, k=0)
    with pytest.raises(QueryError, match="empty query"):
        indexed.search("   ")
    with pytest.raises(QueryError, match="query 2 of 2 is empty"):
        indexed.search([QUERY, ""])


def test_search_image_and_describe(indexed, tmp_path):
    from PIL import Image

    path = indexed.gallery.paths[3]
    by_path = indexed.search_image(path, k=3)
    assert by_path[0].path == path and by_path[0].score == pytest.approx(1.0, abs=1e-5)
    with Image.open(path) as image:
        by_pil = indexed.search_image(image, k=3)
    assert [r.path for r in by_pil] == [r.path for r in by_path]
    # image-to-text: captions ranked by the cosine of their features with the image's
    described = indexed.describe(path, k=3, captions=QUERIES)
    image_feature = indexed.encode_images([path])[0]
    expected = sorted(QUERIES, key=lambda q: float(indexed.encode_query(q) @ image_feature), reverse=True)[:3]
    assert [c.text for c in described] == expected and all(isinstance(c, CaptionResult) for c in described)
    assert indexed.describe(path, k=1)[0].text == expected[0]  # the caption list is kept
    (tmp_path / "notes.jpg").write_text("not an image")
    with pytest.raises(QueryError, match="not a readable image"):
        indexed.search_image(tmp_path / "notes.jpg")
    with pytest.raises(QueryError, match="not found"):
        indexed.search_image(tmp_path / "missing.jpg")


def test_out_of_vocabulary_words_are_reported_once(indexed, caplog):
    assert indexed.out_of_vocabulary("a zqxv coat, a red coat") == ["zqxv"]
    with caplog.at_level(logging.WARNING, logger="engine.retrieval"):
        indexed.search("a woman in a zqxv coat", k=2)
        indexed.search(["zqxv shoes", "a man in a red coat"], k=2)
    assert caplog.text.count("zqxv") == 1 and "out of vocabulary" in caplog.text


@pytest.fixture(scope="module")
def fusion_retriever(tmp_path_factory, synth_root) -> Retriever:
    path = make_checkpoint(tmp_path_factory.mktemp("fusion") / "fusion.pth", synth_root, seed=3,
                           extra=["model.fusion_layers=1"])
    retriever = Retriever.from_checkpoint(path, device="cpu")
    retriever.index(sorted(str(p) for p in (synth_root / "imgs").rglob("*.jpg"))[:10])
    return retriever


def test_rerank_orders_the_top_candidates_by_the_itm_head(fusion_retriever, indexed):
    from datasets.transforms import load_image
    from engine.encoding import encode_text_tokens, itm_score

    retriever = fusion_retriever
    plain = retriever.search(QUERY, k=4, rerank=False)
    assert all(r.itm_score is None for r in plain)
    reranked = retriever.search(QUERY, k=4, rerank=True)  # eval.rerank_top_k=0: re-ranks the top k
    assert {r.path for r in reranked} == {r.path for r in plain}
    itm = [r.itm_score for r in reranked]
    assert itm == sorted(itm, reverse=True) and [r.rank for r in reranked] == [1, 2, 3, 4]
    cosine = {r.path: r.score for r in plain}
    assert all(r.score == pytest.approx(cosine[r.path], abs=1e-6) for r in reranked)
    # each ITM score is the score evaluation re-ranks by (itm_score of the ITM logits) of that (caption, image) pair
    model = retriever.model
    with torch.no_grad():
        tokens, mask, _ = encode_text_tokens(model, retriever.tokenizer, [QUERY], retriever.cfg.text.max_text_len, "cpu")
        for hit in reranked:
            image_tokens, _ = model.encode_image(retriever.transform(load_image(hit.path))[None], bmm=False)
            logits = model.itm_logits(tokens, mask, image_tokens)[0]
            assert hit.itm_score == pytest.approx(float(itm_score(logits[None])[0]), abs=1e-4)
    # batched re-ranking gives the same as one query at a time
    both = retriever.search([QUERY, QUERIES[1]], k=3, rerank=True)
    assert [r.path for r in both[1]] == [r.path for r in retriever.search(QUERIES[1], k=3, rerank=True)]
    with pytest.raises(QueryError, match="fusion stack"):
        indexed.search(QUERY, rerank=True)


# ------------------------------------------------------------------------------------------ retrieve.py
def test_several_queries_write_json_lines_and_one_sheet_each(checkpoint, gallery, tmp_path):
    import json

    import retrieve

    queries_file = tmp_path / "queries.txt"
    queries_file.write_text(f"{QUERIES[1]}\n\n{QUERIES[2]}\n")
    out = tmp_path / "sheets" / "hits.png"
    records = retrieve.main(["--checkpoint", str(checkpoint), "--gallery", str(gallery), "--query", QUERY,
                             "--queries-file", str(queries_file), "--image", str(gallery / "p1.jpg"),
                             "--top-k", "3", "--out", str(out)])
    assert [r["query"] for r in records] == [QUERY, QUERIES[1], QUERIES[2], str(gallery / "p1.jpg")]
    assert [r["kind"] for r in records] == ["text", "text", "text", "image"]
    sheets = [Path(r["sheet"]) for r in records]
    assert [s.name for s in sheets] == ["hits_001.png", "hits_002.png", "hits_003.png", "hits_004.png"]
    assert all(s.is_file() for s in sheets)
    lines = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    assert [line["query"] for line in lines] == [r["query"] for r in records]
    assert lines[0]["results"][0].keys() == {"path", "score", "rank"}
    assert [h["rank"] for h in lines[1]["results"]] == [1, 2, 3]
    assert Path(lines[3]["results"][0]["path"]).name == "p1.jpg"  # an image finds itself first
    # the same texts through the API, batched, give the same rankings
    retriever = Retriever.from_checkpoint(checkpoint, device="cpu")
    retriever.index(gallery)
    api = retriever.search([QUERY, QUERIES[1], QUERIES[2]], k=3)
    assert [[h["path"] for h in line["results"]] for line in lines[:3]] == [[r.path for r in q] for q in api]


def test_interactive_prompt(checkpoint, gallery, tmp_path, monkeypatch, capsys):
    import io

    import retrieve

    monkeypatch.setattr("sys.stdin", io.StringIO(f"{QUERY}\n\n   \n{QUERIES[1]}\nquit\nnever read\n"))
    out = tmp_path / "live.png"
    records = retrieve.main(["--checkpoint", str(checkpoint), "--gallery", str(gallery), "--interactive",
                             "--top-k", "2", "--out", str(out), "--jsonl", str(tmp_path / "live.jsonl")])
    assert [r["query"] for r in records] == [QUERY, QUERIES[1]]
    assert out.is_file() and len((tmp_path / "live.jsonl").read_text().splitlines()) == 2
    printed = capsys.readouterr().out
    assert printed.count("top 2 of 5 images") == 2 and "not probabilities" in printed


def test_retrieve_input_mistakes_are_one_line(checkpoint, gallery, tmp_path):
    import retrieve

    def error(*argv: str) -> str:
        with pytest.raises(SystemExit) as info:
            retrieve.main(["--checkpoint", str(checkpoint), "--gallery", str(gallery), "--out",
                           str(tmp_path / "x.png"), *argv])
        message = str(info.value.code)
        assert message.startswith("error: ") and "\n" not in message
        return message

    (tmp_path / "empty.txt").write_text("\n  \n")
    assert "no queries" in error("--queries-file", str(tmp_path / "empty.txt"))
    assert "queries file not found" in error("--queries-file", str(tmp_path / "nope.txt"))
    assert "not a readable image" in error("--image", str(gallery / "notes.txt"))
    assert "fusion stack" in error("--query", QUERY, "--rerank")
    with pytest.raises(SystemExit) as info:  # nothing to search for: argparse's usage error
        retrieve.main(["--checkpoint", str(checkpoint), "--gallery", str(gallery)])
    assert info.value.code == 2


def test_contact_sheet_names_each_file(tmp_path, gallery):
    from PIL import Image

    from utils.visualize import _elide, _font, contact_sheet

    font = _font(13)
    long_name = "a_very_long_file_name_from_a_camera_export_0001234.jpg"
    short = _elide(long_name, font, 104)
    assert short.startswith("a_ve") and short.endswith(".jpg") and "..." in short
    assert font.getlength(short) <= 104 and _elide("p0.jpg", font, 104) == "p0.jpg"
    paths = [gallery / "p0.jpg", gallery / "sub" / "p4.jpg"]
    sheet = contact_sheet(paths, [0.5, 0.25], "query: test", tmp_path / "s.png")
    with Image.open(sheet) as image:
        assert image.width >= 360 and image.height > 224
