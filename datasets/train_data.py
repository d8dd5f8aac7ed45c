"""Training and evaluation datasets whose items are pure functions of (seed, epoch, index).

Every random draw of an item (image augmentation of each view, text-level sampling, and the collator's MLM
masking through ``rng_seed``) is seeded from (seed, epoch, index), so an item does not depend on the number of
workers, on which worker loads it, or on how many batches ran before: a resumed run sees the same data.
"""
from __future__ import annotations

import random
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from datasets.text_levels import make_levels, sentence_level
from datasets.transforms import ImageTransform, load_image


def item_seed(seed: int, epoch: int, index: int) -> int:
    """A 32-bit seed mixing (seed, epoch, index); nearby triples give unrelated seeds."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


def _load(path: str, what: str) -> Any:
    try:
        return load_image(path)
    except OSError as exc:
        # Keep the exception type (FileNotFoundError stays catchable) while naming the record.
        raise type(exc)(f"{what}: {exc}") from exc


class TrainDataset(Dataset):
    """Records -> {"images": [V, 3, H, W], "texts": L strings, "caption", "pid", "index", "rng_seed"}.

    ``records`` need ``image_path``, ``caption``, ``pid`` and ``phrases`` (datasets.records.Record).
    ``texts`` follows ``levels`` (see text_levels.make_levels); ``caption`` is the sentence level, after
    ``caption_fn`` (e.g. pretraining's pre_caption) when given.
    """

    def __init__(
        self,
        records: Sequence[Any],
        transform: ImageTransform,
        num_views: int,
        levels: Sequence[str],
        seed: int,
        lowercase: bool = True,
        caption_fn: Callable[[str], str] | None = None,
    ):
        if num_views < 1:
            raise ValueError(f"input.num_views must be >= 1, got {num_views}")
        self.records = records
        self.transform = transform
        self.num_views = num_views
        self.levels = tuple(levels)
        self.seed = seed
        self.lowercase = lowercase
        self.caption_fn = caption_fn
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def _views(self, path: str, index: int, rng_seed: int) -> torch.Tensor:
        image = _load(path, f"training record {index}")
        # torchvision draws from torch's RNG, timm's RandomErasing from Python's `random`: seed both for
        # this item only and leave the process-wide states as they were.
        python_state = random.getstate()
        try:
            random.seed(rng_seed)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(rng_seed)
                return torch.stack([self.transform(image) for _ in range(self.num_views)])
        finally:
            random.setstate(python_state)

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        rng_seed = item_seed(self.seed, self.epoch, index)
        caption = record.caption if self.caption_fn is None else self.caption_fn(record.caption)
        texts = make_levels(caption, record.phrases, self.levels, random.Random(rng_seed), self.lowercase)
        return {
            "images": self._views(record.image_path, index, rng_seed),
            "texts": texts,
            "caption": sentence_level(caption, self.lowercase),
            "pid": int(record.pid),
            "index": index,
            "rng_seed": rng_seed,
        }


class EvalImageDataset(Dataset):
    """Image paths -> (image tensor [3, H, W], index)."""

    def __init__(self, paths: Sequence[str], transform: ImageTransform):
        self.paths = paths
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(_load(self.paths[index], f"evaluation image {index}")), index
