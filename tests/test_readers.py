"""Annotation readers on fixture files in each real and processed format, bad input, pretraining corpora."""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

from datasets import prepare_pretrain, readers
from datasets.readers import check_images, format_statistics, load_annotations, load_pretrain_corpora
from datasets.records import AnnotationNotFoundError, DataFormatError, MissingImagesError, Record

FIXTURES = Path(__file__).parent / "fixtures"


def _counts(records: list[Record]) -> tuple[int, int, int]:
    return readers.split_counts(records)


def _copy(name: str, tmp_path: Path) -> Path:
    target = tmp_path / name
    shutil.copytree(FIXTURES / name, target)
    return target


def _write_json(path: Path, data: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def _image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 8), (200, 10, 10)).save(path)
    return path


# ----------------------------------------------------------------------------------------------- real formats

def test_cuhkpedes_raw() -> None:
    root = FIXTURES / "cuhkpedes_raw"
    splits = load_annotations("cuhkpedes", root)
    assert splits.annotation_file.endswith("reid_raw.json")
    assert (_counts(splits.train), _counts(splits.val), _counts(splits.test)) == ((2, 3, 6), (1, 1, 2), (2, 3, 7))
    assert splits.num_train_pids == 2
    # raw train ids 363, 363, 12 -> sorted [12, 363] -> labels 1, 1, 0; one record per caption, image-major
    assert [r.pid for r in splits.train] == [1, 1, 1, 1, 0, 0]
    assert [r.image_id for r in splits.train] == [0, 0, 1, 1, 2, 2]
    assert splits.train[0] == Record(os.path.join(str(root), "imgs", "CUHK01/0363004.png"),
                                     "A man in a red shirt and black pants.", 1, 0, None)
    assert splits.train[1].caption == "The man wears a red top, dark trousers and white shoes."
    assert [r.pid for r in splits.val] == [11104, 11104]
    assert [r.pid for r in splits.test] == [12004] * 5 + [12010] * 2
    assert [r.image_id for r in splits.test] == [0, 0, 1, 1, 1, 2, 2]
    assert all(r.phrases is None for r in splits.train + splits.val + splits.test)


def test_cuhkpedes_processed_with_att_phrases() -> None:
    splits = load_annotations("cuhkpedes", FIXTURES / "cuhkpedes_processed")
    assert splits.annotation_file.endswith("cuhk_pedes_att.json")
    assert (_counts(splits.train), _counts(splits.val), _counts(splits.test)) == ((2, 3, 6), (1, 1, 2), (2, 3, 6))
    assert [r.pid for r in splits.train] == [1, 1, 1, 1, 0, 0]
    assert [r.image_id for r in splits.train] == [0, 0, 1, 1, 2, 2]
    assert splits.train[0].phrases == ("red shirt", "black pants")
    assert splits.train[2].phrases is None  # record without att
    assert splits.train[4].phrases == ("blue dress",)  # the whitespace-only phrase is dropped
    assert splits.val[0].phrases is None  # empty att dict
    raw = load_annotations("cuhkpedes", FIXTURES / "cuhkpedes_raw")
    assert [r.caption for r in splits.train] == [r.caption for r in raw.train]


def test_icfg_raw_has_no_val_split() -> None:
    splits = load_annotations("icfg", FIXTURES / "icfg_raw")
    assert (_counts(splits.train), _counts(splits.val), _counts(splits.test)) == ((3, 5, 5), (0, 0, 0), (2, 3, 3))
    assert [r.pid for r in splits.train] == [0, 0, 2, 2, 1]  # raw 1, 1, 7, 7, 3
    assert [r.image_id for r in splits.train] == [0, 1, 2, 3, 4]
    assert [r.pid for r in splits.test] == [2001, 2002, 2002]
    assert splits.test[0].image_path == os.path.join(
        str(FIXTURES / "icfg_raw"), "imgs", "test/2001/2001_009_02_0303morning_0041_0.jpg")
    with pytest.raises(ValueError, match="'val'.*empty"):
        splits.split("val")
    assert splits.split("test") is splits.test


def test_icfg_processed_uses_first_caption_and_ignores_query_gallery() -> None:
    processed = load_annotations("icfg", FIXTURES / "icfg_processed")
    raw = load_annotations("icfg", FIXTURES / "icfg_raw")
    assert processed.annotation_file.endswith("ICFG_PEDES_VISTXT.json")
    for name in ("train", "test"):
        assert [(r.caption, r.pid, r.image_id) for r in processed.split(name)] == \
               [(r.caption, r.pid, r.image_id) for r in raw.split(name)]
    assert processed.val == []


@pytest.mark.parametrize("folder", ["rstp_raw", "rstp_processed"])
def test_rstp(folder: str) -> None:
    root = FIXTURES / folder
    splits = load_annotations("rstp", root)
    assert (_counts(splits.train), _counts(splits.val), _counts(splits.test)) == ((2, 4, 8), (1, 2, 4), (1, 2, 4))
    assert [r.pid for r in splits.train] == [1, 1, 1, 1, 0, 0, 0, 0]  # raw 3901, 12
    assert [r.image_id for r in splits.train] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert splits.train[0].image_path == os.path.join(str(root), "imgs", "3901_c3_0000.jpg")
    assert splits.train[1].caption == "Person 3901 image 0, second caption, blue pants."
    assert [r.pid for r in splits.test] == [4000] * 4


def test_lookup_order_and_explicit_file(tmp_path: Path) -> None:
    root = _copy("cuhkpedes_raw", tmp_path)
    shutil.copy(FIXTURES / "cuhkpedes_processed" / "cuhk_pedes_att.json", root)
    assert load_annotations("cuhkpedes", root).annotation_file.endswith("reid_raw.json")  # raw wins
    os.rename(root / "reid_raw.json", root / "caption_all.json")
    assert load_annotations("cuhkpedes", root).annotation_file.endswith("caption_all.json")
    # an explicit file, relative to the root or absolute, is recognised as processed by its shape
    relative = load_annotations("cuhkpedes", root, "cuhk_pedes_att.json")
    absolute = load_annotations("cuhkpedes", str(tmp_path), str(root / "cuhk_pedes_att.json"))
    assert relative.train[0].phrases == absolute.train[0].phrases == ("red shirt", "black pants")
    with pytest.raises(ValueError, match="unknown annotation format 'market'"):
        load_annotations("market", root)


# ----------------------------------------------------------------------------------------------- bad input

def test_missing_file_lists_names_and_root(tmp_path: Path) -> None:
    with pytest.raises(AnnotationNotFoundError) as caught:
        load_annotations("rstp", tmp_path)
    message = str(caught.value)
    assert str(tmp_path) in message and "data_captions.json" in message and "rstpreid_vistxt.json" in message
    assert isinstance(caught.value, FileNotFoundError) and isinstance(caught.value, DataFormatError)
    with pytest.raises(AnnotationNotFoundError, match="nothere.json"):
        load_annotations("rstp", tmp_path, "nothere.json")


def test_invalid_json_names_file_and_position(tmp_path: Path) -> None:
    path = tmp_path / "reid_raw.json"
    path.write_text('[{"split": "train",', encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"reid_raw.json: expected valid JSON, got .* line 1"):
        load_annotations("cuhkpedes", tmp_path)


def _raw_cuhk() -> list[dict]:
    return json.loads((FIXTURES / "cuhkpedes_raw" / "reid_raw.json").read_text())


@pytest.mark.parametrize("index, change, pattern", [
    (0, lambda e: "just a string", r"record 0: expected a JSON object, got str"),
    (2, lambda e: {k: v for k, v in e.items() if k != "file_path"}, r"record 2, field 'file_path': expected the field"),
    (1, lambda e: {**e, "captions": "one caption"}, r"record 1, field 'captions': expected a list of strings"),
    (1, lambda e: {**e, "captions": ["ok", 3]}, r"record 1, field 'captions': expected a list of strings"),
    (3, lambda e: {**e, "id": "11104"}, r"record 3, field 'id': expected an integer, got str"),
    (3, lambda e: {**e, "id": True}, r"record 3, field 'id': expected an integer, got bool"),
    (4, lambda e: {**e, "split": "training"}, r"record 4, field 'split': expected one of \['train', 'val', 'test'\]"),
    (5, lambda e: {**e, "file_path": "test_query/p10376_s14337.jpg", "id": 1},
     r"record 5 of 'test', field 'id': expected image 'test_query/p10376_s14337.jpg' to keep id 12004"),
])
def test_raw_bad_records(tmp_path: Path, index: int, change, pattern: str) -> None:
    data = _raw_cuhk()
    data[index] = change(data[index])
    path = _write_json(tmp_path / "reid_raw.json", data)
    with pytest.raises(DataFormatError, match=pattern) as caught:
        load_annotations("cuhkpedes", tmp_path)
    assert str(caught.value).startswith(str(path))


def test_icfg_raw_rejects_val_split(tmp_path: Path) -> None:
    data = json.loads((FIXTURES / "icfg_raw" / "ICFG-PEDES.json").read_text())
    data[6]["split"] = "val"
    _write_json(tmp_path / "ICFG-PEDES.json", data)
    with pytest.raises(DataFormatError, match=r"ICFG-PEDES.json, record 6, field 'split': expected one of "
                                              r"\['train', 'test'\], got str 'val'"):
        load_annotations("icfg", tmp_path)


@pytest.mark.parametrize("change, pattern", [
    (lambda d: d["test"][1].pop("id"), r"record 1 of 'test', field 'id': expected the field to be present"),
    (lambda d: d["train"][0].update(att=["red shirt"]), r"record 0 of 'train', field 'att': expected a dict"),
    (lambda d: d["train"][2].update(captions=["a list"]), r"record 2 of 'train', field 'captions': expected a string"),
    (lambda d: d.update(extra=[]), r"field 'extra': expected top-level keys among"),
    (lambda d: d.pop("train"), r"field 'train': expected the split to be present"),
    (lambda d: d.update(val={"a": 1}), r"field 'val': expected a list of records"),
])
def test_processed_bad_records(tmp_path: Path, change, pattern: str) -> None:
    data = json.loads((FIXTURES / "cuhkpedes_processed" / "cuhk_pedes_att.json").read_text())
    change(data)
    path = _write_json(tmp_path / "cuhk_pedes_att.json", data)
    with pytest.raises(DataFormatError, match=pattern) as caught:
        load_annotations("cuhkpedes", tmp_path)
    assert str(caught.value).startswith(str(path))


def test_top_level_of_wrong_shape(tmp_path: Path) -> None:
    _write_json(tmp_path / "data_captions.json", 42)
    with pytest.raises(DataFormatError, match=r"data_captions.json: expected a JSON list .* got int 42"):
        load_annotations("rstp", tmp_path)


def test_empty_captions_are_skipped_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = _raw_cuhk()
    data[1]["captions"] = ["   ", "The man has a red shirt, black pants."]
    data[2]["captions"] = []
    path = _write_json(tmp_path / "reid_raw.json", data)
    with caplog.at_level(logging.WARNING, logger="datasets.readers"):
        splits = load_annotations("cuhkpedes", tmp_path)
    # image 2 (id 12's only image) has no caption left, image 1 keeps one; labels cover the kept ids only
    assert _counts(splits.train) == (1, 2, 3) and splits.num_train_pids == 1
    assert [(r.pid, r.image_id) for r in splits.train] == [(0, 0), (0, 0), (0, 1)]
    warning = next(r.getMessage() for r in caplog.records if "empty captions" in r.getMessage())
    assert str(path) in warning and "2 record(s)" in warning
    assert "train[1] CUHK01/0363003.png" in warning and "train[2] Market/0012_c2s1_000451_01.jpg" in warning


# ----------------------------------------------------------------------------------------------- statistics

def test_format_statistics_table() -> None:
    table = format_statistics(load_annotations("cuhkpedes", FIXTURES / "cuhkpedes_raw")).splitlines()
    assert [cell.strip() for cell in table[0].split("|")] == ["split", "ids", "images", "captions"]
    assert [[cell.strip() for cell in line.split("|")] for line in table[2:]] == [
        ["train", "2", "3", "6"], ["val", "1", "1", "2"], ["test", "2", "3", "7"]]


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_published_count_warning_only_for_near_copies(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    root = _copy("rstp_raw", tmp_path)  # 2/4/8, 1/2/4, 1/2/4: a small custom dataset, far from the published one
    with caplog.at_level(logging.WARNING, logger="datasets.readers"):
        load_annotations("rstp", root)
    assert _warnings(caplog) == []

    # published counts within 20% of the file's (train images 4 vs 5, captions 8 vs 9): a near copy, warned about
    monkeypatch.setitem(readers.PUBLISHED_COUNTS, "rstp", {"train": (2, 5, 9), "val": (1, 2, 4), "test": (1, 2, 4)})
    with caplog.at_level(logging.WARNING, logger="datasets.readers"):
        load_annotations("rstp", root)
    [warning] = _warnings(caplog)
    assert "train 2/4/8 (published 2/5/9)" in warning and "val" not in warning and "RSTPReid" in warning

    caplog.clear()  # equal counts: nothing to say
    monkeypatch.setitem(readers.PUBLISHED_COUNTS, "rstp", {"train": (2, 4, 8), "val": (1, 2, 4), "test": (1, 2, 4)})
    with caplog.at_level(logging.WARNING, logger="datasets.readers"):
        load_annotations("rstp", root)
    assert _warnings(caplog) == []

    monkeypatch.setitem(readers.PUBLISHED_COUNTS, "rstp", {"train": (2, 5, 9), "val": (1, 2, 4), "test": (1, 2, 4)})
    (root / readers.SYNTHETIC_MARKER).write_text("{}")  # the synthetic marker silences it
    with caplog.at_level(logging.WARNING, logger="datasets.readers"):
        load_annotations("rstp", root)
    assert _warnings(caplog) == []


def _records_with_counts(ids: int, images: int, captions: int, prefix: str) -> list[Record]:
    """Records with exactly these (ids, images, captions): captions round-robin over images, images over ids."""
    return [Record(f"{prefix}/{c % images}.jpg", "c", (c % images) % ids, c % images) for c in range(captions)]


def _scaled_cuhk(fraction: float, splits: tuple[str, ...] = ("train", "val", "test")):
    published = readers.PUBLISHED_COUNTS["cuhkpedes"]
    records = {name: _records_with_counts(*(round(n * fraction) for n in published[name]), name)
               if name in splits else [] for name in ("train", "val", "test")}
    return readers.DatasetSplits("cuhkpedes", "/nonexistent/CUHK-PEDES", "reid_raw.json", **records)


@pytest.mark.parametrize("fraction, splits, warned", [
    (0.9, ("train", "val", "test"), True),   # a truncated copy of the real file
    (1.1, ("train", "val", "test"), True),   # records added or duplicated
    (1.0, ("train", "val", "test"), False),  # the published counts exactly
    (0.7, ("train", "val", "test"), False),  # 30% off: a subset, i.e. a custom dataset
    (0.9, ("train", "test"), False),         # other split names: a custom layout
])
def test_published_counts_on_truncated_real_format(caplog: pytest.LogCaptureFixture, fraction: float,
                                                   splits: tuple[str, ...], warned: bool) -> None:
    dataset = _scaled_cuhk(fraction, splits)
    if fraction == 0.9 and len(splits) == 3:
        assert _counts(dataset.train) == (9903, 30649, 61313)
    with caplog.at_level(logging.WARNING, logger="datasets.readers"):
        readers._check_published_counts(dataset)
    warnings = _warnings(caplog)
    assert len(warnings) == int(warned)
    if warned:
        train = "/".join(str(round(n * fraction)) for n in readers.PUBLISHED_COUNTS["cuhkpedes"]["train"])
        assert f"train {train} (published 11003/34054/68126)" in warnings[0]
        assert "CUHK-PEDES" in warnings[0] and "complete" in warnings[0]


def test_looks_like_published_tolerance() -> None:
    published = {"train": (100, 200, 400), "val": (0, 0, 0), "test": (10, 20, 40)}
    assert readers.looks_like_published({"train": (80, 240, 400), "test": (12, 20, 40)}, published)
    assert not readers.looks_like_published({"train": (79, 240, 400), "test": (12, 20, 40)}, published)
    assert not readers.looks_like_published({"train": (100, 200, 400), "test": (10, 20, 40), "val": (1, 1, 1)},
                                            published)


def test_split_helper_rejects_unknown_name() -> None:
    splits = load_annotations("rstp", FIXTURES / "rstp_raw")
    with pytest.raises(ValueError, match="unknown split 'query'"):
        splits.split("query")


# ----------------------------------------------------------------------------------------------- pretraining

def test_load_pretrain_corpora(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    first = _write_json(tmp_path / "a.json", [{"image": "x/1.jpg", "caption": "a cat"},
                                              {"image": "/abs/2.jpg", "caption": " a dog "}])
    second = _write_json(tmp_path / "b.json", [{"image": "3.jpg", "caption": ["one", "two"]},
                                               {"image": "4.jpg", "caption": "  "}])
    with caplog.at_level(logging.WARNING, logger="datasets.readers"):
        records = load_pretrain_corpora([{"annotation": str(first), "image_root": "/data/a"},
                                         {"annotation": str(second), "image_root": "/data/b"}])
    assert [(r.image_path, r.caption, r.pid, r.image_id) for r in records] == [
        ("/data/a/x/1.jpg", "a cat", 0, 0), ("/abs/2.jpg", "a dog", 1, 1),
        ("/data/b/3.jpg", "one", 2, 2), ("/data/b/3.jpg", "two", 3, 3)]
    assert any("1 record(s)" in r.getMessage() and "[1] 4.jpg" in r.getMessage() for r in caplog.records)


def test_load_pretrain_corpora_bad_input(tmp_path: Path) -> None:
    good = _write_json(tmp_path / "a.json", [{"image": "1.jpg", "caption": "a cat"}])
    with pytest.raises(DataFormatError, match=r"pretrain corpora list, record 1, field 'image_root'"):
        load_pretrain_corpora([{"annotation": str(good), "image_root": "r"}, {"annotation": str(good)}])
    with pytest.raises(AnnotationNotFoundError, match="missing.json"):
        load_pretrain_corpora([{"annotation": str(tmp_path / "missing.json"), "image_root": "r"}])
    bad = _write_json(tmp_path / "bad.json", [{"image": "1.jpg", "caption": "ok"}, {"image": "2.jpg", "caption": 7}])
    with pytest.raises(DataFormatError, match=r"bad.json, record 1, field 'caption': expected a list of strings"):
        load_pretrain_corpora([{"annotation": str(bad), "image_root": "r"}])
    with pytest.raises(DataFormatError, match="non-empty list"):
        load_pretrain_corpora([])


# ----------------------------------------------------------------------------------------------- images

def test_check_images(tmp_path: Path) -> None:
    present = [str(_image(tmp_path / f"{i}.png")) for i in range(3)]
    missing = [str(tmp_path / "gone1.png"), str(tmp_path / "gone2.png")]
    records = [Record(p, "c", 0, i) for i, p in enumerate(present + missing + present)]
    report = check_images([Record(p, "c", 0, 0) for p in present], decode=True)
    assert (report.total, report.mode, report.ok) == (3, "full", True)
    with pytest.raises(MissingImagesError,
                       match=r"^2 of 5 images are missing under .* \(by folder: \./ 2; first: .*gone1.png\)$") as caught:
        check_images(records, max_listed=1)
    assert isinstance(caught.value, FileNotFoundError) and "gone2" not in str(caught.value)
    assert caught.value.report.missing == missing and caught.value.report.undecodable == []
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png at all")
    check_images([Record(str(broken), "c", 0, 0)], decode=False)  # exists, so fine without decoding
    check_images([Record(str(broken), "c", 0, 0)], decode="exists")
    for decode in (True, "full", "header"):  # the default level, "header", reads the file too
        with pytest.raises(MissingImagesError, match=r"^1 of 4 images cannot be decoded .*broken.png \(cannot identify"):
            check_images([Record(p, "c", 0, 0) for p in present + [str(broken)]], decode=decode)
    with pytest.raises(MissingImagesError, match="cannot be decoded"):
        check_images([Record(str(broken), "c", 0, 0)])
    with pytest.raises(ValueError, match="unknown mode 'fast'"):
        check_images(records, decode="fast")


# ----------------------------------------------------------------------------------------------- prepare_pretrain

def _pretrain_tree(tmp_path: Path) -> dict[str, Path]:
    roots = {name: tmp_path / name for name in ("coco", "vg", "cc3m")}
    for relative in ("val2014/COCO_val2014_000000000042.jpg", "train2014/COCO_train2014_000000000009.jpg"):
        _image(roots["coco"] / relative)
    _image(roots["vg"] / "VG_100K" / "1.jpg")
    _image(roots["vg"] / "VG_100K_2" / "2.jpg")
    for name in ("000001.jpg", "000002.jpg", "000003.jpg"):
        _image(roots["cc3m"] / "images" / name)
    return roots


def test_prepare_pretrain_converters(tmp_path: Path) -> None:
    roots = _pretrain_tree(tmp_path)
    coco_entry, coco = prepare_pretrain.prepare_corpus(
        "coco", str(FIXTURES / "pretrain" / "dataset_coco.json"), str(roots["coco"]), tmp_path / "out")
    assert json.loads(Path(coco_entry["annotation"]).read_text()) == [
        {"image": "val2014/COCO_val2014_000000000042.jpg", "caption": "A dog sits on a couch."},
        {"image": "val2014/COCO_val2014_000000000042.jpg", "caption": "A brown dog resting on a sofa."},
        {"image": "train2014/COCO_train2014_000000000009.jpg", "caption": "Plates of food on a table."}]
    assert (coco.read, coco.empty, coco.missing_images, coco.dropped, coco.written) == (5, 1, 1, 1, 3)
    assert coco.first_missing == ["train2014/COCO_train2014_000000000025.jpg"]

    vg_entry, vg = prepare_pretrain.prepare_corpus(
        "vg", str(FIXTURES / "pretrain" / "region_descriptions.json"), str(roots["vg"]), tmp_path / "out")
    assert json.loads(Path(vg_entry["annotation"]).read_text()) == [
        {"image": "VG_100K/1.jpg", "caption": "man wearing a hat"},
        {"image": "VG_100K/1.jpg", "caption": "red car on the road"},
        {"image": "VG_100K_2/2.jpg", "caption": "a tall tree"}]
    assert (vg.read, vg.empty, vg.duplicates, vg.missing_images, vg.written) == (6, 1, 1, 1, 3)

    cc_entry, cc = prepare_pretrain.prepare_corpus(
        "cc3m", str(FIXTURES / "pretrain" / "cc3m_train.tsv"), str(roots["cc3m"]), tmp_path / "out")
    assert json.loads(Path(cc_entry["annotation"]).read_text()) == [
        {"image": "images/000001.jpg", "caption": "a person riding a bike down the road"},
        {"image": "images/000002.jpg", "caption": "actor attends the premiere"}]
    assert (cc.read, cc.empty, cc.missing_images, cc.written) == (4, 1, 1, 2)
    summary = prepare_pretrain.format_summary([coco, vg, cc]).splitlines()
    assert [cell.strip() for cell in summary[0].split("|")] == [
        "corpus", "read", "empty", "dup", "rejected", "no image", "dropped", "written"]
    assert [[cell.strip() for cell in line.split("|")] for line in summary[2:]] == [
        ["coco", "5", "1", "0", "0", "1", "1", "3"], ["vg", "6", "1", "1", "0", "1", "1", "3"],
        ["cc3m", "4", "1", "0", "0", "1", "1", "2"]]


def test_prepare_pretrain_main_feeds_the_reader(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    roots = _pretrain_tree(tmp_path)
    out = tmp_path / "out"
    corpora = prepare_pretrain.main([
        "--out", str(out),
        "--coco", str(FIXTURES / "pretrain" / "dataset_coco.json"), "--coco-root", str(roots["coco"]),
        "--vg", str(FIXTURES / "pretrain" / "region_descriptions.json"), "--vg-root", str(roots["vg"]),
        "--sbu", str(FIXTURES / "pretrain" / "cc3m_train.tsv"), "--sbu-root", str(roots["cc3m"])])
    assert json.loads((out / "corpora.json").read_text()) == corpora
    assert [Path(c["annotation"]).name for c in corpora] == ["coco.json", "vg.json", "sbu.json"]
    records = load_pretrain_corpora(corpora)
    assert len(records) == 3 + 3 + 2 and [r.pid for r in records] == list(range(8))
    check_images(records, decode=True)
    assert "corpora list" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        prepare_pretrain.main(["--out", str(out), "--coco", "x.json"])  # no --coco-root


def test_prepare_pretrain_bad_input(tmp_path: Path) -> None:
    report = prepare_pretrain.CorpusReport("cc3m")
    urls = tmp_path / "urls.tsv"
    urls.write_text("a caption\thttp://example.com/1.jpg\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"urls.tsv, record 1, field 'image': expected an image file path"):
        prepare_pretrain.convert_caption_file(urls, report)
    no_tab = tmp_path / "no_tab.tsv"
    no_tab.write_text("caption\timage\nfine\t1.jpg\nbroken line\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"no_tab.tsv, record 3, field 'line'"):
        prepare_pretrain.convert_caption_file(no_tab, report)
    coco = _write_json(tmp_path / "coco.json", {"images": [{"filename": "1.jpg", "split": "train"}]})
    with pytest.raises(DataFormatError, match=r"coco.json, record 0, field 'sentences'"):
        prepare_pretrain.convert_coco(coco, report)
    listed = _write_json(tmp_path / "list.json", [{"image": "1.jpg", "caption": "a"}])
    with pytest.raises(FileNotFoundError, match=r"none of the 1 images was found under"):
        prepare_pretrain.prepare_corpus("sbu", str(listed), str(tmp_path / "nowhere"), tmp_path / "out")


def test_a_new_dataset_in_an_existing_shape_needs_one_reader_entry(monkeypatch, tmp_path: Path) -> None:
    # One spec entry (and a YAML naming data.format) is all a new dataset in the RSTPReid shape needs:
    # no published sizes, no second table to edit.
    spec = readers._SPECS["rstp"]
    monkeypatch.setitem(readers._SPECS, "mydata", readers._FormatSpec(
        "MyData", ("mine.json",), spec.path_field, spec.raw_splits, spec.processed_caption_is_list,
        spec.processed_has_att))
    root = _copy("rstp_raw", tmp_path)
    os.rename(root / "data_captions.json", root / "mine.json")
    splits = load_annotations("mydata", root)
    assert (splits.name, len(splits.train), len(splits.val), len(splits.test)) == ("mydata", 8, 4, 4)


def test_readers_keep_the_authors_word_counts_of_the_raw_captions(tmp_path):
    # RSTPReid: counted on the raw caption, before the reader strips it (a leading space is a word to them)
    rstp = [{"id": 1, "img_path": "a.jpg", "captions": [" a man  in red", "a woman"], "split": "test"},
            {"id": 2, "img_path": "b.jpg", "captions": ["coat.shoes,bag", "x"], "split": "train"}]
    root = tmp_path / "rstp"
    _write_json(root / "data_captions.json", rstp)
    splits = load_annotations("rstp", root)
    assert [(r.caption, r.authors_word_count) for r in splits.test] == [("a man  in red", 6), ("a woman", 2)]
    assert [r.authors_word_count for r in splits.train] == [2, 1]
    # ICFG-PEDES: the file's processed_tokens, and the cut at the 91st of them
    tokens = [f"w{i}" for i in range(90)] + ["an", "extra"]
    caption = "a man " + " ".join(tokens)
    icfg = [{"split": "test", "captions": [caption], "file_path": "a.jpg", "processed_tokens": [tokens], "id": 1},
            {"split": "test", "captions": ["a woman"], "file_path": "b.jpg", "processed_tokens": [["a", "woman"]],
             "id": 2},
            {"split": "train", "captions": ["a boy"], "file_path": "c.jpg", "id": 3}]
    root = tmp_path / "icfg"
    _write_json(root / "ICFG-PEDES.json", icfg)
    splits = load_annotations("icfg", root)
    assert [(r.authors_word_count, r.authors_caption) for r in splits.test] == [(92, "a m"), (2, None)]
    assert splits.test[0].caption == caption  # the record keeps the whole caption; protocol authors cuts it
    assert (splits.train[0].authors_word_count, splits.train[0].authors_caption) == (None, None)  # no tokens
    icfg[1]["processed_tokens"] = "a woman"
    _write_json(root / "ICFG-PEDES.json", icfg)
    with pytest.raises(DataFormatError, match="record 1, field 'processed_tokens': expected a list of word lists"):
        load_annotations("icfg", root)
