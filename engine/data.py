"""A run's data: the training records, the evaluation splits and the tokenizer, for either task.

``task: retrieval`` trains and evaluates on one person-retrieval dataset (``data.format`` in ``data.root``).
``task: pretrain`` trains on image-caption corpora (``data.pretrain_corpora``) and evaluates zero-shot on the
retrieval dataset ``data.eval_format`` in ``data.eval_root``, when one is given.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

from datasets.readers import DatasetSplits, check_images, load_annotations, load_pretrain_corpora
from datasets.shards import ShardManifest
from datasets.pixels import set_max_image_pixels
from datasets.records import Record, SplitError
from datasets.synthetic import make_synthetic
from datasets.tokenizer import (build_tokenizer, save_tokenizer, tokenizer_from_vocab, tokenizer_vocab,
                                vocabulary_coverage)
from engine.checkpoints import init_tokenizer, tokenizer_from_record
from utils import distributed as du
from utils.config import Config, ConfigError

logger = logging.getLogger(__name__)


def synthesize_if_missing(cfg: Config) -> None:
    """Write the synthetic dataset into data.root when it is absent (rank 0 decides and writes; all wait); for
    pretraining also the zero-shot evaluation set into data.eval_root (``data.eval_synthetic_*``).

    Each is written next to its root and renamed into place, so an interrupted synthesis never leaves a
    half-written dataset that a later run would take for a real one.
    """
    if not cfg.data.synthesize_if_missing:
        return
    data = cfg.data
    if cfg.task == "pretrain":
        wanted = [(data.root, "pretrain", data.synthetic_style, data.synthetic_num_ids)]
        if data.eval_root:
            wanted.append((data.eval_root, data.eval_format, data.eval_synthetic_style, data.eval_synthetic_num_ids))
    else:
        wanted = [(data.root, data.format, data.synthetic_style, data.synthetic_num_ids)]
    if du.is_main_process():
        for root, fmt, style, num_ids in wanted:
            write_synthetic_once(Path(root), fmt, style, num_ids, data.synthetic_seed)
    du.barrier()


def write_synthetic_once(root: Path, fmt: str, style: str, num_ids: int, seed: int) -> None:
    if root.is_dir() and any(root.iterdir()):
        return
    logger.info("%s is missing: writing the synthetic %s dataset (%s style, %d identities) there", root, fmt,
                style, num_ids)
    partial = root.with_name(root.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    make_synthetic(fmt, partial, num_ids=num_ids, seed=seed, style=style)
    if root.is_dir():
        root.rmdir()  # empty, checked above
    partial.rename(root)


def pretrain_corpora(cfg: Config) -> list[dict]:
    """``data.pretrain_corpora``, or the synthetic corpus in data.root (``python -m datasets.synthetic``)."""
    corpora = [dict(c) for c in cfg.data.pretrain_corpora]
    if not corpora:
        corpora = [{"annotation": str(Path(cfg.data.root) / "pretrain.json"), "image_root": cfg.data.root}]
    return corpora


def pretrain_train_records(cfg: Config):
    """The pretraining records: from the corpora, or with ``data.pretrain_shards`` the captions the shard writer
    listed beside its shards (records.json; the images stay in the tars and are checked against the manifest)."""
    if not cfg.data.pretrain_shards:
        return load_pretrain_corpora(pretrain_corpora(cfg))
    if cfg.data.pretrain_corpora:
        raise ConfigError("data.pretrain_corpora and data.pretrain_shards are both set: the shards already hold "
                          "their corpus; unset one of them")
    manifest = ShardManifest.load(cfg.data.pretrain_shards)
    if du.is_main_process():
        manifest.verify_files()
    return load_pretrain_corpora([{"annotation": str(manifest.folder / "records.json"),
                                   "image_root": str(manifest.folder)}])


def load_eval_splits(cfg: Config) -> DatasetSplits | None:
    """The retrieval dataset that evaluates this task (None for pretraining without ``data.eval_root``)."""
    if cfg.task == "pretrain":
        return load_annotations(cfg.data.eval_format, cfg.data.eval_root) if cfg.data.eval_root else None
    return load_annotations(cfg.data.format, cfg.data.root, cfg.data.annotation_file)


def load_data(cfg: Config) -> tuple[list[Record], DatasetSplits | None]:
    """(train records, eval splits or None), with every image checked on rank 0 before anything trains."""
    set_max_image_pixels(cfg.data.max_image_pixels)
    synthesize_if_missing(cfg)
    eval_splits = load_eval_splits(cfg)
    if cfg.task == "pretrain":
        train = pretrain_train_records(cfg)
    else:
        train = eval_splits.train
    if not train:
        where = eval_splits.annotation_file if cfg.task != "pretrain" else "data.pretrain_corpora"
        raise SplitError(f"the train split of {where} is empty: nothing to train on (check the annotation file's "
                         "split field, or data.annotation_file)")
    mode = cfg.data.check_images
    if mode != "none" and du.is_main_process():
        if not (cfg.task == "pretrain" and cfg.data.pretrain_shards):  # shard images: sizes checked above
            check_images(train, decode=mode)
        if eval_splits is not None:
            # Training skips a bad image; an evaluation cannot (its numbers would change), and a JPEG with corrupt
            # scan data passes the header check: the evaluated splits, a few thousand images, are decoded fully.
            check_images(eval_splits.val + eval_splits.test, decode="full" if mode == "header" else mode)
    du.barrier()
    return train, eval_splits


def build_run_tokenizer(cfg: Config, train_records, resume_obj: dict | None, init: tuple[str, dict] | None = None):
    """The tokenizer: from the checkpoint being resumed, from the one initialised from (``init``: its path and
    contents; see engine.checkpoints.init_tokenizer), learnt on rank 0 and shared, or loaded by name."""
    if resume_obj is not None:
        return tokenizer_from_record(resume_obj.get("tokenizer"), cfg.text)
    if init is not None:
        tokenizer = init_tokenizer(init[1], init[0], cfg.text)
        if tokenizer is not None:
            logger.info("vocabulary of --init-from %s (%d tokens): %s", init[0], len(tokenizer),
                        vocabulary_coverage(tokenizer, [r.caption for r in train_records]))
            return tokenizer
    if cfg.text.tokenizer == "train":
        vocab = None
        if du.is_main_process():
            vocab = tokenizer_vocab(build_tokenizer(cfg.text, train_captions=[r.caption for r in train_records]))
        vocab = du.broadcast_object(vocab)
        return tokenizer_from_vocab(vocab, cfg.text.lowercase)
    return build_tokenizer(cfg.text)


def save_run_tokenizer(cfg: Config, tokenizer, output_dir: Path) -> None:
    """A learnt vocabulary goes into the run directory too (it is also kept in every checkpoint)."""
    if cfg.text.tokenizer == "train" and du.is_main_process():
        save_tokenizer(tokenizer, output_dir / "tokenizer")
