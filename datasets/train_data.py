"""Training and evaluation datasets whose items are pure functions of (seed, epoch, index).

Every random draw of an item (image augmentation of each view, text-level sampling, and the collator's MLM
masking through ``rng_seed``) is seeded from (seed, epoch, index), so an item does not depend on the number of
workers, on which worker loads it, or on how many batches ran before: a resumed run sees the same data.

A training image that cannot be loaded (corrupt, truncated, vanished) does not stop the run: TrainDataset logs
it and substitutes the next loadable record of the same identity (cyclically after it in record order), or
failing that the next loadable record, so the batch keeps its size and, as far as possible, its P x K
structure. The substitute keeps the requested index's seed, so items stay a pure function of (seed, epoch,
index) and of which files are bad. Past ``max_bad_images`` distinct bad images it raises MissingImagesError.
"""
from __future__ import annotations

import logging
import random
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from datasets.batch_augment import AugmentSpec, as_uint8_hwc, draw_view_params
from datasets.image_cache import ImageCache
from datasets.records import MissingImagesError
from datasets.text_levels import make_levels, sentence_level
from datasets.transforms import ImageTransform, load_image

logger = logging.getLogger(__name__)

# Default limit on distinct unloadable training images: this fraction of the records, and at least the minimum.
BAD_IMAGE_FRACTION = 0.01
BAD_IMAGE_MINIMUM = 10


def default_max_bad_images(num_records: int) -> int:
    """max(10, 1% of the records): a few broken files are skipped, a broken data set stops the run."""
    return max(BAD_IMAGE_MINIMUM, int(BAD_IMAGE_FRACTION * num_records))


def item_seed(seed: int, epoch: int, index: int) -> int:
    """A 32-bit seed mixing (seed, epoch, index); nearby triples give unrelated seeds."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


def _load(path: str, what: str, cache: ImageCache | None = None) -> Any:
    try:
        return load_image(path) if cache is None else cache.image(path)
    except OSError as exc:
        # Keep the exception type (FileNotFoundError stays catchable) while naming the record.
        raise type(exc)(f"{what}: {exc}") from exc


def _reason(exc: BaseException) -> str:
    """The decoder's own words for a load failure (the path and record are logged beside it)."""
    if isinstance(exc, FileNotFoundError):
        return "file not found"
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return str(exc) or type(exc).__name__


class TrainDataset(Dataset):
    """Records -> {"images": [V, 3, H, W], "texts": L strings, "caption", "pid", "index", "rng_seed"}.

    With ``device_augment`` (an :class:`~datasets.batch_augment.AugmentSpec`, ``data.augment_on: device``) an item
    holds no "images" but "image_uint8" (the record's image once, uint8 [h, w, 3] at its original size) and
    "view_params" (int64 [V, 8], the views' crop/flip/erase parameters drawn from the item's seed); the training
    step augments the batch on its device (datasets.batch_augment). ``image_cache`` reads decoded images from a
    :class:`~datasets.image_cache.ImageCache` instead of the files.

    ``records`` need ``image_path``, ``caption``, ``pid`` and ``phrases`` (datasets.records.Record).
    ``texts`` follows ``levels`` (see text_levels.make_levels); ``caption`` is the sentence level, after
    ``caption_fn`` (e.g. pretraining's pre_caption) when given.

    An image that fails to load is replaced as the module docstring says (the whole item then comes from the
    substitute record: image, caption and pid; "index" and "rng_seed" stay those requested). ``max_bad_images``
    (None: :func:`default_max_bad_images`; 0: fail on the first) bounds the distinct bad images; beyond it
    MissingImagesError names the count and the limit. ``bad_images`` maps each bad path to its error. Both the
    count and the map are per process: with DataLoader workers each worker counts the bad images it met itself
    (so the limit applies per worker, and the main process's instance stays empty); as the training loader's
    workers are not persistent, they start from zero, and warn again, each epoch.
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
        max_bad_images: int | None = None,
        image_cache: ImageCache | None = None,
        device_augment: AugmentSpec | None = None,
    ):
        if num_views < 1:
            raise ValueError(f"input.num_views must be >= 1, got {num_views}")
        if max_bad_images is not None and max_bad_images < 0:
            raise ValueError(f"max_bad_images must be >= 0 or None, got {max_bad_images}")
        self.records = records
        self.transform = transform
        self.num_views = num_views
        self.levels = tuple(levels)
        self.seed = seed
        self.lowercase = lowercase
        self.caption_fn = caption_fn
        self.image_cache = image_cache
        self.device_augment = device_augment
        self.epoch = 0
        self.max_bad_images = default_max_bad_images(len(records)) if max_bad_images is None else max_bad_images
        self.bad_images: dict[str, str] = {}  # path -> error, in the order met (this process only)
        self._pid_indices: dict[Any, list[int]] | None = None  # built on the first bad image

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def _candidates(self, index: int) -> Iterator[int]:
        """Substitutes for record ``index`` in the order tried: same pid cyclically after it, then all records."""
        if self._pid_indices is None:
            self._pid_indices = {}
            for i, record in enumerate(self.records):
                self._pid_indices.setdefault(record.pid, []).append(i)
        same = self._pid_indices[self.records[index].pid]
        at = same.index(index)
        yield from same[at + 1:]
        yield from same[:at]
        n = len(self.records)
        for step in range(1, n):
            yield (index + step) % n

    def _mark_bad(self, index: int, exc: OSError) -> None:
        path = self.records[index].image_path
        self.bad_images[path] = _reason(exc)
        if len(self.bad_images) > self.max_bad_images:
            raise MissingImagesError(
                f"{len(self.bad_images)} training images could not be loaded in this process, more than the limit "
                f"of {self.max_bad_images} (max_bad_images; default max({BAD_IMAGE_MINIMUM}, "
                f"{BAD_IMAGE_FRACTION:.0%} of {len(self.records)} records)); last: {exc}. List them all with: "
                f"python -m datasets.check --format FORMAT --root ROOT"
            ) from exc

    def _load_record(self, index: int) -> tuple[Any, Any]:
        """(record, decoded image) for ``index``, or for its substitute when its image cannot be loaded."""
        record = self.records[index]
        newly_bad = record.image_path not in self.bad_images
        if newly_bad:
            try:
                return record, _load(record.image_path, f"training record {index}", self.image_cache)
            except OSError as exc:
                first_error = exc
                self._mark_bad(index, exc)
        else:  # known bad in this process: trying again would fail the same way
            first_error = OSError(f"training record {index}: {self.bad_images[record.image_path]}")
        tried = {record.image_path}
        for candidate in self._candidates(index):
            substitute = self.records[candidate]
            if substitute.image_path in self.bad_images or substitute.image_path in tried:
                continue
            tried.add(substitute.image_path)
            try:
                image = _load(substitute.image_path, f"training record {candidate}", self.image_cache)
            except OSError as exc:
                self._mark_bad(candidate, exc)
                continue
            # a warning the first time this process meets the image, then quietly each epoch
            logger.log(logging.WARNING if newly_bad else logging.DEBUG,
                       "training record %d: skipped unloadable image %s (%s); using record %d (%s) instead; "
                       "%d bad image(s) so far in this process, limit %d", index, record.image_path,
                       self.bad_images[record.image_path], candidate,
                       "same identity" if substitute.pid == record.pid else "another identity",
                       len(self.bad_images), self.max_bad_images)
            return substitute, image
        raise first_error  # no record has a loadable image

    def __getitem__(self, index: int) -> dict:
        record, image = self._load_record(index)
        return build_item(image, record.caption, record.phrases, record.pid, index, epoch=self.epoch, seed=self.seed,
                          transform=self.transform, num_views=self.num_views, levels=self.levels,
                          lowercase=self.lowercase, caption_fn=self.caption_fn, device_augment=self.device_augment)


def augmented_views(transform: ImageTransform, image: Any, num_views: int, rng_seed: int) -> torch.Tensor:
    """[num_views, 3, H, W]: ``image`` through ``transform`` num_views times, seeded by ``rng_seed`` alone."""
    # torchvision draws from torch's RNG, timm's RandomErasing from Python's `random`: seed both for
    # this item only and leave the process-wide states as they were.
    python_state = random.getstate()
    try:
        random.seed(rng_seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(rng_seed)
            return torch.stack([transform(image) for _ in range(num_views)])
    finally:
        random.setstate(python_state)


def build_item(image: Any, caption: str, phrases: Sequence[str] | None, pid: int, index: int, *, epoch: int,
               seed: int, transform: ImageTransform | None, num_views: int, levels: Sequence[str],
               lowercase: bool = True, caption_fn: Callable[[str], str] | None = None,
               device_augment: AugmentSpec | None = None) -> dict:
    """One training item (see TrainDataset) from a decoded image and its caption: a pure function of
    (seed, epoch, index) and its inputs, whether the image came from a file or from a shard."""
    rng_seed = item_seed(seed, epoch, index)
    caption = caption if caption_fn is None else caption_fn(caption)
    texts = make_levels(caption, phrases, levels, random.Random(rng_seed), lowercase)
    if device_augment is not None:
        views = {"image_uint8": as_uint8_hwc(image),
                 "view_params": draw_view_params(device_augment, random.Random(f"views:{rng_seed}"), num_views)}
    else:
        views = {"images": augmented_views(transform, image, num_views, rng_seed)}
    return {
        **views,
        "texts": texts,
        "caption": sentence_level(caption, lowercase),
        "pid": int(pid),
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
        try:
            image = _load(self.paths[index], f"evaluation image {index}")
        except OSError as exc:
            # Unlike training, an evaluation cannot substitute another image: its numbers would change unnoticed.
            raise MissingImagesError(f"{exc}; an evaluation uses every image of its split: replace or remove that "
                                     "file (list every bad one with: python -m datasets.check --format FORMAT "
                                     "--root ROOT --full-decode)") from exc
        return self.transform(image), index
