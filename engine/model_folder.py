"""The model-folder format (``python -m engine.export``): its files, ``config.json``, checksums and versions.

A model folder holds ``model.safetensors`` (the weights only), ``config.json`` (the architecture, the resolved
recipe, the metrics, the training state, the library versions and the sha256 of every other file), the tokenizer
files and a ``README.md`` model card. This module writes the folder (``start_model_folder`` then
``finish_model_folder``) and reads it back (``read_model_folder``); the folder's ``files_sha256`` are verified
before any file is used, so a corrupted copy fails with one line naming the file instead of ranking with altered
weights. Folders exported before the checksums were recorded load as before, with a note in the log.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from safetensors import SafetensorError
from safetensors.torch import load_file as load_safetensors
from safetensors.torch import save as safetensors_bytes

from datasets.tokenizer import save_tokenizer
from models.config import IVTConfig
from utils.checkpoint import CheckpointError, atomic_write, file_mode
from utils.config import Config
from utils.environment import environment_record
from utils.errors import UserError

logger = logging.getLogger(__name__)

FOLDER_FORMAT = "ivt-model-folder"
FOLDER_VERSION = 2  # 2: config.json records files_sha256
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
CARD_FILE = "README.md"
CAPTION_WORDS_FILE = "caption_words.txt"  # the training captions' words, one a line (config.json: caption_words)
UNREAD_SUFFIXES = (".onnx", ".log")  # folder files no loader of ours reads, so none verifies them
TRAINING_FIELDS = ("epoch", "step_in_epoch", "step", "best_metric", "best_epoch", "world_size")


class ExportError(UserError, ValueError):
    """A checkpoint that cannot be exported, a folder that cannot be written or an upload that failed."""


def sha256_of(path: str | os.PathLike[str]) -> str:
    """The hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_model_folder(path: str | os.PathLike[str]) -> bool:
    """True for a folder written here (it has config.json and the weights)."""
    path = Path(path)
    return path.is_dir() and (path / CONFIG_FILE).is_file() and (path / WEIGHTS_FILE).is_file()


def read_folder_config(path: str | os.PathLike[str]) -> dict:
    """The parsed config.json of a model folder; CheckpointError naming what is missing otherwise."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"model folder not found: {path}")
    missing = [name for name in (CONFIG_FILE, WEIGHTS_FILE) if not (path / name).is_file()]
    if missing:
        raise CheckpointError(f"{path}: not a model folder (missing {', '.join(missing)}); "
                              "make one with python -m engine.export CHECKPOINT FOLDER")
    try:
        meta = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path / CONFIG_FILE}: cannot be read as JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FOLDER_FORMAT:
        raise CheckpointError(f"{path / CONFIG_FILE}: not an IVT model folder (expected format={FOLDER_FORMAT!r})")
    version = meta.get("format_version", 0)
    if not isinstance(version, int):
        raise CheckpointError(f"{path / CONFIG_FILE}: format_version must be a whole number, found {version!r}")
    if version > FOLDER_VERSION:
        raise CheckpointError(f"{path}: folder format version {version} is newer than this code reads "
                              f"({FOLDER_VERSION}); update the code")
    if not isinstance(meta.get("config"), dict):
        raise CheckpointError(f"{path / CONFIG_FILE}: the 'config' key (the resolved recipe) is missing or not an "
                              "object; export the folder again")
    check_folder_fields(path / CONFIG_FILE, meta)
    return meta


def check_folder_fields(config_file: Path, meta: dict) -> None:
    """The optional fields of a folder's config.json have the shapes the loader reads (CheckpointError naming the
    field otherwise): files_sha256 maps file names to 64 hex digits, tokenizer and training are objects."""
    from utils.checkpoint import CheckpointError

    sums = meta.get("files_sha256")
    if sums is not None and not (isinstance(sums, dict) and all(
            isinstance(name, str) and isinstance(digest, str) and len(digest) == 64
            and all(c in "0123456789abcdef" for c in digest) for name, digest in sums.items())):
        raise CheckpointError(f"{config_file}: field 'files_sha256' must map file names to sha256 digests (64 hex "
                              f"digits), found {str(sums)[:80]!r}; export the folder again")
    for field in ("tokenizer", "training", "caption_words"):
        if meta.get(field) is not None and not isinstance(meta[field], dict):
            raise CheckpointError(f"{config_file}: field {field!r} must be an object, found {meta[field]!r}; export "
                                  "the folder again")


def verify_file(folder: Path, meta: dict, name: str) -> None:
    """CheckpointError when ``folder/name`` does not have the sha256 that config.json records for it."""
    recorded = (meta.get("files_sha256") or {}).get(name)
    if recorded is None:
        logger.info("%s: no checksum recorded for %s (exported before checksums were written); not verified",
                    folder, name)
        return
    found = sha256_of(folder / name)
    if found != recorded:
        raise CheckpointError(f"{folder / name}: sha256 {found[:16]}... differs from the {recorded[:16]}... that "
                              f"{CONFIG_FILE} records: the file is corrupt or was replaced; copy or export it again")


@dataclass(frozen=True)
class FolderContents:
    """What a model folder gives a loader: the weights, the resolved recipe, the tokenizer record, training state."""

    path: Path
    state: dict
    config: dict
    tokenizer: dict  # a tokenizer record as our checkpoints store it: {"vocab", "lowercase"} or {"name"}
    training: dict
    caption_words: list[str] | None = None  # the training captions' words; None for folders exported without them


def read_model_folder(path: str | os.PathLike[str]) -> FolderContents:
    """The weights, config, tokenizer record and training state of a model folder, its files verified first.

    The files it reads (weights, tokenizer) are verified against their recorded sha256; the ONNX encoders, which
    only other runtimes read, are left to them. The tokenizer comes from the folder: a learnt vocabulary as its
    token list (``vocab.txt``), a named one (bert-base-uncased, ...) by pointing ``text.tokenizer`` at the folder,
    so nothing is fetched from a hub.
    """
    path = Path(path).resolve()
    meta = read_folder_config(path)
    verify_file(path, meta, WEIGHTS_FILE)
    for name in sorted(meta.get("files_sha256") or {}):
        if name != WEIGHTS_FILE and not name.endswith(UNREAD_SUFFIXES) and (path / name).is_file():
            verify_file(path, meta, name)
    try:
        state = load_safetensors(str(path / WEIGHTS_FILE))
    except (OSError, SafetensorError) as exc:
        raise CheckpointError(f"{path / WEIGHTS_FILE}: cannot be read ({exc})") from None
    config = json.loads(json.dumps(meta["config"]))  # a private copy
    tokenizer_meta = meta.get("tokenizer", {})
    if tokenizer_meta.get("kind") == "learnt":
        record = {"vocab": read_vocabulary(path), "lowercase": bool(tokenizer_meta.get("lowercase", True))}
    else:
        record = {"name": str(path)}
        config["text"]["tokenizer"] = str(path)
    training = {**meta.get("training", {}), "calibration": meta.get("calibration")}  # engine.calibration's
    words = read_caption_words(path) if meta.get("caption_words") else None
    return FolderContents(path, state, config, record, training, words)


def read_caption_words(path: Path) -> list[str]:
    words_file = path / CAPTION_WORDS_FILE
    if not words_file.is_file():
        raise CheckpointError(f"{path}: {CONFIG_FILE} records caption_words but {CAPTION_WORDS_FILE} is missing; "
                              "copy or export the folder again")
    try:
        return words_file.read_text(encoding="utf-8").split("\n")[:-1]
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{words_file}: cannot be read as UTF-8 text ({exc})") from None


def read_vocabulary(path: Path) -> list[str]:
    vocab_file = path / "vocab.txt"
    if not vocab_file.is_file():
        raise CheckpointError(f"{path}: the model uses a learnt vocabulary but vocab.txt is missing")
    try:
        return vocab_file.read_text(encoding="utf-8").split("\n")[:-1]
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{vocab_file}: cannot be read as UTF-8 text ({exc})") from None


# ---------------------------------------------------------------------------------------------- writing
def folder_record(cfg: Config, tokenizer, learnt_vocabulary: bool, training: dict, source: Path,
                  metrics: dict) -> dict:
    """config.json of a model folder, before its files and their checksums are added.

    ``training``: the source checkpoint's TRAINING_FIELDS and its ``environment``; ``source``: the checkpoint file.
    """
    return {
        "format": FOLDER_FORMAT, "format_version": FOLDER_VERSION, "model_type": "ivt",
        "architecture": asdict(IVTConfig.from_config(cfg)),
        "feature_dim": int(cfg.model.embed_dim), "similarity": "cosine",
        "image_size": list(cfg.input.image_size), "pixel_mean": list(cfg.input.pixel_mean),
        "pixel_std": list(cfg.input.pixel_std),
        "tokenizer": {"kind": "learnt" if learnt_vocabulary else "pretrained", "source": str(cfg.text.tokenizer),
                      "lowercase": bool(cfg.text.lowercase), "vocab_size": len(tokenizer),
                      "max_text_len": int(cfg.text.max_text_len)},
        "config": cfg.to_dict(),
        "training": {k: training.get(k) for k in TRAINING_FIELDS},
        "metrics": metrics,
        "calibration": training.get("calibration"),  # "no good match" threshold, blend weight (engine.calibration)
        "caption_words": ({"file": CAPTION_WORDS_FILE, "count": len(training["caption_words"])}
                          if training.get("caption_words") is not None else None),
        "source_checkpoint": {"file": source.name, "sha256": sha256_of(source)},
        "training_environment": training.get("environment"),
        "export_environment": environment_record("cpu"),
        "files": {"weights": WEIGHTS_FILE},
    }


def prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists():
        if not out_dir.is_dir():
            raise ExportError(f"{out_dir} exists and is not a folder")
        if any(out_dir.iterdir()) and not (overwrite or is_model_folder(out_dir)):
            raise ExportError(f"{out_dir} is not empty and not a model folder; choose another folder")
    out_dir.mkdir(parents=True, exist_ok=True)


def start_model_folder(out_dir: Path, state: dict, tokenizer, overwrite: bool = False,
                       caption_words: list[str] | None = None) -> None:
    """Write the weights (safetensors, contiguous copies), the tokenizer files and, when the checkpoint has them,
    the training captions' words (CAPTION_WORDS_FILE) into ``out_dir``."""
    prepare_out_dir(out_dir, overwrite)
    weights = safetensors_bytes({k: v.detach().clone().contiguous() for k, v in state.items()},
                                metadata={"format": "pt"})
    atomic_write(out_dir / WEIGHTS_FILE, lambda handle: handle.write(weights))
    save_tokenizer(tokenizer, out_dir)
    if caption_words is not None:
        write_text(out_dir / CAPTION_WORDS_FILE, "".join(word + "\n" for word in caption_words))
    elif (out_dir / CAPTION_WORDS_FILE).is_file():  # an update from a checkpoint without them: none left stale
        (out_dir / CAPTION_WORDS_FILE).unlink()


def finish_model_folder(out_dir: Path, meta: dict, card: Callable[[dict], str]) -> None:
    """Record the sha256 of every file written so far in ``meta``, then write config.json and the model card.

    Every file gets the permissions of a plain ``open()`` (the tokenizer's and the ONNX exporter's included).
    """
    for path in out_dir.iterdir():
        if path.is_file():
            os.chmod(path, file_mode())
    listed = sorted(p.name for p in out_dir.iterdir() if p.is_file() and p.name not in (CONFIG_FILE, CARD_FILE))
    meta["files_sha256"] = {name: sha256_of(out_dir / name) for name in listed}
    write_text(out_dir / CONFIG_FILE, json.dumps(finite(meta), indent=2) + "\n")
    write_text(out_dir / CARD_FILE, card(meta))


def finite(value: Any) -> Any:
    """JSON has no inf/nan: such floats (best_metric before any evaluation) become None."""
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))
