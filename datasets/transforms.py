"""Image loading and the train/test pipelines of the authors (docs/recipe.md), sized by ``cfg.input``."""
from __future__ import annotations

from os import PathLike
from typing import Any, Callable

import torch
from PIL import Image
from timm.data.random_erasing import RandomErasing
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from datasets.pixels import ImageTooLargeError, open_image

ImageTransform = Callable[[Image.Image], torch.Tensor]


def load_image(path: str | PathLike[str]) -> Image.Image:
    """The image at ``path`` decoded to RGB; FileNotFoundError / OSError naming the path otherwise (an
    ImageTooLargeError above the pixel limit of datasets.pixels, before decoding)."""
    try:
        with open_image(path) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise FileNotFoundError(f"image not found: {path}") from None
    except ImageTooLargeError:
        raise
    except (OSError, ValueError, SyntaxError) as exc:  # PIL raises all three for broken files
        raise OSError(f"cannot decode image {path}: {exc}") from exc


def _interpolation(name: str) -> InterpolationMode:
    try:
        return InterpolationMode(name.lower())
    except ValueError:
        valid = ", ".join(mode.value for mode in InterpolationMode)
        raise ValueError(f"input.interpolation: unknown filter {name!r}; expected one of {valid}") from None


def _size(input_cfg: Any) -> tuple[int, int]:
    size = tuple(input_cfg.image_size)
    if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
        raise ValueError(f"input.image_size: expected [height, width] of positive ints, got {list(size)}")
    return size  # type: ignore[return-value]


def build_train_transform(input_cfg: Any) -> ImageTransform:
    """PIL RGB image -> augmented tensor [3, H, W]: resize, pad, random crop, flip, normalise, random erasing.

    The erasing step draws from Python's ``random`` and torch's RNG; TrainDataset seeds both per item.
    """
    size = _size(input_cfg)
    steps: list[Callable] = [T.Resize(size, interpolation=_interpolation(input_cfg.interpolation))]
    if input_cfg.pad_pixels > 0:
        steps.append(T.Pad(input_cfg.pad_pixels, fill=0))
    steps += [
        T.RandomCrop(size),
        T.RandomHorizontalFlip(p=input_cfg.hflip_prob),
        T.ToTensor(),
        T.Normalize(mean=list(input_cfg.pixel_mean), std=list(input_cfg.pixel_std)),
    ]
    if input_cfg.random_erasing_prob > 0:
        steps.append(
            RandomErasing(probability=input_cfg.random_erasing_prob, mode="pixel", max_count=1, device="cpu")
        )
    return T.Compose(steps)


def build_test_transform(input_cfg: Any) -> ImageTransform:
    """PIL RGB image -> tensor [3, H, W]: bilinear resize (as the authors' test loader), normalise."""
    return T.Compose(
        [
            T.Resize(_size(input_cfg), interpolation=InterpolationMode.BILINEAR),
            T.ToTensor(),
            T.Normalize(mean=list(input_cfg.pixel_mean), std=list(input_cfg.pixel_std)),
        ]
    )
