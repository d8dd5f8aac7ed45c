"""The decoded-image cache (datasets/image_cache.py) and the training data read through it and through the device
augmentation path."""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from datasets.batch_augment import AugmentSpec, augment_batch
from datasets.build import build_train_loader
from datasets.image_cache import build_image_cache, open_or_build_image_cache
from datasets.readers import load_annotations
from datasets.synthetic import make_synthetic
from datasets.tokenizer import build_tokenizer
from datasets.train_data import TrainDataset
from datasets.transforms import build_train_transform, load_image
from utils.config import load_config

LEVELS = ("word", "phrase", "sentence")


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic("cuhkpedes", tmp_path_factory.mktemp("synth") / "cuhk", num_ids=8, seed=5)


@pytest.fixture(scope="module")
def records(root: Path):
    return load_annotations("cuhkpedes", root).train


def test_cache_holds_the_decoded_pixels_and_survives_pickling(records, tmp_path: Path) -> None:
    paths = [r.image_path for r in records]  # two captions per image: every path twice
    cache = build_image_cache(paths, tmp_path / "cache", workers=2)
    assert len(cache) == len(set(paths))
    for path in paths[:6]:
        want = np.asarray(load_image(path))
        assert np.array_equal(cache.array(path), want)
        assert np.array_equal(np.asarray(cache.image(path)), want)
    copy = pickle.loads(pickle.dumps(cache))  # what a DataLoader worker gets: maps the file itself
    assert copy._pixels is None and np.array_equal(copy.array(paths[0]), cache.array(paths[0]))
    assert (tmp_path / "cache" / "images.u8").stat().st_size == sum(
        np.asarray(load_image(p)).nbytes for p in set(paths))
    with pytest.raises(FileNotFoundError, match="not in the cache"):
        cache.array(str(tmp_path / "elsewhere.jpg"))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".cache")]  # no staging folder left


def test_an_undecodable_image_is_recorded_and_fails_like_the_file(records, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    paths = [records[0].image_path, str(bad)]
    cache = build_image_cache(paths, tmp_path / "cache")
    with pytest.raises(OSError, match="cannot decode"):
        cache.array(str(bad))
    assert cache.array(paths[0]).shape[2] == 3


def test_a_changed_or_missing_image_makes_the_cache_rebuild(records, tmp_path: Path) -> None:
    source = Path(records[0].image_path)
    image = tmp_path / "img.jpg"
    image.write_bytes(source.read_bytes())
    folder = tmp_path / "cache"
    first = open_or_build_image_cache(folder, [str(image)])
    before = first.array(str(image))
    assert open_or_build_image_cache(folder, [str(image)]).entries == first.entries  # reused
    load_image(records[2].image_path).save(image, "JPEG")  # another picture under the same name
    os.utime(image, ns=(1, 1))
    rebuilt = open_or_build_image_cache(folder, [str(image)])
    assert np.array_equal(rebuilt.array(str(image)), np.asarray(load_image(image)))
    assert not np.array_equal(rebuilt.array(str(image)), before)
    other = str(source)
    assert np.array_equal(open_or_build_image_cache(folder, [other]).array(other), np.asarray(load_image(other)))


def _items_equal(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a) and a.keys() == b.keys()


def test_cpu_path_items_are_bit_identical_with_the_cache(records, tmp_path: Path) -> None:
    cfg = load_config(None, ["input.image_size=[32,16]", "input.random_erasing_prob=1.0"])
    transform = build_train_transform(cfg.input)
    cache = build_image_cache([r.image_path for r in records], tmp_path / "cache")
    plain = TrainDataset(records, transform, num_views=3, levels=LEVELS, seed=3)
    cached = TrainDataset(records, transform, num_views=3, levels=LEVELS, seed=3, image_cache=cache)
    for index in (0, 5, len(records) - 1):
        assert _items_equal(plain[index], cached[index])


def test_device_path_items_are_functions_of_seed_epoch_index(records, tmp_path: Path) -> None:
    cfg = load_config(None, ["input.image_size=[32,16]"])
    spec = AugmentSpec.from_config(cfg.input)
    cache = build_image_cache([r.image_path for r in records], tmp_path / "cache")
    dataset = TrainDataset(records, None, num_views=3, levels=LEVELS, seed=3, image_cache=cache,
                           device_augment=spec)
    item = dataset[4]
    assert "images" not in item and item["view_params"].shape == (3, 8)
    assert np.array_equal(item["image_uint8"].numpy(), np.asarray(load_image(records[4].image_path)))
    assert _items_equal(item, dataset[4])
    dataset.set_epoch(1)
    assert not torch.equal(item["view_params"], dataset[4]["view_params"])
    # Text levels are drawn as on the CPU path.
    reference = TrainDataset(records, build_train_transform(cfg.input), num_views=3, levels=LEVELS, seed=3)
    assert reference[4]["texts"] == item["texts"]


def test_device_path_loader_batches_become_the_cpu_path_batch_layout(root: Path, records, tmp_path: Path) -> None:
    common = ["input.image_size=[32,16]", "train.batch_size_per_gpu=8", "data.num_workers=0",
              "data.pin_memory=false", "text.max_text_len=48"]
    cpu_cfg = load_config(None, common + ["text.tokenizer=train", "text.tokenizer_vocab_size=400"])
    tokenizer = build_tokenizer(cpu_cfg.text, [r.caption for r in records])
    dev_cfg = load_config(None, common + ["data.augment_on=device", f"data.image_cache={tmp_path / 'cache'}"])
    batches = []
    for cfg in (cpu_cfg, dev_cfg):
        loader, sampler, dataset = build_train_loader(cfg, records, tokenizer)
        sampler.set_epoch(0)
        dataset.set_epoch(0)
        batches.append(next(iter(loader)))
    cpu, dev = batches
    assert (tmp_path / "cache" / "index.json").is_file()
    assert dev["image_uint8"].dtype == torch.uint8 and dev["view_params"].shape == (24, 8)
    augmented = augment_batch(dev, dev_cfg.input)
    assert set(augmented) == set(cpu)
    for key in cpu:
        if key == "images":
            assert augmented[key].shape == cpu[key].shape and augmented[key].dtype == cpu[key].dtype
        else:
            assert torch.equal(augmented[key], cpu[key]), key
    # View-major: rows b, B+b and 2B+b are three views of record b (the same image, differently augmented).
    images = augmented["images"]
    assert not torch.equal(images[0], images[8])
