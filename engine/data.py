"""A run's data: the training records, the evaluation splits and the tokenizer, as the task plan says.

Which records train and which dataset evaluates is ``utils.task_plan.TaskPlan``'s answer for the config's task.
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
from datasets.synthetic.identities import check_num_ids
from datasets.tokenizer import (build_tokenizer, caption_word_list, save_tokenizer, tokenizer_from_vocab,
                                tokenizer_vocab, vocabulary_coverage)
from engine.checkpoints import init_tokenizer, tokenizer_from_record
from utils import distributed as du
from utils.config import Config, ConfigError
from utils.task_plan import TaskPlan

logger = logging.getLogger(__name__)


def synthesize_if_missing(cfg: Config, plan: TaskPlan | None = None) -> None:
    """Write the synthetic dataset into data.root when it is absent (rank 0 decides and writes; all wait); for
    pretraining also the zero-shot evaluation set into data.eval_root (``data.eval_synthetic_*``).

    Each is written next to its root and renamed into place, so an interrupted synthesis never leaves a
    half-written dataset that a later run would take for a real one.
    """
    plan = plan or TaskPlan.from_config(cfg)
    check_data_roots(cfg, plan)
    if not cfg.data.synthesize_if_missing:
        return
    keys = ("data.synthetic_num_ids", "data.eval_synthetic_num_ids")
    for (root, fmt, _, num_ids), key in zip(plan.synthetic_sets, keys):
        if not (Path(root).is_dir() and any(Path(root).iterdir())):
            check_synthetic_size(fmt, num_ids, key)
    if du.is_main_process():
        for root, fmt, style, num_ids in plan.synthetic_sets:
            write_synthetic_once(Path(root), fmt, style, num_ids, cfg.data.synthetic_seed)
    du.barrier()


def check_data_roots(cfg: Config, plan: TaskPlan) -> None:
    """data.root and data.eval_root, where they are read, are folders (or absent, to be written): a file there is
    named before anything is written next to it."""
    data = cfg.data
    keys = [] if plan.train_on_corpora and data.pretrain_corpora else ["root"]
    keys += ["eval_root"] if plan.train_on_corpora and data.eval_root else []
    for key in keys:
        path = Path(data[key])
        if path.exists() and not path.is_dir():
            raise ConfigError(f"data.{key} {path} is a file, not a folder: set data.{key}=FOLDER to the dataset "
                              "folder (or to a folder that does not exist yet, to write the synthetic set there)")


def check_synthetic_size(fmt: str, num_ids: int, key: str) -> None:
    """ConfigError naming ``key`` when the synthetic writer cannot draw ``num_ids`` identities in format ``fmt``."""
    try:
        check_num_ids(fmt, num_ids)
    except ValueError as exc:
        raise ConfigError(f"{key} {num_ids}: {exc} (each split of the synthetic {fmt} set needs one identity, and "
                          "training needs enough identities for one batch)") from None


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


def load_eval_splits(cfg: Config, plan: TaskPlan | None = None) -> DatasetSplits | None:
    """The retrieval dataset that evaluates this task (None for pretraining without ``data.eval_root``)."""
    plan = plan or TaskPlan.from_config(cfg)
    if plan.eval_root is None:
        return None
    root_key = "data.eval_root" if plan.train_on_corpora else "data.root"
    return load_annotations(plan.eval_format, plan.eval_root, plan.eval_annotation_file, root_key=root_key)


def load_data(cfg: Config, plan: TaskPlan | None = None) -> tuple[list[Record], DatasetSplits | None]:
    """(train records, eval splits or None), with every image checked on rank 0 before anything trains."""
    plan = plan or TaskPlan.from_config(cfg)
    set_max_image_pixels(cfg.data.max_image_pixels)
    synthesize_if_missing(cfg, plan)
    eval_splits = load_eval_splits(cfg, plan)
    train = pretrain_train_records(cfg) if plan.train_on_corpora else eval_splits.train
    if not train:
        where = "data.pretrain_corpora" if plan.train_on_corpora else eval_splits.annotation_file
        raise SplitError(f"the train split of {where} is empty: nothing to train on (check the annotation file's "
                         "split field, or data.annotation_file)")
    mode = cfg.data.check_images
    if mode != "none" and du.is_main_process():
        if not (plan.train_on_corpora and cfg.data.pretrain_shards):  # shard images: sizes checked above
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


def run_caption_words(cfg: Config, train_records, prior: dict | None) -> list[str] | None:
    """The sorted lower-cased words of this run's training captions, joined with those ``prior`` (the checkpoint
    resumed or initialised from) records, so a fine-tuned model also knows its pretraining's words. Computed on
    rank 0 only (the rank that saves); None elsewhere. Each run's share is capped by text.caption_words_max."""
    if not du.is_main_process():
        return None
    own = caption_word_list((r.caption for r in train_records), int(cfg.text.caption_words_min_count),
                            int(cfg.text.caption_words_max))
    earlier = (prior.get("caption_words") if isinstance(prior, dict) else None) or []  # authors' files: none
    words = sorted(set(own).union(earlier))
    logger.info("caption vocabulary: %d words (%d from this run's captions, %d carried from the checkpoint)",
                len(words), len(own), len(earlier))
    return words


def save_run_tokenizer(cfg: Config, tokenizer, output_dir: Path) -> None:
    """A learnt vocabulary goes into the run directory too (it is also kept in every checkpoint)."""
    if cfg.text.tokenizer == "train" and du.is_main_process():
        save_tokenizer(tokenizer, output_dir / "tokenizer")
