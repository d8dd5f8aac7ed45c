"""What a run saves and loads: our self-describing checkpoints, the authors' ones, and weight initialisation.

This module says what our checkpoint holds: ``checkpoint_dict`` is the one constructor of its dict, used by every
writer (training, the authors' conversion, the model-folder reader, the bench and the tests). A checkpoint holds
the model state dict, the resolved config as a plain dict and the tokenizer (its vocabulary when it was learnt
from the data), plus the optimizer, scheduler, scaler, epoch, global step, best metric and every rank's RNG
states for exact resume. The authors' checkpoints are recognised and converted on the fly.
"""
from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist

from datasets.tokenizer import build_tokenizer, tokenizer_from_vocab, tokenizer_vocab
from engine.model_folder import TRAINING_FIELDS, read_model_folder
from models.official import OFFICIAL_IMAGE_SIZE, convert_official, is_official_checkpoint, load_official_into
from models.ivt import build_model
from models.weights import WeightsError, adapt_grid_embeddings, load_bert_weights, load_vit_weights
from utils import distributed as du
from utils.checkpoint import (FORMAT_NAME, FORMAT_VERSION, CheckpointError, atomic_save, atomic_write,
                              UnsafePickleError, capture_rng_state, describe_keys, load_file)
from utils.config import Config, config_from_dict, load_config
from utils.environment import environment_record
from utils.errors import UserError

logger = logging.getLogger(__name__)


class NonFiniteWeightsError(UserError, RuntimeError):
    """The model's weights went NaN or infinite."""


@dataclass
class TrainState:
    """Where training stands; saved in every checkpoint and restored on resume."""

    epoch: int = 0  # the epoch to run next (or the one interrupted)
    step_in_epoch: int = 0  # optimizer steps already done inside ``epoch``
    global_step: int = 0
    best_metric: float = float("-inf")
    best_epoch: int = -1
    # the "no good match" threshold and blend weight of the latest evaluation on the selection split
    # (engine.evaluation.calibration_record): each checkpoint carries those of the evaluation before it was saved
    calibration: dict | None = None

    @classmethod
    def from_checkpoint(cls, obj: dict) -> "TrainState":
        return cls(obj["epoch"], obj["step_in_epoch"], obj["step"], obj["best_metric"], obj["best_epoch"],
                   obj.get("calibration"))


def detect_format(obj: Any) -> str:
    """'ours', 'official' (the authors' fine-tune or pretrain checkpoints) or 'unknown'."""
    if isinstance(obj, dict) and obj.get("format") == FORMAT_NAME:
        return "ours"
    return "official" if is_official_checkpoint(obj) else "unknown"


# ------------------------------------------------------------------------------------------ tokenizer
def tokenizer_record(tokenizer, text_cfg: Config) -> dict:
    """What a checkpoint stores to rebuild the tokenizer: the vocabulary itself when it was learnt here."""
    if text_cfg.tokenizer == "train":
        return {"vocab": tokenizer_vocab(tokenizer), "lowercase": bool(text_cfg.lowercase)}
    return {"name": text_cfg.tokenizer}


def tokenizer_from_record(record: dict | None, text_cfg: Config):
    if record and "vocab" in record:
        return tokenizer_from_vocab(list(record["vocab"]), bool(record.get("lowercase", True)))
    if text_cfg.tokenizer == "train":
        raise CheckpointError("the config says text.tokenizer=train but the checkpoint holds no vocabulary")
    return build_tokenizer(text_cfg)


def init_tokenizer(obj: Any, source: str, text_cfg: Config):
    """The tokenizer a run initialised from ``obj`` (read from ``source``) must use, or None to build it as usual.

    The checkpoint's word embeddings belong to the vocabulary it was trained with. With ``text.tokenizer: train``
    that vocabulary is taken from the checkpoint instead of learning a new one from this run's captions (which
    would give the pretrained rows to other words); words it lacks are cut into the longest pieces it holds, as
    WordPiece does for any unknown word. A named tokenizer with a checkpoint that learnt its own vocabulary, or
    ``train`` with one that did not, is refused.
    """
    record = obj.get("tokenizer") if detect_format(obj) == "ours" else None
    learnt = bool(record) and "vocab" in record
    if text_cfg.tokenizer == "train":
        if learnt:
            return tokenizer_from_vocab(list(record["vocab"]), bool(record.get("lowercase", True)))
        name = (record or {}).get("name", "bert-base-uncased")
        raise CheckpointError(
            f"--init-from {source}: text.tokenizer=train would learn a new vocabulary, but the checkpoint's word "
            f"embeddings belong to the tokenizer {name!r}; set text.tokenizer={name} (a hub id or a local folder)")
    if learnt:
        raise CheckpointError(
            f"--init-from {source}: the checkpoint learnt its own vocabulary ({len(record['vocab'])} tokens), so "
            f"text.tokenizer={text_cfg.tokenizer} would map its word embeddings to other words; set "
            "text.tokenizer=train to take the checkpoint's vocabulary")
    if record and record.get("name") not in (None, text_cfg.tokenizer):
        logger.warning("--init-from %s was trained with the tokenizer %r, this run loads %r: make sure they share "
                       "one vocabulary", source, record["name"], text_cfg.tokenizer)
    return None


# --------------------------------------------------------------------------------------------- format
def checkpoint_dict(model_state: dict, config: dict, tokenizer: dict | None = None, **fields: Any) -> dict:
    """The one constructor of our checkpoint dict: format tag and version, the model state dict, the config.

    ``config`` is a plain (possibly partial) config dict; ``tokenizer`` a ``tokenizer_record`` (None: the one the
    config names). ``fields`` are the optional entries: a training checkpoint's optimizer, scheduler, scaler,
    epoch, step_in_epoch, step, best_metric, best_epoch, rng, world_size and environment; a conversion's
    converted_from; a model folder's model_folder; ``caption_words``, the sorted lower-cased words of the training
    captions (engine.data.run_caption_words), by which searches flag words the model never read (absent in older
    checkpoints).
    """
    return {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "model": model_state, "config": config,
            "tokenizer": tokenizer, **fields}


# ------------------------------------------------------------------------------------------- training
def checkpoint_state(model, optimizer, scheduler, scaler, state: TrainState, cfg: Config, tokenizer,
                     caption_words: Sequence[str] | None = None) -> dict:
    """The checkpoint dict; a collective when distributed (every rank's RNG state is gathered)."""
    rng = capture_rng_state()
    if du.is_distributed():
        gathered = [None] * du.get_world_size()
        dist.all_gather_object(gathered, rng)
        rng = gathered
    else:
        rng = [rng]
    return checkpoint_dict(
        model.state_dict(), cfg.to_dict(), tokenizer_record(tokenizer, cfg.text),
        optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
        scaler=scaler.state_dict() if scaler is not None else None,
        epoch=state.epoch, step_in_epoch=state.step_in_epoch, step=state.global_step,
        best_metric=state.best_metric, best_epoch=state.best_epoch, calibration=state.calibration, rng=rng,
        world_size=du.get_world_size(), environment=environment_record(),
        **({"caption_words": list(caption_words)} if caption_words is not None else {}))


def save_checkpoint(obj: dict, path: Path) -> None:
    """Collective: rank 0 writes, then all wait."""
    if du.is_main_process():
        atomic_save(obj, path)
    du.barrier()


def check_finite_weights(model: torch.nn.Module) -> None:
    """NonFiniteWeightsError when a parameter holds NaN or inf: such a model is never saved over a good one."""
    names, params = zip(*model.named_parameters())
    finite = torch.stack([torch.isfinite(p).all() for p in params]).tolist()  # one host sync, not one per tensor
    bad = [name for name, ok in zip(names, finite) if not ok]
    if bad:
        raise NonFiniteWeightsError(f"{len(bad)} parameter tensors are not finite (first: {bad[0]}); not saving, "
                                    "so last.pth keeps the last good state")


def resolve_resume(resume: str | None, output_dir: Path) -> Path | None:
    """The checkpoint to resume from: a path, ``auto`` = <output_dir>/last.pth when it exists, or None."""
    if resume is None:
        return None
    if resume == "auto":
        path = output_dir / "last.pth"
        if not path.is_file():
            logger.info("--resume auto: no %s yet, starting a new run", path)
            return None
        return path
    return Path(resume)


def selection_record(path: Path) -> dict | None:
    """``best_epoch`` and ``best_metric`` stored in a checkpoint, its tensors mapped, not loaded (None if absent)."""
    if not path.is_file():
        return None
    obj = load_file(path, mmap=True)
    return {"best_epoch": obj["best_epoch"], "best_metric": obj["best_metric"]}


def carry_best_over(state: TrainState, resume_path: Path, output_dir: Path) -> TrainState:
    """Make ``best.pth`` in ``output_dir`` and the resumed selection state agree; returns the state to go on with.

    Resuming into another folder copies the source run's best.pth there. best.pth is written before last.pth, so a
    crash between the two leaves a best.pth newer than last.pth's record: its selection is then adopted. A
    selection whose best.pth is gone is forgotten, so the next evaluation writes a new one.
    """
    source, target = resume_path.parent / "best.pth", output_dir / "best.pth"
    if du.is_main_process() and source.is_file() and source.resolve() != target.resolve():
        with source.open("rb") as handle:
            atomic_write(target, lambda out: shutil.copyfileobj(handle, out), expected_bytes=source.stat().st_size)
        logger.info("copied %s to %s: the resumed run keeps its best model", source, target)
    du.barrier()
    record = du.broadcast_object(selection_record(target) if du.is_main_process() else None)
    if record is None:
        if state.best_epoch >= 0:
            logger.warning("%s is missing: the selection (epoch %d) is forgotten and the next evaluation picks anew",
                           target, state.best_epoch)
        return TrainState(state.epoch, state.step_in_epoch, state.global_step)
    if record["best_epoch"] > state.best_epoch:
        logger.info("%s holds epoch %d, saved after the resumed last.pth: taking its selection", target,
                    record["best_epoch"])
        return TrainState(state.epoch, state.step_in_epoch, state.global_step, record["best_metric"],
                          record["best_epoch"])
    return state


def read_resume(path: Path | None, obj: dict | None) -> dict | None:
    """The checkpoint to resume from, read once (``obj`` when the caller already holds it), checked to be ours."""
    if path is not None and obj is None:
        obj = load_file(path)
    if obj is not None and detect_format(obj) != "ours":
        raise CheckpointError(f"--resume {path}: not one of our checkpoints (found {describe_keys(obj)})")
    return obj


# ------------------------------------------------------------------------------------ initialisation
def initialise_weights(model, cfg: Config, init_from: str | None, init_obj: Any = None) -> None:
    """Explicit pretrained-weight loading: ViT and BERT first, then an IVT checkpoint on top.

    ``init_obj`` is the checkpoint of ``init_from`` when the caller has read it already (for its tokenizer).
    """
    if cfg.model.vit_weights:
        load_vit_weights(model, cfg.model.vit_weights)
    if cfg.model.bert_weights:
        load_bert_weights(model, cfg.model.bert_weights)
    source = init_from or cfg.model.init_from
    if source:
        # A temperature learnt on raw features (the authors' pretraining) is meaningless for normalised ITC.
        init_from_checkpoint(model, source, skip=("temperature",) if cfg.loss.itc_normalize else (), obj=init_obj)


def init_from_checkpoint(model, path: str, skip: Sequence[str] = (), obj: Any = None) -> None:
    """Copy matching tensors of our or the authors' checkpoint (e.g. IVT pretraining) into ``model``.

    Grid embeddings are resampled when the patch grid differs; tensors the model lacks (a pretraining fusion stack
    when the recipe has none) and model tensors the checkpoint lacks are both listed in the log. ``obj``: the
    file's contents when already read.
    """
    if obj is None:
        obj = read_checkpoint_or_folder(path)
    kind = detect_format(obj)
    if kind == "ours":
        state = obj["model"]
    elif kind == "official":
        state, _ = convert_official(obj)
    else:
        raise CheckpointError(f"--init-from {path}: neither our checkpoint nor an authors' IVT checkpoint")
    state = adapt_grid_embeddings({k: v for k, v in state.items() if k not in skip}, model, prefix="encoder.")
    if skip:
        logger.info("--init-from: not taking %s from the checkpoint (kept at their configured init)", list(skip))
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if mismatched:
        raise CheckpointError(f"--init-from {path}: shapes differ for {mismatched[:5]} (e.g. {mismatched[0]}: "
                              f"{tuple(state[mismatched[0]].shape)} vs {tuple(own[mismatched[0]].shape)})")
    model.load_state_dict(usable, strict=False)
    unused = sorted(set(state) - set(usable))
    fresh = sorted(set(own) - set(usable))
    logger.info("initialised %d tensors from %s (%s format); %d checkpoint tensors unused%s; %d model tensors "
                "not in the checkpoint%s", len(usable), path, kind, len(unused), f" {unused[:6]}" if unused else "",
                len(fresh), f" {fresh[:6]}" if fresh else "")


# ------------------------------------------------------------------------------------------ inference
def load_model_state(model: torch.nn.Module, state_dict: dict, path: Path | str) -> None:
    """``model.load_state_dict`` with a CheckpointError naming the first tensor that does not fit."""
    own = model.state_dict()
    for key, value in state_dict.items():
        if key in own and own[key].shape != value.shape:
            raise CheckpointError(
                f"{path}: tensor {key!r} has shape {tuple(value.shape)} in the checkpoint but "
                f"{tuple(own[key].shape)} in the model built from the config; the config does not match it"
            )
    result = model.load_state_dict(state_dict, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"{path}: checkpoint and config disagree: missing in checkpoint {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )


def load_for_inference(path: str | Path, config_path: str | Path | None = None, overrides: tuple | list = (),
                       device: str | torch.device = "cpu"):
    """Rebuild model, config and tokenizer from any supported checkpoint. Returns (model, cfg, tokenizer, info).

    ``info``: the format ('ours' or 'official'), the checkpoint path and the training state (epoch, step, ...;
    for ours also best_metric, best_epoch, world_size, the training environment and whether the vocabulary was
    learnt).

    Ours: the config stored in the checkpoint, with ``--config``'s task, data and eval settings (a different
    dataset or batch size) and then ``overrides`` on top. The authors': the recipe ``config_path`` (default: base)
    with the architecture inferred from the tensors.
    """
    path = Path(path)
    obj = read_checkpoint_or_folder(path)
    kind = detect_format(obj)
    if kind == "ours":
        cfg = config_from_dict(obj["config"], source=str(path))
        if config_path is not None:
            recipe = load_config(config_path)
            cfg = cfg.replace(task=recipe.task, data=recipe.data.to_dict(), eval=recipe.eval.to_dict())
        cfg = cfg.replace(overrides)
        model = build_model(cfg)
        load_model_state(model, obj["model"], path)
        tokenizer = tokenizer_from_record(obj.get("tokenizer"), cfg.text)
        record = obj.get("tokenizer")
        info = {"format": "ours", **{k: obj.get(k) for k in TRAINING_FIELDS}, "environment": obj.get("environment"),
                "learnt_vocabulary": bool(record) and "vocab" in record,
                "calibration": obj.get("calibration"), "caption_words": obj.get("caption_words")}
    elif kind == "official":
        _, model_overrides = convert_official(obj)
        cfg = load_config(config_path).replace(model=model_overrides)
        cfg = cfg.replace(overrides)
        model = build_model(cfg)
        load_official_into(model, obj)
        tokenizer = tokenizer_from_record(None, cfg.text)
        info = {"format": "official", "epoch": obj.get("epoch") if isinstance(obj, dict) else None}
    else:
        raise CheckpointError(
            f"{path}: neither one of our checkpoints (no format={FORMAT_NAME!r}) nor an authors' IVT checkpoint "
            f"(no encoder_vl.* tensors); found {describe_keys(obj)}"
        )
    info["checkpoint"] = str(path)
    model.to(device).eval()
    return model, cfg, tokenizer, info


# -------------------------------------------------------------------------------------- model folders
def folder_as_checkpoint(path: str | Path) -> dict:
    """A model folder (python -m engine.export) as the dict one of our checkpoints holds, its files verified."""
    folder = read_model_folder(path)
    return checkpoint_dict(folder.state, folder.config, folder.tokenizer, epoch=folder.training.get("epoch"),
                           step=folder.training.get("step"), step_in_epoch=folder.training.get("step_in_epoch"),
                           calibration=folder.training.get("calibration"), model_folder=str(folder.path),
                           **({"caption_words": folder.caption_words} if folder.caption_words is not None else {}))


def read_checkpoint_or_folder(path: str | Path) -> Any:
    """A checkpoint file's contents, or a model folder (python -m engine.export) read as one of our checkpoints.

    The folder gives the same weights, config and tokenizer as the checkpoint it was exported from, so every
    loader above (load_for_inference, init_from_checkpoint) treats both alike.
    """
    return folder_as_checkpoint(path) if Path(path).is_dir() else load_file(path)


# ---------------------------------------------------------------------------------- the authors' files
def convert_file(src: str, dst: str, img_size: Sequence[int] | None = None, trust_pickle: bool = False
                 ) -> dict[str, Any]:
    """Convert the authors' checkpoint file ``src`` into our checkpoint format at ``dst`` (atomic write).

    ``img_size``: the image size it was trained at (None: the authors' 384 x 128), from which the stride follows.
    The file holds every tensor of the model its config describes (a fine-tuned ``temp`` included, as
    ``temperature``), so our strict loaders accept it.
    """
    img_size = tuple(img_size or OFFICIAL_IMAGE_SIZE)
    try:
        obj = load_file(src, trust_pickle=trust_pickle)
    except UnsafePickleError as exc:  # their legacy pickles may hold non-tensor objects
        raise WeightsError(f"{exc}; if you trust the file, rerun with --trust-pickle") from None
    state, overrides = convert_official(obj, img_size, keep_temperature=True)
    config = {"model": overrides, "input": {"image_size": [int(img_size[0]), int(img_size[1])]}}
    checkpoint = checkpoint_dict(state, config, converted_from=str(src))
    atomic_save(checkpoint, dst)
    return checkpoint
