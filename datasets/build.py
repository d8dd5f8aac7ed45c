"""Wire records, transforms, sampler and collator into the training DataLoader from a Config."""
from __future__ import annotations

import functools
import logging
import os
import signal
from typing import Any, Sequence

import torch
from torch.utils.data import DataLoader
from transformers import BertTokenizerFast

from datasets.batch_augment import AugmentSpec
from datasets.collate import MlmSettings, TrainCollator
from datasets.image_cache import open_or_build_image_cache
from datasets.sampler import IdentitySampler, ShardedShuffleSampler
from datasets.text_levels import pre_caption
from datasets.shards import ShardManifest, ShardStream, StreamSettings, delivered_batches
from datasets.train_data import TrainDataset, build_item
from datasets.transforms import build_train_transform
from utils import distributed as du
from utils.config import ConfigError
from utils.task_plan import TaskPlan

logger = logging.getLogger(__name__)

TrainSampler = IdentitySampler | ShardedShuffleSampler | ShardStream


def worker_init(worker_id: int) -> None:
    """DataLoader worker set-up: one thread, and deaf to SIGTERM/SIGINT.

    ``scancel``, preemption or Ctrl-C signal the whole process group; the main process then saves and stops, and
    shuts its workers down itself. A worker killed by the signal would make the main process fail before saving.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Each worker processes one item at a time; intra-op threads would only oversubscribe the CPU cores.
    torch.set_num_threads(1)


def swap_words_of(cfg: Any) -> tuple[str, ...]:
    """``loss.itm_swap_words`` when a loss reads the swapped captions the collator then makes (ITM trains, or ITC
    with ``loss.itc_swap_negatives``), else ()."""
    words = cfg.loss.get("itm_swap_words") or ()
    if isinstance(words, str) or not all(isinstance(word, str) and word.strip() for word in words):
        raise ConfigError(f"loss.itm_swap_words must be a list of words, got {words!r}")
    used = cfg.loss.itm_weight > 0 or (cfg.loss.itc_weight > 0 and cfg.loss.get("itc_swap_negatives", False))
    return tuple(words) if used else ()


def build_train_loader(
    cfg: Any,
    records: Sequence[Any],
    tokenizer: BertTokenizerFast,
    *,
    rank: int = 0,
    world_size: int = 1,
) -> tuple[DataLoader, TrainSampler, TrainDataset]:
    """The training DataLoader, its sampler and dataset (call ``set_train_epoch`` before each epoch).

    ``task: retrieval``: ``input.num_views`` views, ``text.levels``, P x K identity batches of
    ``train.batch_size_per_gpu`` per process. ``task: pretrain``: one view, the sentence level cleaned by pre_caption,
    and plainly shuffled batches. MLM inputs are added when ``loss.mlm_weight`` > 0.
    """
    if not records:
        raise ValueError("build_train_loader: no training records")
    if TaskPlan.from_config(cfg).train_on_corpora and cfg.data.get("pretrain_shards"):
        return build_shard_loader(cfg, tokenizer, rank=rank, world_size=world_size)
    batch_size = cfg.train.batch_size_per_gpu
    # data.augment_on: device -> workers ship uint8 images and view parameters; the step augments on its device.
    device_augment = AugmentSpec.from_config(cfg.input) if cfg.data.get("augment_on", "cpu") == "device" else None
    transform = build_train_transform(cfg.input) if device_augment is None else None
    common = dict(seed=cfg.seed, lowercase=cfg.text.lowercase, max_bad_images=cfg.data.max_bad_images,
                  image_cache=training_image_cache(cfg, records, rank), device_augment=device_augment)
    if not TaskPlan.from_config(cfg).identity_batches:  # pretraining: one view, sentence level, plain shuffle
        levels: tuple[str, ...] = ("sentence",)
        dataset = TrainDataset(
            records, transform, num_views=1, levels=levels,
            caption_fn=functools.partial(pre_caption, max_words=cfg.text.pretrain_max_words), **common,
        )
        sampler: TrainSampler = ShardedShuffleSampler(len(records), batch_size, cfg.seed, rank, world_size)
    else:
        levels = tuple(cfg.text.levels)
        dataset = TrainDataset(records, transform, num_views=cfg.input.num_views, levels=levels, **common)
        sampler = IdentitySampler(
            [r.pid for r in records], batch_size, cfg.sampler.num_instances, cfg.seed, rank, world_size,
            neighbour_share=float(cfg.sampler.neighbour_share),
        )
    mlm = MlmSettings.from_config(cfg.text) if cfg.loss.mlm_weight > 0 else None
    workers = cfg.data.num_workers
    if workers > 0:
        # The Rust tokenizer's own thread pool is unsafe after fork; workers tokenize one batch each anyway.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=True,
        num_workers=workers,
        pin_memory=bool(cfg.data.pin_memory and torch.cuda.is_available()),
        persistent_workers=False,
        collate_fn=TrainCollator(tokenizer, cfg.text.max_text_len, levels, mlm, swap_words_of(cfg)),
        worker_init_fn=worker_init if workers > 0 else None,
    )
    return loader, sampler, dataset


def build_shard_loader(cfg: Any, tokenizer: BertTokenizerFast, *, rank: int = 0, world_size: int = 1
                       ) -> tuple[DataLoader, ShardStream, ShardStream]:
    """Pretraining from ``data.pretrain_shards``: a DataLoader over this rank's ShardStream (which is its own
    sampler: ``set_train_epoch`` points it at an epoch and a resume position)."""
    if cfg.data.get("image_cache"):
        raise ConfigError("data.image_cache does not apply to data.pretrain_shards (the shards hold the images): "
                          "unset one of them")
    device_augment = AugmentSpec.from_config(cfg.input) if cfg.data.get("augment_on", "cpu") == "device" else None
    transform = build_train_transform(cfg.input) if device_augment is None else None
    make_item = functools.partial(
        shard_item, seed=cfg.seed, transform=transform, lowercase=cfg.text.lowercase, device_augment=device_augment,
        caption_fn=functools.partial(pre_caption, max_words=cfg.text.pretrain_max_words))
    workers = cfg.data.num_workers
    settings = StreamSettings(
        batch_size=cfg.train.batch_size_per_gpu, seed=cfg.seed, rank=rank, world_size=world_size,
        workers=max(1, workers), shuffle_buffer=cfg.data.shards_shuffle_buffer,
        epoch_samples=cfg.data.shards_epoch_samples,
        max_bad_images=cfg.data.max_bad_images if cfg.data.max_bad_images is not None else 10)
    stream = ShardStream(ShardManifest.load(cfg.data.pretrain_shards), settings, make_item)
    if workers > 0:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    mlm = MlmSettings.from_config(cfg.text) if cfg.loss.mlm_weight > 0 else None
    loader = DataLoader(
        stream, batch_size=None, num_workers=workers,
        pin_memory=bool(cfg.data.pin_memory and torch.cuda.is_available()), persistent_workers=False,
        collate_fn=TrainCollator(tokenizer, cfg.text.max_text_len, ("sentence",), mlm, swap_words_of(cfg)),
        worker_init_fn=worker_init if workers > 0 else None,
    )
    return loader, stream, stream


def shard_item(image: Any, caption: str, index: int, epoch: int, **recipe: Any) -> dict:
    """A pretraining item from a shard sample: one view, the sentence level, pid = the sample's index."""
    return build_item(image, caption, None, index, index, epoch=epoch, num_views=1, levels=("sentence",), **recipe)


def training_image_cache(cfg: Any, records: Sequence[Any], rank: int = 0):
    """The decoded-image cache of ``data.image_cache`` for ``records`` (None when unset).

    Rank 0 opens it, building it when missing or stale (decoding with ``data.num_workers`` processes); the other
    ranks wait at a barrier and then open what rank 0 wrote (a folder on a disk every rank sees).
    """
    folder = cfg.data.get("image_cache")
    if not folder:
        return None
    paths = [r.image_path for r in records]
    if rank == 0:
        cache = open_or_build_image_cache(folder, paths, workers=cfg.data.num_workers)
    du.barrier()
    if rank != 0:
        cache = open_or_build_image_cache(folder, paths, workers=0)
    return cache


def set_train_epoch(sampler: TrainSampler, dataset: TrainDataset | ShardStream, epoch: int, start_batch: int = 0
                    ) -> None:
    """Point sampler and dataset at ``epoch``; ``start_batch`` > 0 resumes after that many batches."""
    sampler.set_epoch(epoch)
    dataset.set_epoch(epoch)
    sampler.set_start_batch(start_batch)
    if isinstance(sampler, ShardStream):
        log_shard_epoch(sampler, start_batch)


def log_shard_epoch(stream: ShardStream, start_batch: int) -> None:
    """What the epoch reads, and on a resume what each worker skips (or, when it cannot, how much is repeated)."""
    settings = stream.settings
    if settings.rank == 0:
        logger.info("%s", stream.epoch_report())
    if start_batch <= 0:
        return
    if stream.restart_epoch:
        logger.warning("rank %d resumes epoch %d at batch %d with other ranks or workers than the interrupted run: "
                       "the shard stream starts the epoch over, so %d sample(s) of this rank are seen twice",
                       settings.rank, stream.epoch, start_batch, start_batch * settings.batch_size)
    else:
        skipped = delivered_batches(stream.worker_batches(settings.rank), start_batch)
        logger.info("rank %d resumes epoch %d at batch %d: its workers skip %s batch(es) of their streams without "
                    "decoding; 0 samples are seen twice", settings.rank, stream.epoch, start_batch, skipped)
