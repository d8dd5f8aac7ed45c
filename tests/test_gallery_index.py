"""engine/gallery_index.py and engine/gallery_search.py: the index folder (memory-mapped shards, manifest, version 2
files), resumable and incremental builds, bad input, exact search against the plain matrix product, and every
faiss index type against exact search (faiss is optional: those tests skip without it)."""
from __future__ import annotations

import errno
from dataclasses import replace
import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from engine import gallery_index as gi
from engine.gallery_index import GalleryError, SearchSettings, build_gallery, open_gallery
from engine.gallery_search import choose_factory, exact_search, ivf_lists, search

DIM = 16


def feature_of(path: str) -> torch.Tensor:
    """A fixed unit feature per file name (what a model would compute from the image)."""
    seed = int(hashlib.sha256(Path(path).name.encode()).hexdigest()[:8], 16)
    return torch.nn.functional.normalize(torch.randn(DIM, generator=torch.Generator().manual_seed(seed)), dim=0)


class FakeEncoder:
    """encode(paths) as Retriever passes it to build_gallery: counts what it encodes; "bad*" files are unreadable."""

    def __init__(self):
        self.encoded: list[str] = []

    def __call__(self, paths):
        self.encoded.extend(paths)
        kept = [p for p in paths if not Path(p).name.startswith("bad")]
        skipped = [(p, "OSError: cannot decode") for p in paths if p not in kept]
        return (torch.stack([feature_of(p) for p in kept]) if kept else torch.zeros(0, 0)), kept, skipped


def make_images(folder: Path, names) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(name.encode())
    return sorted(str(p) for p in folder.iterdir())


def build(folder: Path, paths, encoder=None, shard_images: int = 3, dtype: str = "float32"):
    encoder = encoder or FakeEncoder()
    manifest, encoded = build_gallery(folder, paths, encoder, "model-a", dtype, shard_images, source="test")
    return manifest, encoded, encoder


def test_a_build_writes_shards_and_opens_memory_mapped(tmp_path):
    paths = make_images(tmp_path / "imgs", [f"im{i:02d}.jpg" for i in range(10)] + ["bad.jpg"])
    manifest, encoded, _ = build(tmp_path / "g.index", paths)
    assert encoded == 11 and manifest["count"] == 10 and len(manifest["shards"]) == 4  # 11 files in shards of 3
    gallery = open_gallery(tmp_path / "g.index")
    assert all(isinstance(a, np.memmap) for a in gallery.arrays)
    assert list(gallery.paths) == [p for p in paths if "bad" not in p]  # sorted, one row per readable image
    assert [Path(p).name for p, _ in gallery.skipped] == ["bad.jpg"]
    expected = torch.stack([feature_of(p) for p in gallery.paths])
    assert torch.equal(gallery.features, expected)
    assert np.array_equal(gallery.rows(np.array([7, 0, 4])), expected[[7, 0, 4]].numpy())
    info = gi.describe(tmp_path / "g.index")
    assert (info["count"], info["dim"], info["backend"], info["model_digest"]) == (10, DIM, "exact", "model-a")
    assert info["bytes_on_disk"] == sum(p.stat().st_size for p in (tmp_path / "g.index").rglob("*") if p.is_file())


def test_float16_storage_halves_the_shards(tmp_path):
    paths = make_images(tmp_path / "imgs", [f"im{i}.jpg" for i in range(6)])
    build(tmp_path / "a", paths)
    build(tmp_path / "b", paths, dtype="float16")
    a, b = open_gallery(tmp_path / "a"), open_gallery(tmp_path / "b")
    assert b.arrays[0].dtype == np.float16 and a.arrays[0].dtype == np.float32
    assert (b.features - a.features).abs().max() < 1e-3  # float16 keeps 11 bits: |x| <= 1 is within 2^-11
    assert sum(x.nbytes for x in b.arrays) * 2 == sum(x.nbytes for x in a.arrays)


def test_resume_add_remove_and_change_encode_only_what_is_missing(tmp_path):
    folder = tmp_path / "imgs"
    paths = make_images(folder, [f"im{i:02d}.jpg" for i in range(9)])
    build(tmp_path / "g", paths)
    # a killed build: one shard's metadata never made it (its features alone are a leftover), another is gone
    shards = sorted((tmp_path / "g" / "shards").glob("*.json"))
    lost = json.loads(shards[0].read_text())["paths"] + json.loads(shards[1].read_text())["paths"]
    shards[0].unlink()
    shards[1].unlink()
    shards[1].with_suffix(".npy").unlink()
    _, encoded, encoder = build(tmp_path / "g", paths)
    assert encoded == 6 and sorted(encoder.encoded) == sorted(lost)
    assert not [p for p in (tmp_path / "g" / "shards").glob("*.npy") if not p.with_suffix(".json").is_file()]
    _, encoded, _ = build(tmp_path / "g", paths)
    assert encoded == 0  # nothing changed: nothing encoded
    # two new images, one removed, one rewritten
    new = make_images(folder, ["im20.jpg", "im21.jpg"])
    Path(paths[4]).unlink()
    Path(paths[7]).write_bytes(b"another picture")
    now = sorted(str(p) for p in folder.iterdir())
    manifest, encoded, encoder = build(tmp_path / "g", now)
    assert sorted(encoder.encoded) == sorted([paths[7], *[p for p in new if "im2" in p]])
    assert manifest["count"] == 10
    gallery = open_gallery(tmp_path / "g")
    assert sorted(gallery.paths) == now and paths[4] not in list(gallery.paths)
    assert torch.equal(gallery.features, torch.stack([feature_of(p) for p in gallery.paths]))


def test_shard_layout_does_not_depend_on_the_order_of_the_list(tmp_path):
    paths = make_images(tmp_path / "imgs", [f"im{i}.jpg" for i in range(7)])
    build(tmp_path / "a", paths)
    build(tmp_path / "b", list(reversed(paths)))
    a, b = open_gallery(tmp_path / "a"), open_gallery(tmp_path / "b")
    assert list(a.paths) == list(b.paths) and torch.equal(a.features, b.features)
    assert [s["name"] for s in a.manifest["shards"]] == [s["name"] for s in b.manifest["shards"]]


def test_another_model_and_another_build_are_refused(tmp_path):
    paths = make_images(tmp_path / "imgs", [f"im{i}.jpg" for i in range(4)])
    build(tmp_path / "g", paths)
    with pytest.raises(GalleryError, match="another model"):
        build_gallery(tmp_path / "g", paths, FakeEncoder(), "model-b", "float32", 3)
    build(tmp_path / "other", make_images(tmp_path / "more", ["x1.jpg"]))
    stray = next((tmp_path / "other" / "shards").glob("*.json"))
    for suffix in (".json", ".npy"):
        (tmp_path / "g" / "shards" / stray.with_suffix(suffix).name).write_bytes(stray.with_suffix(suffix).read_bytes())
    with pytest.raises(GalleryError, match="a shard of another build"):
        build(tmp_path / "g", paths)
    (tmp_path / "g" / "shards" / stray.name).unlink()  # the user moves it away: the build goes on
    assert build(tmp_path / "g", paths)[1] == 0
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("mine")
    with pytest.raises(GalleryError, match="not a gallery index folder"):
        build(tmp_path / "notes", paths)
    assert (tmp_path / "notes" / "a.txt").read_text() == "mine"


def test_a_truncated_shard_is_refused_on_open_and_encoded_again_by_a_build(tmp_path, caplog):
    paths = make_images(tmp_path / "imgs", [f"im{i}.jpg" for i in range(5)])
    build(tmp_path / "g", paths)
    shard = sorted((tmp_path / "g" / "shards").glob("*.npy"))[1]
    lost = len(json.loads(shard.with_suffix(".json").read_text())["paths"])  # 3 or 2: names are hashes of paths
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(GalleryError, match="truncated"):
        open_gallery(tmp_path / "g")
    with caplog.at_level(logging.WARNING):
        _, encoded, _ = build(tmp_path / "g", paths)
    assert encoded == lost and "truncated" in caplog.text
    assert torch.equal(open_gallery(tmp_path / "g").features, torch.stack([feature_of(p) for p in paths]))


def test_a_full_disk_keeps_the_finished_shards(tmp_path, monkeypatch):
    paths = make_images(tmp_path / "imgs", [f"im{i}.jpg" for i in range(9)])
    real_save, calls = np.save, []

    def save_until_full(handle, array, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(handle, array, **kwargs)

    monkeypatch.setattr(np, "save", save_until_full)
    with pytest.raises(GalleryError, match=r"the 2 finished shard\(s\) .* are kept"):
        build(tmp_path / "g", paths)
    monkeypatch.setattr(np, "save", real_save)
    assert len(list((tmp_path / "g" / "shards").glob("*.json"))) == 2
    assert not list((tmp_path / "g" / "shards").glob("*.tmp"))
    _, encoded, _ = build(tmp_path / "g", paths)
    assert encoded == 3


def test_a_folder_that_changes_during_the_build_is_reported(tmp_path, caplog):
    paths = make_images(tmp_path / "imgs", [f"im{i}.jpg" for i in range(4)])

    class Changing(FakeEncoder):
        def __call__(self, chunk):
            Path(paths[0]).write_bytes(b"edited while the build ran")
            return super().__call__(chunk)

    with caplog.at_level(logging.WARNING):
        build(tmp_path / "g", paths, Changing())
    assert "1 image(s) changed or disappeared" in caplog.text
    _, encoded, encoder = build(tmp_path / "g", paths)
    assert encoder.encoded == [paths[0]]  # the next run brings it up to date


def test_a_version_2_file_opens_and_converts(tmp_path):
    from utils.checkpoint import atomic_save

    features = torch.nn.functional.normalize(torch.randn(3, DIM), dim=1)
    content = {"paths": ["a.jpg", "b.jpg", "c.jpg"], "features": features, "model_digest": "m",
               "signature": [["a.jpg", 1, 2]], "skipped": [["d.jpg", "broken"]]}
    atomic_save({"format": gi.INDEX_FORMAT, "format_version": 2, **content, "sha256": gi.legacy_checksum(content)},
                tmp_path / "old.index.pt")
    old = open_gallery(tmp_path / "old.index.pt")
    assert torch.equal(old.features, features) and list(old.paths) == content["paths"]
    out = gi.main(["convert", str(tmp_path / "old.index.pt"), str(tmp_path / "new.index")])
    assert out["count"] == 3
    new = open_gallery(tmp_path / "new.index")
    assert torch.equal(new.features, features) and list(new.paths) == content["paths"]
    assert new.model_digest == "m" and [s[0] for s in new.skipped] == ["d.jpg"]
    assert gi.main(["info", str(tmp_path / "new.index")])["count"] == 3
    (tmp_path / "new.index" / "paths.txt").write_text("tampered\n" * 3)
    with pytest.raises(SystemExit) as info:
        gi.main(["verify", str(tmp_path / "new.index")])
    assert str(info.value.code).startswith("error: ") and "paths.txt: does not match its sha256" in str(info.value.code)


def test_settings_come_from_the_config():
    from utils.config import load_config

    cfg = load_config(None, ["search.nprobe=7", "search.faiss_factory=IVF16,Flat", "search.memory_budget_gib=2.5"])
    settings = SearchSettings.from_config(cfg)
    assert (settings.nprobe, settings.faiss_factory, settings.memory_budget_gib) == (7, "IVF16,Flat", 2.5)
    assert SearchSettings.from_config(cfg).backend == cfg.search.backend == "auto"


# ------------------------------------------------------------------------------------------------ search
def gallery_of(tmp_path: Path, count: int, dim: int, seed: int = 0, parts: int = 3):
    """``count`` clustered unit features (people of 5 images) in a ``parts``-shard index, and queries near them."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(count // 5 + 1, dim, generator=gen), dim=1)
    feats = torch.nn.functional.normalize(centres.repeat_interleave(5, 0)[:count] + 0.05 * torch.randn(count, dim,
                                                                                                       generator=gen), 1)
    queries = torch.nn.functional.normalize(centres[:20] + 0.07 * torch.randn(20, dim, generator=gen), dim=1)
    bounds = np.linspace(0, count, parts + 1).astype(int)
    pieces = [([f"img{i:06d}" for i in range(a, b)], feats[a:b].numpy()) for a, b in zip(bounds, bounds[1:])]
    gi.write_features_index(tmp_path / f"g{count}", iter(pieces), "m")
    return open_gallery(tmp_path / f"g{count}"), feats, queries


def test_exact_search_in_chunks_equals_the_matrix_product(tmp_path):
    gallery, feats, queries = gallery_of(tmp_path, 10_000, 32)
    reference = torch.topk(queries @ feats.t(), 10, dim=1)
    for chunk in (10_000, 777):
        scores, idx = exact_search(gallery, queries, 10, chunk)
        assert torch.equal(idx, reference.indices)
        assert torch.allclose(scores, reference.values, atol=1e-6, rtol=0)
    scores, idx = exact_search(gallery, queries[:1], 20_000, 4096)  # k beyond the gallery: all of it, in order
    assert idx.shape == (1, 10_000)
    assert torch.allclose(scores, torch.sort(queries[:1] @ feats.t(), descending=True)[0], atol=1e-6, rtol=0)


def test_the_index_type_rules():
    s = SearchSettings()
    assert choose_factory(5_000, 768, s)[0] == "Flat"
    assert choose_factory(100_000, 768, s)[0] == "PQ96x4fs"  # 2 x 48 sub-quantizers of 8 dims, 48 bytes a vector
    assert choose_factory(10_000_000, 768, s)[0] == "PQ96x4fs"  # 0.45 GiB of codes, all scanned
    assert ivf_lists(1_000_000, s) == 4096 and ivf_lists(300_000, s) == 2048  # 4 sqrt(n) to a power of two
    assert choose_factory(30_000_000, 768, s)[0] == "IVF4096_HNSW32,PQ96x4fs"  # beyond scan_max_images: lists
    assert choose_factory(300_000, 768, SearchSettings(scan_max_images=100_000))[0] == "IVF2048_HNSW32,PQ96x4fs"
    assert choose_factory(300_000, 128, s)[0] == "PQ64x4fs"  # 96 does not divide 128: 64 sub-quantizers
    # m divides d and n x m / 2 bytes fit: 10M x 25 bytes > 0.1 GiB, 10M x 10 bytes fit
    assert choose_factory(10_000_000, 100, SearchSettings(memory_budget_gib=0.1))[0] == "PQ20x4fs"
    assert choose_factory(10_000, 768, SearchSettings(faiss_factory="IVF8,Flat"))[0] == "IVF8,Flat"
    with pytest.raises(GalleryError, match="do not fit"):
        choose_factory(10_000_000, 768, SearchSettings(memory_budget_gib=0.001))


@pytest.mark.parametrize("factory", ["Flat", "PQ16x4fs", "IVF64,PQ16x4fs", "HNSW32", "IVF64,Flat", "IVF64_HNSW32,Flat",
                                     pytest.param("OPQ8,IVF64,PQ8np", marks=pytest.mark.slow)])  # OPQ: ~1 min
def test_every_faiss_index_type_finds_the_exact_top_10(tmp_path, factory):
    pytest.importorskip("faiss", reason="faiss is optional (pip install -r requirements-search.txt)")
    from engine.gallery_search import build_ann

    gallery, feats, queries = gallery_of(tmp_path, 10_000, 32)
    settings = SearchSettings(backend="faiss", faiss_factory=factory, train_sample_images=9_000, nprobe=16)
    entry = build_ann(gallery, settings)
    assert entry["factory"] == factory and entry["trained_on"] == (0 if factory in ("Flat", "HNSW32") else 9_000)
    gallery = open_gallery(gallery.folder)
    scores, idx = search(gallery, queries, 10, settings)
    reference = torch.topk(queries @ feats.t(), 10, dim=1)
    # the 5 images of the query's person (the exact top 5) are found; ranks 6-10 are near-ties of other people
    found_person = np.mean([len(set(a.tolist()) & set(b[:5].tolist())) / 5 for a, b in zip(idx, reference.indices)])
    assert found_person == 1.0
    # every score is the exact cosine of the row it names (re-scored from the stored features)
    assert torch.allclose(scores, (queries[:, None, :] * feats[idx]).sum(-1), atol=1e-6, rtol=0)
    if factory == "Flat":
        assert torch.equal(idx, reference.indices)
    exact = search(gallery, queries, 10, SearchSettings(backend="exact"))
    assert torch.equal(exact[1], reference.indices)


def test_ivf_indexes_open_memory_mapped_and_stale_ones_are_not_used(tmp_path, caplog):
    faiss = pytest.importorskip("faiss", reason="faiss is optional (pip install -r requirements-search.txt)")
    from engine.gallery_search import build_ann, open_ann

    gallery, _, queries = gallery_of(tmp_path, 10_000, 32)
    build_ann(gallery, SearchSettings(faiss_factory="IVF32,Flat"))
    ann = open_ann(open_gallery(gallery.folder))
    assert ann.ntotal == 10_000 and faiss.extract_index_ivf(ann).nlist == 32
    manifest = json.loads((gallery.folder / "manifest.json").read_text())
    manifest["ann"]["covers"] = "something else"
    (gallery.folder / "manifest.json").write_text(json.dumps(manifest))
    with caplog.at_level(logging.WARNING):
        stale = open_gallery(gallery.folder)
        scores, idx = search(stale, queries, 5, SearchSettings())
    assert "built for other contents" in caplog.text
    assert torch.equal(idx, exact_search(stale, queries, 5, 1000)[1])


def test_more_candidates_raise_nprobe_and_ef_search(tmp_path):
    faiss = pytest.importorskip("faiss", reason="faiss is optional (pip install -r requirements-search.txt)")
    from engine.gallery_search import set_search_depth

    index = faiss.index_factory(8, "IVF64,Flat", faiss.METRIC_INNER_PRODUCT)
    settings = SearchSettings(nprobe=4, rescore_candidates=100, ef_search=50)
    set_search_depth(index, "IVF64,Flat", 100, settings)
    assert faiss.extract_index_ivf(index).nprobe == 4
    set_search_depth(index, "IVF64,Flat", 250, settings)  # 3 x the candidates: 3 x the lists
    assert faiss.extract_index_ivf(index).nprobe == 12
    hnsw = faiss.index_factory(8, "HNSW32", faiss.METRIC_INNER_PRODUCT)
    set_search_depth(hnsw, "HNSW32", 400, settings)
    assert hnsw.hnsw.efSearch == 400


def test_a_second_hop_from_the_best_images_finds_more_of_the_exact_top_5(tmp_path):
    """search.expand_top: captions far from tight clusters of images (a modality gap); one IVF list visited per
    query misses part of each person, and searching again from the best images found recovers some of it."""
    pytest.importorskip("faiss", reason="faiss is optional (pip install -r requirements-search.txt)")
    from engine.gallery_search import build_ann

    gen = torch.Generator().manual_seed(0)
    count, dim = 10_000, 32
    centres = torch.nn.functional.normalize(torch.randn(count // 5, dim, generator=gen), dim=1)
    feats = torch.nn.functional.normalize(centres.repeat_interleave(5, 0) + 0.06 * torch.randn(count, dim,
                                                                                                generator=gen), 1)
    queries = torch.nn.functional.normalize(centres[:100] + 0.12 * torch.randn(100, dim, generator=gen), 1)
    gi.write_features_index(tmp_path / "g", iter([([f"i{i}" for i in range(count)], feats.numpy())]), "m")
    build_ann(open_gallery(tmp_path / "g"), SearchSettings(faiss_factory="IVF256,Flat", train_sample_images=count))
    gallery = open_gallery(tmp_path / "g")
    reference = torch.topk(queries @ feats.t(), 5, dim=1).indices

    def recall(settings: SearchSettings) -> float:
        scores, idx = search(gallery, queries, 5, settings)
        assert all(len(set(row.tolist())) == 5 for row in idx)  # the union holds each image once
        assert torch.allclose(scores, (queries[:, None, :] * feats[idx]).sum(-1), atol=1e-6, rtol=0)
        return float(np.mean([len(set(a.tolist()) & set(b.tolist())) / 5 for a, b in zip(idx, reference)]))

    one_list = SearchSettings(backend="faiss", nprobe=1, rescore_candidates=20)
    assert recall(one_list) == pytest.approx(0.728)
    assert recall(SearchSettings(**{**one_list.__dict__, "expand_top": 2, "expand_nprobe": 4})) == pytest.approx(0.778)


def test_images_added_at_the_end_extend_the_faiss_index_without_training_it_again(tmp_path, caplog):
    faiss = pytest.importorskip("faiss", reason="faiss is optional (pip install -r requirements-search.txt)")
    from engine.gallery_search import build_ann, extend_ann, open_ann

    _, feats, _ = gallery_of(tmp_path, 12_000, 32)
    pieces = [([f"img{i:06d}" for i in range(a, a + 4000)], feats[a:a + 4000].numpy()) for a in (0, 4000, 8000)]
    settings = SearchSettings(faiss_factory="PQ16x4fs", rescore_candidates=50)
    gi.write_features_index(tmp_path / "g", iter(pieces[:2]), "m")
    first = build_ann(open_gallery(tmp_path / "g"), settings)
    old = open_ann(open_gallery(tmp_path / "g"))
    codebook = faiss.vector_to_array(old.pq.centroids).copy()
    gi.write_features_index(tmp_path / "g", iter(pieces), "m")  # a nightly update: 4,000 new images at the end
    gallery = open_gallery(tmp_path / "g")
    assert gallery.manifest["ann"]["covers"] != gallery.content_id  # stale until extended
    with caplog.at_level(logging.INFO):
        entry = extend_ann(gallery, settings)
    assert "added 4000 new images to the faiss index PQ16x4fs (trained on 8000 of the first 8000)" in caplog.text
    assert entry["count"] == 12_000 and entry["trained_on"] == first["trained_on"] == 8_000
    assert entry["covers"] == gallery.content_id and entry["covers_shards"] == 3
    gallery = open_gallery(tmp_path / "g")
    ann = open_ann(gallery)
    assert ann.ntotal == 12_000 and np.array_equal(faiss.vector_to_array(ann.pq.centroids), codebook)
    # the new people are found: queries at the centres of people in the third shard find their 5 images
    centres = feats[8000:8100].reshape(20, 5, -1).mean(1)
    queries = torch.nn.functional.normalize(centres, dim=1)
    _, idx = search(gallery, queries, 5, replace(settings, backend="faiss"))
    assert all(set(row.tolist()) == set(range(8000 + 5 * q, 8005 + 5 * q)) for q, row in enumerate(idx))
    # a removed shard before the end: the old faiss ids no longer hold, so it is not extended (built anew)
    gi.write_features_index(tmp_path / "h", iter(pieces[:2]), "m")
    build_ann(open_gallery(tmp_path / "h"), settings)
    gi.write_features_index(tmp_path / "h", iter([pieces[0], pieces[2]]), "m")
    assert extend_ann(open_gallery(tmp_path / "h"), settings) is None


def _resident_mib() -> float:
    return int(Path("/proc/self/status").read_text().split("VmRSS:")[1].split()[0]) / 1024


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads VmRSS from /proc (Linux)")
def test_searching_a_memory_mapped_store_does_not_keep_it_resident(tmp_path, monkeypatch):
    """A 10M x 768 store is 15 GB: exact passes and candidate re-scoring must not leave it counted in the process's
    resident memory (the page cache still holds it)."""
    count, dim = 100_000, 512  # 205 MB of float32
    feats = np.random.default_rng(0).standard_normal((count, dim)).astype(np.float32)
    gi.write_features_index(tmp_path / "g", iter([([f"i{i}" for i in range(count)], feats)]), "m")
    del feats
    queries = torch.nn.functional.normalize(torch.randn(2, dim), dim=1)
    rows = np.random.default_rng(1).choice(count, 20_000, replace=False)

    def growth(read) -> float:
        gallery = open_gallery(tmp_path / "g", verify_max_mib=0)  # a mapping of its own, dropped at return
        before = _resident_mib()
        read(gallery)
        return _resident_mib() - before

    def passes() -> tuple[float, float]:
        return (growth(lambda gallery: exact_search(gallery, queries, 10, 16_384)),
                growth(lambda gallery: gallery.rows(rows)))  # 20,000 x 2 KB rows copied out: 40 MB

    exact_growth, rows_growth = passes()
    assert exact_growth < 60 and rows_growth < 100
    monkeypatch.setattr(gi, "advise", lambda *args: None)  # without the advice the whole store stays resident
    assert passes()[0] > 150
    # rows read through the map itself (what read_rows replaces) stay mapped too
    monkeypatch.setattr(gi, "read_rows", lambda array, rows: np.asarray(array[rows]))
    assert passes()[1] > 100


def test_rows_read_with_pread_equal_the_memory_map(tmp_path):
    feats = np.random.default_rng(0).standard_normal((5000, 24)).astype(np.float16)
    gi.write_features_index(tmp_path / "g", iter([([f"i{i}" for i in range(3000)], feats[:3000]),
                                                  ([f"i{i}" for i in range(3000, 5000)], feats[3000:])]), "m")
    gallery = open_gallery(tmp_path / "g")
    # runs of neighbours, a repeat, both shards, unsorted
    idx = np.array([4999, 0, 1, 2, 2, 2999, 3000, 3001, 17, 4000, 1])
    assert np.array_equal(gallery.rows(idx), feats[idx])
    assert np.array_equal(gi.read_rows(gallery.arrays[1], np.arange(2000)), feats[3000:])
    with open(gallery.arrays[0].filename, "r+b") as handle:  # a shard cut short after it was opened
        handle.truncate(gallery.arrays[0].offset + 100 * 96)  # float32 rows of 24: 96 bytes
    with pytest.raises(GalleryError, match="read 0 of 96 bytes at row 2999"):
        gi.read_rows(gallery.arrays[0], np.array([5, 2999]))


def test_ivf_lists_are_clustered_on_gpus_when_faiss_has_them(tmp_path, monkeypatch):
    """No GPU here: faiss's GPU calls are replaced by CPU stand-ins that record being used."""
    faiss = pytest.importorskip("faiss", reason="faiss is optional (pip install -r requirements-search.txt)")
    from engine.gallery_search import build_ann, open_ann

    used = []

    def to_gpus(index):
        used.append(index.d)
        return index  # the CPU index itself: the build must go on exactly as on a GPU

    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 2, raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", to_gpus, raising=False)
    gallery, feats, queries = gallery_of(tmp_path, 10_000, 32)
    build_ann(gallery, SearchSettings(faiss_factory="IVF16,PQ16x4fs"))
    assert used == [32] and open_ann(open_gallery(gallery.folder)).ntotal == 10_000
    build_ann(gallery, SearchSettings(faiss_factory="PQ16x4fs"))  # no lists: nothing to cluster on a GPU
    assert used == [32]


def test_rescoring_in_query_blocks_gives_the_exact_top_k_of_each_querys_candidates(monkeypatch):
    from engine import gallery_search
    from engine.gallery_index import Gallery

    torch.manual_seed(3)
    features = torch.nn.functional.normalize(torch.randn(50, 8), dim=1)
    gallery = Gallery.in_memory([f"{i}.jpg" for i in range(50)], features, "digest")
    queries = torch.nn.functional.normalize(torch.randn(7, 8), dim=1)
    candidates = np.random.default_rng(0).integers(0, 50, (7, 6))
    candidates[2, 3:] = -1  # fewer candidates than the width
    monkeypatch.setattr(gallery_search, "RESCORE_QUERY_BLOCK", 3)  # blocks of 3, 3 and 1 queries
    scores, rows = gallery_search.rescore(gallery, queries, candidates, 2)
    for q in range(7):  # brute force: each query's own candidates, scored one by one
        mine = [int(c) for c in candidates[q] if c >= 0]
        exact = sorted(((float(queries[q] @ features[c]), c) for c in mine), reverse=True)[:2]
        assert rows[q].tolist() == [c for _, c in exact]
        assert scores[q].tolist() == pytest.approx([s for s, _ in exact], abs=1e-6)
