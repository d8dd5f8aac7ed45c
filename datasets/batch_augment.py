"""The recipe's training augmentation run batched on the training device (``data.augment_on: device``).

The reference is the per-item CPU path of :func:`datasets.transforms.build_train_transform`: PIL resize to
``input.image_size`` (bicubic), zero pad by ``input.pad_pixels``, random crop back to the size, horizontal flip,
ToTensor, normalise, timm RandomErasing (pixel mode, one box). Here the work is split:

* DataLoader workers ship each record's image once, as uint8 at its original size (decoded, or read from the
  :mod:`datasets.image_cache`), with the random parameters of its ``num_views`` views drawn by
  :func:`draw_view_params` from the item's seed (same distributions as the reference, see below): no per-view
  pixel work on the CPU;
* :func:`augment_batch`, called by the training step after the batch reached the device, resizes every record
  once (the views of a record share the resize), then crops, flips, normalises and erases all views of the batch
  at once. It runs on CPU tensors as well as on a GPU.

Resizing reproduces Pillow's resampling exactly: Pillow computes, per output pixel, normalised filter weights
(bicubic a = -0.5, or bilinear; support scaled by the reduction factor, i.e. antialiased), turns them into 22-bit
fixed-point integers, and runs a horizontal then a vertical pass, each rounding and clipping to uint8. The same
integer arithmetic (int32 sums over each output pixel's few taps, batched over records) gives Pillow's pixels;
the zero padding of the batch tensor is never read. Crop, flip, ToTensor and normalise
are the reference's float32 operations, so given the same parameters (and the same erasing noise) the two paths
give the same pixels; ``tests/test_batch_augment.py`` checks that, and that the parameter distributions match.

Random draws: crop offsets uniform in [0, 2 * pad] (torchvision's RandomCrop on the padded image), flip with
``hflip_prob``, and timm's RandomErasing algorithm verbatim (erase with probability p; up to 10 attempts of
area ~ U(0.02, 1/3) of the image and log-aspect ~ U(log 0.3, log 1/0.3), the first box that fits). The erasing
noise is drawn on the device from a generator seeded by the batch's item seeds, so a batch is a function of
(seed, epoch, indices) as on the CPU path (not the same numbers as the CPU path: different generators).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

# Columns of the per-view parameter rows (int64): crop offsets into the padded image, flip, and the erase box.
PARAM_FIELDS = ("top", "left", "flip", "erase", "erase_top", "erase_left", "erase_height", "erase_width")
TOP, LEFT, FLIP, ERASE, ERASE_TOP, ERASE_LEFT, ERASE_HEIGHT, ERASE_WIDTH = range(len(PARAM_FIELDS))

# timm RandomErasing's defaults, which the reference pipeline uses (datasets/transforms.py).
ERASE_MIN_AREA, ERASE_MAX_AREA, ERASE_MIN_ASPECT, ERASE_ATTEMPTS = 0.02, 1 / 3, 0.3, 10

# Pillow's resampling filters: (support, function); fixed-point precision of its 8-bit path.
_PRECISION_BITS = 32 - 8 - 2
_FILTERS = {"bicubic": 2.0, "bilinear": 1.0}
# The batch tensor of original images is padded to a multiple of this (fewer distinct shapes per step).
SIZE_MULTIPLE = 16


class DeviceAugmentError(ValueError):
    """A setting the device augmentation cannot reproduce (names the key)."""


@dataclass(frozen=True)
class AugmentSpec:
    """The recipe's augmentation settings (``cfg.input``) in the form both halves of the device path use."""

    size: tuple[int, int]
    interpolation: str
    pad: int
    hflip_prob: float
    erase_prob: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def from_config(cls, input_cfg: Any) -> "AugmentSpec":
        interpolation = str(input_cfg.interpolation).lower()
        if interpolation not in _FILTERS:
            raise DeviceAugmentError(f"input.interpolation {input_cfg.interpolation!r} is not supported with "
                                     f"data.augment_on=device (supported: {', '.join(_FILTERS)})")
        height, width = (int(s) for s in input_cfg.image_size)
        return cls((height, width), interpolation, int(input_cfg.pad_pixels), float(input_cfg.hflip_prob),
                   float(input_cfg.random_erasing_prob), tuple(float(m) for m in input_cfg.pixel_mean),
                   tuple(float(s) for s in input_cfg.pixel_std))


# ------------------------------------------------------------------------------------------ worker side
def draw_erase_box(rng: random.Random, probability: float, height: int, width: int) -> tuple[int, int, int, int, int]:
    """timm RandomErasing's draw for one image: (erase, top, left, h, w), erase 0 when no box was placed."""
    if rng.random() > probability:
        return 0, 0, 0, 0, 0
    area = height * width
    log_aspect = (math.log(ERASE_MIN_ASPECT), math.log(1 / ERASE_MIN_ASPECT))
    for _ in range(ERASE_ATTEMPTS):
        target_area = rng.uniform(ERASE_MIN_AREA, ERASE_MAX_AREA) * area
        aspect_ratio = math.exp(rng.uniform(*log_aspect))
        h = int(round(math.sqrt(target_area * aspect_ratio)))
        w = int(round(math.sqrt(target_area / aspect_ratio)))
        if w < width and h < height:
            return 1, rng.randint(0, height - h), rng.randint(0, width - w), h, w
    return 0, 0, 0, 0, 0


def draw_view_params(spec: AugmentSpec, rng: random.Random, num_views: int) -> torch.Tensor:
    """Parameters of ``num_views`` views of one record: int64 [num_views, len(PARAM_FIELDS)]."""
    height, width = spec.size
    rows = []
    for _ in range(num_views):
        top, left = rng.randint(0, 2 * spec.pad), rng.randint(0, 2 * spec.pad)
        flip = int(rng.random() < spec.hflip_prob)
        rows.append((top, left, flip) + draw_erase_box(rng, spec.erase_prob, height, width))
    return torch.tensor(rows, dtype=torch.long)


def as_uint8_hwc(image: Any) -> torch.Tensor:
    """A PIL RGB image or uint8 array [H, W, 3] as a uint8 tensor [H, W, 3]."""
    array = np.array(image, dtype=np.uint8)  # a writable copy
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an RGB image [H, W, 3], got shape {array.shape}")
    return torch.from_numpy(array)


def stack_images(images: Sequence[torch.Tensor], multiple: int = SIZE_MULTIPLE) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 [h_i, w_i, 3] images -> (uint8 [B, Hmax, Wmax, 3] zero-padded at the bottom/right, sizes [B, 2])."""
    sizes = torch.tensor([tuple(im.shape[:2]) for im in images], dtype=torch.long)
    hmax, wmax = (-(-int(s) // multiple) * multiple for s in sizes.max(dim=0).values)
    out = torch.zeros(len(images), hmax, wmax, 3, dtype=torch.uint8)
    for i, im in enumerate(images):
        out[i, :im.shape[0], :im.shape[1]] = im
    return out, sizes


# ------------------------------------------------------------------------------------------ device side
def _filter(name: str, x: torch.Tensor) -> torch.Tensor:
    x = x.abs()
    if name == "bilinear":
        return torch.where(x < 1.0, 1.0 - x, torch.zeros_like(x))
    a = -0.5
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return torch.where(x < 1.0, near, torch.where(x < 2.0, far, torch.zeros_like(x)))


def resize_taps(in_sizes: torch.Tensor, in_max: int, out_size: int, filter_name: str
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pillow's fixed-point resampling taps: (input index [B, out, K] long, weight [B, out, K] float64 holding
    integers, Pillow's 22-bit fixed-point coefficients).

    Output pixel o of record b is sum_k weight[b, o, k] * input[index[b, o, k]] (before the rounding of
    :func:`_fixed_point_pass`). K covers the widest window any size up to ``in_max`` can have, from shapes alone
    (no device-to-host read); taps past a window have weight 0.
    """
    device = in_sizes.device
    support_max = _FILTERS[filter_name] * max(in_max / out_size, 1.0)
    taps = 2 * math.ceil(support_max) + 1
    in_f = in_sizes.to(torch.float64)[:, None, None]  # [B, 1, 1]
    scale = in_f / out_size
    filterscale = scale.clamp(min=1.0)
    support = _FILTERS[filter_name] * filterscale
    center = (torch.arange(out_size, dtype=torch.float64, device=device)[None, :, None] + 0.5) * scale  # [B, out, 1]
    # Pillow's window [trunc(center - support + 0.5), trunc(center + support + 0.5)) clipped to the image.
    low = torch.trunc(center - support + 0.5).clamp(min=0)
    high = torch.minimum(torch.trunc(center + support + 0.5), in_f)
    index = low + torch.arange(taps, dtype=torch.float64, device=device)  # [B, out, K]
    weights = torch.where(index < high, _filter(filter_name, (index - center + 0.5) * (1.0 / filterscale)), 0.0)
    total = weights.sum(dim=2, keepdim=True)
    weights = torch.where(total != 0, weights / total, weights)
    fixed = weights * float(1 << _PRECISION_BITS)
    fixed = torch.where(fixed < 0, torch.trunc(fixed - 0.5), torch.trunc(fixed + 0.5))
    return index.clamp(max=in_max - 1).long(), fixed


def _fixed_point_pass(weighted_sum: torch.Tensor) -> torch.Tensor:
    """Pillow's rounding of one pass: clip8((2^21 + sum) >> 22) (an arithmetic shift: floor for negative sums)."""
    return ((weighted_sum + (1 << (_PRECISION_BITS - 1))) >> _PRECISION_BITS).clamp_(0, 255)


def _resample(pixels: torch.Tensor, index: torch.Tensor, weights: torch.Tensor, dim: int) -> torch.Tensor:
    """One separable pass along ``dim`` (2 = rows, 3 = columns) of int32 [B, 3, H, W] with taps [B, out, K]: the
    sum over the K taps of gathered pixels times fixed-point weights, in int32 as Pillow computes it."""
    shape = list(pixels.shape)
    shape[dim] = index.shape[1]
    view = (index.shape[0], 1, -1, 1) if dim == 2 else (index.shape[0], 1, 1, -1)
    total = torch.zeros(shape, dtype=torch.int32, device=pixels.device)
    for k in range(index.shape[2]):
        gathered = pixels.gather(dim, index[:, :, k].view(view).expand(shape))
        total += gathered * weights[:, :, k].view(view)
    return total


def resize_batch(images: torch.Tensor, sizes: torch.Tensor, size: tuple[int, int],
                 interpolation: str = "bicubic") -> torch.Tensor:
    """uint8 [B, Hmax, Wmax, 3] (record i valid in its top-left sizes[i]) -> float32 [B, 3, H, W] holding the
    uint8 values Pillow's ``resize((W, H), filter)`` gives for each record's image: a horizontal then a vertical
    pass, each with Pillow's fixed-point weights, int32 sums over a few taps per pixel and Pillow's rounding."""
    if interpolation not in _FILTERS:
        raise DeviceAugmentError(f"resize_batch: unsupported interpolation {interpolation!r}")
    height, width = size
    _, hmax, wmax, _ = images.shape
    sizes = sizes.to(images.device)
    pixels = images.permute(0, 3, 1, 2).to(torch.int32)  # [B, 3, Hmax, Wmax]
    index, weights = resize_taps(sizes[:, 1], wmax, width, interpolation)
    horizontal = _fixed_point_pass(_resample(pixels, index, weights.to(torch.int32), 3))
    index, weights = resize_taps(sizes[:, 0], hmax, height, interpolation)
    vertical = _fixed_point_pass(_resample(horizontal, index, weights.to(torch.int32), 2))
    return vertical.to(torch.float32)


def augment_views(resized: torch.Tensor, params: torch.Tensor, spec: AugmentSpec, *,
                  noise: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Views of resized records -> normalised, erased float32 [V*B, 3, H, W], view-major (row v*B + b is view v
    of record b, as TrainCollator orders images).

    resized: float32 [B, 3, H, W] with uint8 values (see :func:`resize_batch`); params: int64 [V*B, 8]
    (:data:`PARAM_FIELDS`). ``noise`` [V*B, 3, H, W] gives the erasing values (tests); otherwise they are drawn
    from ``generator`` (standard normal, as timm's pixel mode).
    """
    batch, _, height, width = resized.shape
    n = params.shape[0]
    if n % batch:
        raise ValueError(f"augment_views: {n} view parameter rows for {batch} records")
    device = resized.device
    params = params.to(device)
    record = torch.arange(n, device=device) % batch
    # Output pixel (i, j) of a view reads padded pixel (top + i, left + j), i.e. resized pixel (top - pad + i, ...);
    # a flip (after the crop, as the reference) reverses the columns it reads.
    rows = params[:, TOP, None] - spec.pad + torch.arange(height, device=device)  # [N, H]
    cols = params[:, LEFT, None] - spec.pad + torch.arange(width, device=device)  # [N, W]
    cols = torch.where(params[:, FLIP, None].bool(), cols.flip(1), cols)
    valid = (((rows >= 0) & (rows < height))[:, :, None] & ((cols >= 0) & (cols < width))[:, None, :])
    picked = resized[record[:, None, None], :, rows.clamp(0, height - 1)[:, :, None],
                     cols.clamp(0, width - 1)[:, None, :]]  # [N, H, W, 3]
    picked = torch.where(valid[..., None], picked, torch.zeros((), device=device)).permute(0, 3, 1, 2)
    mean = torch.tensor(spec.mean, dtype=torch.float32, device=device)[:, None, None]
    std = torch.tensor(spec.std, dtype=torch.float32, device=device)[:, None, None]
    views = picked.div(255).sub(mean).div(std)  # ToTensor, then Normalize, in the reference's float32 steps
    if spec.erase_prob > 0:
        i = torch.arange(height, device=device)[None, :, None]
        j = torch.arange(width, device=device)[None, None, :]
        top, left = params[:, ERASE_TOP, None, None], params[:, ERASE_LEFT, None, None]
        box = ((i >= top) & (i < top + params[:, ERASE_HEIGHT, None, None]) & (j >= left)
               & (j < left + params[:, ERASE_WIDTH, None, None]) & params[:, ERASE, None, None].bool())
        if noise is None:
            noise = torch.randn(views.shape, generator=generator, device=device, dtype=views.dtype)
        views = torch.where(box[:, None], noise.to(device=device, dtype=views.dtype), views)
    return views.contiguous()


# Keys the collator writes for the device path; augment_batch replaces them with "images".
DEVICE_KEYS = ("image_uint8", "image_sizes", "view_params", "augment_seed")


def augment_batch(batch: dict, input_cfg: Any) -> dict:
    """The training step's one call: a batch from the device path (``image_uint8`` present) gets ``images``
    [V*B, 3, H, W] computed where its tensors live; any other batch is returned unchanged."""
    if "image_uint8" not in batch:
        return batch
    spec = AugmentSpec.from_config(input_cfg)
    images = batch["image_uint8"]
    generator = torch.Generator(device=images.device).manual_seed(int(batch["augment_seed"]))
    resized = resize_batch(images, batch["image_sizes"], spec.size, spec.interpolation)
    out = {k: v for k, v in batch.items() if k not in DEVICE_KEYS}
    out["images"] = augment_views(resized, batch["view_params"], spec, generator=generator)
    return out
