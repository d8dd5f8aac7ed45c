"""The person-centric pretraining corpora convert from their owners' layouts, with counts (datasets.person_corpora)."""
from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from datasets import prepare_pretrain
from datasets.person_corpora import convert_luperson_mllm, CorpusCounts
from datasets.readers import check_images, load_pretrain_corpora
from datasets.records import DataFormatError


def _jpeg(path: Path) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 16), (90, 20, 200)).save(buffer, format="JPEG")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(buffer.getvalue())
    return buffer.getvalue()


def _dump(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def _converted(tmp_path: Path, name: str, sources, root: Path) -> tuple[list[dict], prepare_pretrain.CorpusReport]:
    entry, report = prepare_pretrain.prepare_corpus(name, sources, str(root), tmp_path / "out")
    return json.loads(Path(entry["annotation"]).read_text()), report


def _counts(report) -> tuple[int, ...]:
    return (report.read, report.empty, report.duplicates, report.rejected, report.missing_images, report.dropped,
            report.written)


def test_mals_as_aptm_reads_it(tmp_path: Path) -> None:
    root = tmp_path / "images" / "MALS"
    for name in ("gene_crop/c_g_a_0/0.jpg", "gene_crop/c_g_a_0/1.jpg"):
        _jpeg(root / name)
    gene = tmp_path / "data" / "gene_attrs"
    _dump(gene / "g_c_g_a_0_attrs.json", [
        {"image": "gene_crop/c_g_a_0/0.jpg", "caption": "a young boy wearing a black hoodie",
         "image_id": "c_g_a_0_0", "label": [1, 0, -1]},
        {"image": "gene_crop/c_g_a_0/0.jpg", "caption": "a young boy wearing a black hoodie",
         "image_id": "c_g_a_0_0", "label": [1, 0, -1]},
        {"image": "gene_crop/c_g_a_0/1.jpg", "caption": "  ", "image_id": "c_g_a_0_1", "label": [0, 1, 1]}])
    _dump(gene / "g_c_g_a_1_attrs.json", [
        {"image": "gene_crop/c_g_a_0/1.jpg", "caption": "a woman in a white top", "image_id": "c_g_a_0_1",
         "label": [0, 1, 1]},
        {"image": "gene_crop/c_g_a_1/9.jpg", "caption": "a man in red", "image_id": "c_g_a_1_9", "label": [0, 0, 0]}])
    items, report = _converted(tmp_path, "mals", [str(gene)], root)
    assert items == [
        {"image": "gene_crop/c_g_a_0/0.jpg", "caption": "a young boy wearing a black hoodie", "identity": "c_g_a_0_0"},
        {"image": "gene_crop/c_g_a_0/1.jpg", "caption": "a woman in a white top", "identity": "c_g_a_0_1"}]
    assert _counts(report) == (5, 1, 1, 0, 1, 1, 2)
    bad = _dump(tmp_path / "bad.json", [{"image": "a.jpg", "caption": "x"}])
    with pytest.raises(DataFormatError, match=r"bad.json, record 0, field 'image_id': expected the field"):
        _converted(tmp_path, "mals", [str(bad)], root)


def test_sda_as_mra_reads_it(tmp_path: Path) -> None:
    root = tmp_path / "images" / "SDA"
    _jpeg(root / "c_0_5000" / "0_0.jpg")
    _jpeg(root / "c_0_5000" / "0_1.jpg")
    sda = _dump(tmp_path / "data" / "sda" / "sda_0_5000.json", [
        {"image": "c_0_5000/0_0.jpg", "boxes": [[0.56, 0.49, 0.85, 0.97]], "logits": [0.74],
         "phrases": ["a man"], "caption": "a man wearing a black shirt and red shoes", "image_id": 0},
        {"image": "c_0_5000/0_1.jpg", "boxes": [], "logits": [], "phrases": [], "caption": "", "image_id": 1}])
    items, report = _converted(tmp_path, "sda", [str(sda)], root)
    assert items == [{"image": "c_0_5000/0_0.jpg", "caption": "a man wearing a black shirt and red shoes",
                      "identity": "0"}]
    assert _counts(report) == (2, 1, 0, 0, 0, 0, 1)
    bad = _dump(tmp_path / "sda_bad.json", [{"image": "c_0_5000/0_0.jpg", "caption": 3, "image_id": 0}])
    with pytest.raises(DataFormatError, match=r"record 0, field 'caption': expected a string, got int 3"):
        _converted(tmp_path, "sda", [str(bad)], root)


def test_luperson_mllm_as_nam_reads_it(tmp_path: Path) -> None:
    root = tmp_path / "LUPerson-MLLM"
    for name in ("01_0001.jpg", "01_0002.jpg"):
        _jpeg(root / name)
    captions = tmp_path / "caption"
    _dump(captions / "Ts-qwen.json", {"LUPerson/01_0001.jpg": "A man in a grey coat.",
                                      "LUPerson/01_0002.jpg": "The [description] of a <person>"})
    _dump(captions / "Td-qwen.json", {"LUPerson/01_0001.jpg": "He wears a grey coat and jeans."})
    _dump(captions / "Ts-shikra.json", {"LUPerson/01_0001.jpg": "A man in a grey coat.",
                                        "LUPerson/01_0003.jpg": "A girl with a red bag."})
    _dump(captions / "Td-shikra.json", {"LUPerson/01_0002.jpg": "A woman holding an umbrella."})
    items, report = _converted(tmp_path, "luperson_mllm", [str(captions)], root)
    assert items == [
        {"image": "01_0001.jpg", "caption": "A man in a grey coat.", "identity": "01_0001.jpg"},
        {"image": "01_0001.jpg", "caption": "He wears a grey coat and jeans.", "identity": "01_0001.jpg"},
        {"image": "01_0002.jpg", "caption": "A woman holding an umbrella.", "identity": "01_0002.jpg"}]
    # read 6: one unfilled template rejected, one repeat, one caption of an image that is not in the folder
    assert _counts(report) == (6, 0, 1, 1, 1, 1, 3)
    with pytest.raises(DataFormatError, match=r"Td-qwen.json: expected a JSON object"):
        convert_luperson_mllm([str(_dump(captions / "Td-qwen.json", ["not", "an", "object"]))], CorpusCounts())


def test_ham_pedes_as_its_captioner_writes_it(tmp_path: Path) -> None:
    root = tmp_path / "PLIP_data"
    _jpeg(root / "part1" / "a.jpg")
    caption = _dump(tmp_path / "caption.json", {"part1/a.jpg": ["A man in a blue shirt.", "", "A man in blue."],
                                                 "part1/b.jpg": ["A woman."]})
    items, report = _converted(tmp_path, "ham_pedes", [str(caption)], root)
    assert [i["caption"] for i in items] == ["A man in a blue shirt.", "A man in blue."]
    assert {i["identity"] for i in items} == {"part1/a.jpg"}
    assert _counts(report) == (4, 1, 0, 0, 1, 1, 2)


def test_webperson_parquet_as_hugging_face_ships_it(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow", reason="WebPerson's parquet files need pyarrow (requirements-pretrain.txt)")
    import pyarrow.parquet as pq
    rows = [{"image": {"bytes": _jpeg(None), "path": "x.jpg"}, "image_path": "00000/000001.jpg",
             "caption1": "A woman in a black dress.", "caption2": "She carries a bag."},
            {"image": {"bytes": None, "path": None}, "image_path": "00000/000002.jpg",
             "caption1": "A man running.", "caption2": ""},
            {"image": {"bytes": _jpeg(None), "path": "z.jpg"}, "image_path": "00000/000003.jpg",
             "caption1": "A child.", "caption2": "A child."}]
    data = tmp_path / "data"
    data.mkdir()
    pq.write_table(pa.Table.from_pylist(rows), data / "train-00000-of-00001.parquet")
    root = tmp_path / "webperson-images"
    items, report = _converted(tmp_path, "webperson", [str(data)], root)
    assert [(i["image"], i["caption"]) for i in items] == [
        ("00000/000001.jpg", "A woman in a black dress."), ("00000/000001.jpg", "She carries a bag."),
        ("00000/000003.jpg", "A child.")]
    assert _counts(report) == (6, 1, 1, 0, 1, 1, 3)
    assert (root / "00000" / "000001.jpg").read_bytes() == rows[0]["image"]["bytes"]
    truncated = tmp_path / "broken.parquet"
    truncated.write_bytes((data / "train-00000-of-00001.parquet").read_bytes()[:100])
    with pytest.raises(DataFormatError, match=r"broken.parquet: expected a WebPerson parquet file"):
        _converted(tmp_path, "webperson", [str(truncated)], root)


def test_main_converts_every_person_corpus_and_feeds_the_reader(tmp_path: Path, capsys) -> None:
    root = tmp_path / "MALS"
    _jpeg(root / "g" / "0.jpg")
    mals = _dump(tmp_path / "g.json", [{"image": "g/0.jpg", "caption": "a man", "image_id": "g0", "label": []}])
    ham_root = tmp_path / "HAM"
    _jpeg(ham_root / "p.jpg")
    ham = _dump(tmp_path / "caption.json", {"p.jpg": ["a woman", "a lady"]})
    out = tmp_path / "out"
    corpora = prepare_pretrain.main(["--out", str(out), "--mals", str(mals), "--mals-root", str(root),
                                     "--ham-pedes", str(ham), "--ham-pedes-root", str(ham_root)])
    records = load_pretrain_corpora(corpora)
    assert [(Path(r.image_path).name, r.caption) for r in records] == [("0.jpg", "a man"), ("p.jpg", "a woman"),
                                                                      ("p.jpg", "a lady")]
    check_images(records, decode=True)
    table = capsys.readouterr().out.splitlines()
    assert [c.strip() for c in table[0].split("|")] == ["corpus", "read", "empty", "dup", "rejected", "no image",
                                                         "dropped", "written"]
    assert [c.strip() for c in table[3].split("|")] == ["ham_pedes", "2", "0", "0", "0", "0", "0", "2"]
    with pytest.raises(SystemExit):
        prepare_pretrain.main(["--out", str(out), "--sda", str(mals)])  # no --sda-root


# ----------------------------------------------------------------------------------------------- record store

def test_record_store_equals_the_list_it_replaces(tmp_path: Path) -> None:
    from datasets.record_store import RecordStore, iter_json_list
    items = [{"image": f"d/{i // 2}.jpg", "caption": f"caption {i} é" + "x" * (i * 37 % 3000)} for i in range(700)]
    path = _dump(tmp_path / "a.json", items)
    import datasets.record_store as record_store
    record_store._CHUNK_CHARS = 4096  # elements straddle the window and some are longer than it
    try:
        assert list(iter_json_list(path)) == items
    finally:
        record_store._CHUNK_CHARS = 1 << 20
    store = load_pretrain_corpora([{"annotation": str(path), "image_root": "/r"},
                                   {"annotation": str(_dump(tmp_path / "b.json", [{"image": "/abs.jpg",
                                                                                  "caption": ["u", "v"]}])),
                                    "image_root": "/s"}])
    assert isinstance(store, RecordStore) and len(store) == 702
    expected = [(f"/r/d/{i // 2}.jpg", items[i]["caption"]) for i in range(700)] + [("/abs.jpg", "u"), ("/abs.jpg", "v")]
    assert [(r.image_path, r.caption) for r in store] == expected
    assert [r.pid for r in store[-3:]] == [699, 700, 701] and store[-1].image_id == 701
    assert len(store.path_ends) == 351  # one stored path per image, not per caption
    with pytest.raises(IndexError):
        store[702]
    for text, message in (("", "an empty file"), ('{"a": 1}', "expected a JSON list"),
                          ('[{"image": "a", "caption": "b"} {"image"', "',' or ']'"),
                          ('[{"image": "a", "caption": "b"}, {"image": ', "valid JSON")):
        bad = tmp_path / "bad.json"
        bad.write_text(text, encoding="utf-8")
        with pytest.raises(DataFormatError, match=message):
            load_pretrain_corpora([{"annotation": str(bad), "image_root": "r"}])


@pytest.mark.parametrize("count", [0, 1, 7, 8, 9, 4000])
def test_record_store_block_edges(count: int) -> None:
    from datasets.record_store import RecordStore
    store = RecordStore(["/r"])
    captions = [f"person {i} in a {'red' if i % 3 else 'blue'} coat" for i in range(count)]
    for i, caption in enumerate(captions):
        store.add(0, f"{i // 3}.jpg", caption)
    store.freeze()
    assert [store.caption(i) for i in range(count)] == captions
    assert len(store.block_ends) == -(-count // 8)
    if count == 4000:  # most blocks are compressed against the dictionary: far below the text's size
        assert store.captions.nbytes < sum(map(len, captions)) / 3
