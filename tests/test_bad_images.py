"""TrainDataset at run time: an unloadable image is skipped for a deterministic substitute and counted, and too many
stop the run with a clear error; without bad images the items are unchanged."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from datasets.readers import load_annotations
from datasets.records import MissingImagesError, Record
from datasets.synthetic import make_synthetic
from datasets.train_data import TrainDataset, default_max_bad_images, item_seed
from datasets.transforms import build_train_transform
from utils.config import load_config

LEVELS = ("word", "phrase", "sentence")


@pytest.fixture(scope="module")
def clean_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # cuhkpedes layout: 2-4 images per identity, 2 captions per image
    return make_synthetic("cuhkpedes", tmp_path_factory.mktemp("synth") / "cuhk", num_ids=8, seed=5)


@pytest.fixture()
def corrupt_root(clean_root: Path, tmp_path: Path) -> Path:
    root = tmp_path / "corrupt"
    shutil.copytree(clean_root, root)
    return root


def _transform():
    cfg = load_config(overrides=["input.image_size=[32,16]", "input.random_erasing_prob=1.0"])
    return build_train_transform(cfg.input)


def _dataset(records, **kwargs) -> TrainDataset:
    return TrainDataset(records, _transform(), num_views=2, levels=LEVELS, seed=11, **kwargs)


def _truncate(path: str) -> None:
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) // 2])


def _same(a: dict, b: dict) -> bool:
    return (torch.equal(a["images"], b["images"]) and a["texts"] == b["texts"] and a["caption"] == b["caption"]
            and (a["pid"], a["index"], a["rng_seed"]) == (b["pid"], b["index"], b["rng_seed"]))


def test_bad_image_is_replaced_by_the_next_image_of_its_identity(clean_root: Path, corrupt_root: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    clean = load_annotations("cuhkpedes", clean_root).train
    records = load_annotations("cuhkpedes", corrupt_root).train
    # records 6 and 7 are the two captions of identity 1's second image; record 8 starts its third image
    bad, sibling_index, substitute = 6, 7, 8
    assert [r.pid for r in records[4:12]] == [1] * 8 and records[5].pid == 1
    assert records[bad].image_path == records[sibling_index].image_path != records[substitute].image_path
    _truncate(records[bad].image_path)
    dataset, reference = _dataset(records), _dataset(clean)
    dataset.set_epoch(1)
    reference.set_epoch(1)
    with caplog.at_level(logging.WARNING, logger="datasets.train_data"):
        item = dataset[bad]
        again = dataset[bad]  # known bad now: same substitute without reading the file again
        sibling = dataset[sibling_index]
    [warning] = [r.getMessage() for r in caplog.records]  # one warning per bad image, not per access
    assert f"training record {bad}: skipped unloadable image {records[bad].image_path} (" in warning
    assert f"{records[bad].image_path} (image file is truncated (" in warning
    assert f"using record {substitute} (same identity) instead" in warning
    assert "1 bad image(s) so far in this process, limit 10" in warning
    assert list(dataset.bad_images) == [records[bad].image_path]

    # the item is record 8's image and caption drawn with record 6's seed: a dataset whose record 6 *is* record 8
    swapped = list(clean)
    swapped[bad] = swapped[sibling_index] = clean[substitute]
    expected = _dataset(swapped)
    expected.set_epoch(1)
    assert _same(item, expected[bad]) and _same(again, item)
    assert item["pid"] == 1 and item["index"] == bad and item["rng_seed"] == item_seed(11, 1, bad)
    assert item["caption"] == records[substitute].caption.lower() != records[bad].caption.lower()
    # the other caption of the bad image gets the same substitute, drawn with its own seed
    assert _same(sibling, expected[sibling_index]) and not torch.equal(sibling["images"], item["images"])
    # every other item is bit-identical to the clean dataset's
    for index in range(len(records)):
        if index not in (bad, sibling_index):
            assert _same(dataset[index], reference[index]), index


def test_identity_without_good_images_falls_back_to_the_next_record(corrupt_root: Path) -> None:
    records = load_annotations("cuhkpedes", corrupt_root).train
    last_pid = records[-1].pid
    own = [i for i, r in enumerate(records) if r.pid == last_pid]
    for path in {records[i].image_path for i in own}:
        _truncate(path)
    dataset = _dataset(records)
    item = dataset[own[-1]]  # the last record: wraps around to record 0, of identity 0
    assert item["caption"] == records[0].caption.lower() and item["pid"] == records[0].pid == 0
    assert item["index"] == own[-1]
    assert len(dataset.bad_images) == len({records[i].image_path for i in own})


def test_too_many_bad_images_raise_with_count_and_limit(corrupt_root: Path) -> None:
    records = load_annotations("cuhkpedes", corrupt_root).train
    paths = list(dict.fromkeys(r.image_path for r in records))
    for path in (paths[0], paths[1], paths[4]):  # both images of identity 0, the third of identity 1
        _truncate(path)
    dataset = _dataset(records, max_bad_images=2)
    item = dataset[0]  # identity 0 has no good image: record 4 of identity 1 stands in
    assert item["caption"] == records[4].caption.lower() and item["pid"] == 1
    assert list(dataset.bad_images) == paths[:2]
    with pytest.raises(MissingImagesError, match=r"^3 training images could not be loaded in this process, more "
                                                 r"than the limit of 2 \(max_bad_images; default max\(10, 1% of "
                                                 rf"{len(records)} records\)\); last: training record \d+: cannot "
                                                 r"decode image .*image file is truncated.*python -m datasets.check"):
        for index in range(len(records)):
            dataset[index]
    strict = _dataset(records, max_bad_images=0)
    with pytest.raises(MissingImagesError, match="1 training images could not be loaded .* limit of 0"):
        strict[0]
    assert default_max_bad_images(len(records)) == 10
    assert (default_max_bad_images(999), default_max_bad_images(5000), default_max_bad_images(68126)) == (10, 50, 681)
    with pytest.raises(ValueError, match="max_bad_images must be >= 0"):
        _dataset(records, max_bad_images=-1)


def test_no_loadable_image_raises_the_original_error(tmp_path: Path) -> None:
    records = [Record(str(tmp_path / f"gone{i}.png"), "a man", i % 2, i) for i in range(3)]
    with pytest.raises(FileNotFoundError, match=r"training record 1: image not found: .*gone1.png"):
        _dataset(records)[1]


def test_dataloader_workers_give_the_same_batches(corrupt_root: Path) -> None:
    records = load_annotations("cuhkpedes", corrupt_root).train
    _truncate(records[2].image_path)
    _truncate(records[-1].image_path)

    def batches(workers: int) -> list[dict]:
        loader = DataLoader(_dataset(records), batch_size=4, shuffle=False, num_workers=workers,
                            collate_fn=lambda items: items)
        return [item for batch in loader for item in batch]

    serial, parallel = batches(0), batches(2)  # each worker meets and counts its own bad images
    assert len(serial) == len(parallel) == len(records)
    assert all(_same(a, b) for a, b in zip(serial, parallel))
    # identity 0 has two images: record 2 (its second) falls back to record 0, record 35 to record 28
    assert serial[2]["caption"] == records[0].caption.lower() and serial[35]["caption"] == records[28].caption.lower()
