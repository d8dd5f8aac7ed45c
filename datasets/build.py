"""Wire records, transforms, sampler and collator into the training DataLoader from a Config."""
from __future__ import annotations

import functools
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
from datasets.train_data import TrainDataset
from datasets.transforms import build_train_transform
from utils import distributed as du
from utils.task_plan import TaskPlan

TrainSampler = IdentitySampler | ShardedShuffleSampler


def worker_init(worker_id: int) -> None:
    """DataLoader worker set-up: one thread, and deaf to SIGTERM/SIGINT.

    ``scancel``, preemption or Ctrl-C signal the whole process group; the main process then saves and stops, and
    shuts its workers down itself. A worker killed by the signal would make the main process fail before saving.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Each worker processes one item at a time; intra-op threads would only oversubscribe the CPU cores.
    torch.set_num_threads(1)


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
            [r.pid for r in records], batch_size, cfg.sampler.num_instances, cfg.seed, rank, world_size
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
        collate_fn=TrainCollator(tokenizer, cfg.text.max_text_len, levels, mlm),
        worker_init_fn=worker_init if workers > 0 else None,
    )
    return loader, sampler, dataset


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


def set_train_epoch(sampler: TrainSampler, dataset: TrainDataset, epoch: int, start_batch: int = 0) -> None:
    """Point sampler and dataset at ``epoch``; ``start_batch`` > 0 resumes after that many batches."""
    sampler.set_epoch(epoch)
    dataset.set_epoch(epoch)
    sampler.set_start_batch(start_batch)
