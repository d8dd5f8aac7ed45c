"""The device augmentation path (datasets/batch_augment.py) against the per-item CPU reference (datasets/transforms.py).

Runs on CPU tensors, so CI covers the same code a GPU runs.
"""
from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image

from datasets.batch_augment import (ERASE, ERASE_HEIGHT, ERASE_LEFT, ERASE_TOP, ERASE_WIDTH, FLIP, LEFT, TOP,
                                    AugmentSpec, DeviceAugmentError, as_uint8_hwc, augment_batch, augment_views,
                                    draw_view_params, resize_batch, stack_images)
from datasets.transforms import build_train_transform
from utils.config import load_config


def _images(sizes, seed=0):
    """Smooth random RGB images with some noise (upsampled and downsampled by the tests' target sizes)."""
    rng = np.random.default_rng(seed)
    out = []
    for height, width in sizes:
        coarse = Image.fromarray(rng.integers(0, 256, (max(2, height // 8), max(2, width // 8), 3), dtype=np.uint8))
        smooth = np.asarray(coarse.resize((width, height), Image.BILINEAR), dtype=np.int16)
        noisy = np.clip(smooth + rng.integers(-20, 21, smooth.shape), 0, 255).astype(np.uint8)
        out.append(Image.fromarray(noisy))
    return out


@pytest.mark.parametrize("interpolation, pil_filter", [("bicubic", Image.BICUBIC), ("bilinear", Image.BILINEAR)])
def test_batched_resize_is_pillows_resize_pixel_for_pixel(interpolation, pil_filter):
    # Larger, smaller, equal and mixed sizes against a 40x24 target, all in one zero-padded batch.
    images = _images([(97, 31), (40, 24), (23, 11), (61, 24), (40, 57), (300, 120)])
    stacked, sizes = stack_images([as_uint8_hwc(im) for im in images])
    got = resize_batch(stacked, sizes, (40, 24), interpolation)
    assert got.shape == (6, 3, 40, 24) and got.dtype == torch.float32
    for i, image in enumerate(images):
        want = torch.from_numpy(np.array(image.resize((24, 40), pil_filter))).permute(2, 0, 1).float()
        assert torch.equal(got[i], want), (i, image.size, (got[i] - want).abs().max())


def _grid_values(spec: AugmentSpec) -> torch.Tensor:
    """Every value the reference can give a non-erased pixel of each channel: (k/255 - mean) / std."""
    levels = torch.arange(256, dtype=torch.float32).div(255)
    mean = torch.tensor(spec.mean)[:, None]
    std = torch.tensor(spec.std)[:, None]
    return levels[None].sub(mean).div(std)  # [3, 256]


def _erased_box(view: torch.Tensor, grid: torch.Tensor) -> tuple[int, int, int, int, int]:
    """(erase, top, left, h, w) of the reference's erased rectangle: its pixels are normal noise, off the grid."""
    off = torch.stack([~torch.isin(view[c], grid[c]) for c in range(3)]).all(dim=0)
    if not off.any():
        return 0, 0, 0, 0, 0
    rows, cols = off.any(dim=1).nonzero().squeeze(1), off.any(dim=0).nonzero().squeeze(1)
    top, left = int(rows[0]), int(cols[0])
    h, w = int(rows[-1]) - top + 1, int(cols[-1]) - left + 1
    assert off[top:top + h, left:left + w].all() and int(off.sum()) == h * w  # a full rectangle, nothing else
    return 1, top, left, h, w


@pytest.fixture
def recorded(monkeypatch):
    """Runs the reference pipeline and records the crop offsets and flips it drew."""
    log = {"crops": [], "flips": set()}
    get_params, hflip = T.RandomCrop.get_params, TF.hflip

    def recording_get_params(img, output_size):
        params = get_params(img, output_size)
        log["crops"].append(params[:2])
        return params

    def recording_hflip(img):
        log["flips"].add(len(log["crops"]) - 1)
        return hflip(img)

    monkeypatch.setattr(T.RandomCrop, "get_params", staticmethod(recording_get_params))
    monkeypatch.setattr(TF, "hflip", recording_hflip)
    return log


def _reference_views(transform, image, seed: int, num_views: int, log: dict, grid) -> tuple[torch.Tensor, torch.Tensor]:
    """The CPU path's views of ``image`` seeded as TrainDataset seeds them, and their parameters [V, 8]."""
    random.seed(seed)
    torch.manual_seed(seed)
    first = len(log["crops"])
    views = torch.stack([transform(image) for _ in range(num_views)])
    rows = []
    for v in range(num_views):
        top, left = log["crops"][first + v]
        rows.append((top, left, int(first + v in log["flips"])) + _erased_box(views[v], grid))
    return views, torch.tensor(rows, dtype=torch.long)


def test_same_parameters_give_the_reference_pixels(recorded):
    cfg = load_config(None, ["input.image_size=[48,24]", "input.pad_pixels=6"])
    spec = AugmentSpec.from_config(cfg.input)
    transform = build_train_transform(cfg.input)
    grid = _grid_values(spec)
    images = _images([(120, 50), (30, 14), (48, 24), (75, 19)], seed=3)
    num_views = 3
    refs, params = [], []
    for seed in range(6):  # several draws per image: flips, erasing and crops at the edges all come up
        for image in images:
            views, rows = _reference_views(transform, image, 1000 + seed, num_views, recorded, grid)
            refs.append(views)
            params.append(rows)
    records = len(refs)
    reference = torch.stack(refs).transpose(0, 1).reshape(num_views * records, 3, 48, 24)  # view-major
    view_params = torch.stack(params).transpose(0, 1).reshape(num_views * records, 8)
    assert view_params[:, FLIP].any() and not view_params[:, FLIP].all()
    assert view_params[:, ERASE].any() and not view_params[:, ERASE].all()
    assert set(view_params[:, TOP].tolist()) >= {0, 12}  # crops reaching both padded edges
    stacked, sizes = stack_images([as_uint8_hwc(images[r % len(images)]) for r in range(records)])
    resized = resize_batch(stacked, sizes, spec.size, spec.interpolation)
    got = augment_views(resized, view_params, spec, noise=reference)  # the reference's own erasing noise
    assert got.shape == reference.shape
    assert torch.equal(got, reference), (got - reference).abs().max()
    # Without the reference's noise only the erased boxes differ.
    other = augment_views(resized, view_params, spec, generator=torch.Generator().manual_seed(0))
    differs = (other != reference).any(dim=1)
    assert differs.any()
    for n in range(len(view_params)):
        e, top, left, h, w = view_params[n, ERASE:].tolist()
        inside = torch.zeros(48, 24, dtype=torch.bool)
        if e:
            inside[top:top + h, left:left + w] = True
        assert not (differs[n] & ~inside).any()


def _ks_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample Kolmogorov-Smirnov statistic."""
    a, b = a.double().sort().values, b.double().sort().values
    points = torch.cat([a, b])
    cdf_a = torch.searchsorted(a, points, right=True).double() / len(a)
    cdf_b = torch.searchsorted(b, points, right=True).double() / len(b)
    return float((cdf_a - cdf_b).abs().max())


def test_parameter_distributions_match_the_reference(recorded):
    cfg = load_config(None, ["input.image_size=[24,12]", "input.pad_pixels=3"])
    spec = AugmentSpec.from_config(cfg.input)
    transform = build_train_transform(cfg.input)
    grid = _grid_values(spec)
    image = _images([(60, 25)])[0]
    n_items, views = 800, 2
    reference = torch.cat([_reference_views(transform, image, s, views, recorded, grid)[1] for s in range(n_items)])
    drawn = torch.cat([draw_view_params(spec, random.Random(f"test:{s}"), views) for s in range(n_items)])
    n = len(drawn)
    # Crop offsets: uniform on 0..2*pad in both.
    for column in (TOP, LEFT):
        for value in range(2 * spec.pad + 1):
            p_ref = float((reference[:, column] == value).double().mean())
            p_got = float((drawn[:, column] == value).double().mean())
            assert abs(p_ref - p_got) < 5 * math.sqrt(2 * (1 / 7) * (6 / 7) / n), (column, value)
    assert set(drawn[:, TOP].tolist()) == set(range(2 * spec.pad + 1))
    # Flip and erase rates (0.5 each in the recipe).
    for column in (FLIP, ERASE):
        assert abs(reference[:, column].double().mean() - drawn[:, column].double().mean()) < 5 * math.sqrt(0.5 / n)
    # The erase box: area, aspect and position distributions (two-sample KS at a 0.1% level: 1.95 sqrt(2/n_e)).
    ref_boxes = reference[reference[:, ERASE] == 1]
    got_boxes = drawn[drawn[:, ERASE] == 1]
    bound = 1.95 * math.sqrt(1 / len(ref_boxes) + 1 / len(got_boxes))
    for name, f in {"area": lambda b: b[:, ERASE_HEIGHT] * b[:, ERASE_WIDTH],
                    "aspect": lambda b: b[:, ERASE_HEIGHT].double() / b[:, ERASE_WIDTH],
                    "top": lambda b: b[:, ERASE_TOP], "left": lambda b: b[:, ERASE_LEFT]}.items():
        assert _ks_distance(f(ref_boxes), f(got_boxes)) < bound, name
    # The test has power: a sampler that erased smaller boxes would fail it.
    smaller = got_boxes[got_boxes[:, ERASE_HEIGHT] * got_boxes[:, ERASE_WIDTH] < 60]
    area = lambda b: b[:, ERASE_HEIGHT] * b[:, ERASE_WIDTH]  # noqa: E731
    assert _ks_distance(area(ref_boxes), area(smaller)) > 1.95 * math.sqrt(1 / len(ref_boxes) + 1 / len(smaller))


def test_augment_batch_is_seeded_by_the_batch_and_leaves_other_batches_alone():
    cfg = load_config(None, ["input.image_size=[32,16]"])
    spec = AugmentSpec.from_config(cfg.input)
    stacked, sizes = stack_images([as_uint8_hwc(im) for im in _images([(50, 20), (40, 30)])])
    params = torch.cat([draw_view_params(spec, random.Random(s), 3) for s in range(2)]).view(2, 3, 8)
    batch = {"image_uint8": stacked, "image_sizes": sizes, "view_params": params.transpose(0, 1).reshape(6, 8),
             "augment_seed": 7, "pids": torch.tensor([0, 1])}
    a, b = augment_batch(dict(batch), cfg.input), augment_batch(dict(batch), cfg.input)
    assert a["images"].shape == (6, 3, 32, 16) and a["images"].dtype == torch.float32
    assert torch.equal(a["images"], b["images"]) and torch.equal(a["pids"], batch["pids"])
    assert not {"image_uint8", "image_sizes", "view_params", "augment_seed"} & set(a)
    plain = {"images": torch.zeros(1), "pids": torch.tensor([0])}
    assert augment_batch(plain, cfg.input) is plain


def test_an_interpolation_the_device_path_cannot_reproduce_is_refused():
    cfg = load_config(None, ["input.interpolation=lanczos"])
    with pytest.raises(DeviceAugmentError, match="input.interpolation"):
        AugmentSpec.from_config(cfg.input)
