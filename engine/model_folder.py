"""Reading a model folder (``python -m engine.export``) as one of our checkpoints, its files checked first.

The folder's ``config.json`` records the sha256 of every file it lists (``files_sha256``); a loader verifies the
weights against it before using them, so a corrupted copy fails with one line naming the file instead of ranking
with altered weights. Folders exported before the checksums were recorded load as before, with a note in the log.

Only the standard library is imported at module level: ``python -m engine.export --help`` answers at once.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from utils.errors import UserError

logger = logging.getLogger(__name__)

FOLDER_FORMAT = "ivt-model-folder"
FOLDER_VERSION = 2  # 2: config.json records files_sha256
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
UNREAD_SUFFIXES = (".onnx", ".log")  # folder files no loader of ours reads, so none verifies them


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
    """True for a folder written by ``engine.export.export_model_folder`` (it has config.json and the weights)."""
    path = Path(path)
    return path.is_dir() and (path / CONFIG_FILE).is_file() and (path / WEIGHTS_FILE).is_file()


def read_folder_config(path: str | os.PathLike[str]) -> dict:
    """The parsed config.json of a model folder; CheckpointError naming what is missing otherwise."""
    from utils.checkpoint import CheckpointError

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
    return meta


def verify_file(folder: Path, meta: dict, name: str) -> None:
    """CheckpointError when ``folder/name`` does not have the sha256 that config.json records for it."""
    from utils.checkpoint import CheckpointError

    recorded = (meta.get("files_sha256") or {}).get(name)
    if recorded is None:
        logger.info("%s: no checksum recorded for %s (exported before checksums were written); not verified",
                    folder, name)
        return
    found = sha256_of(folder / name)
    if found != recorded:
        raise CheckpointError(f"{folder / name}: sha256 {found[:16]}... differs from the {recorded[:16]}... that "
                              f"{CONFIG_FILE} records: the file is corrupt or was replaced; copy or export it again")


def folder_as_checkpoint(path: str | os.PathLike[str]) -> dict:
    """A model folder as the dict one of our checkpoints holds (format, model, config, tokenizer, epoch, step).

    The files it reads (weights, tokenizer) are verified against their recorded sha256 first; the ONNX encoders,
    which only other runtimes read, are left to them. The tokenizer comes from the folder: a learnt
    vocabulary as its token list (``vocab.txt``), a named one (bert-base-uncased, ...) by pointing
    ``text.tokenizer`` at the folder, so nothing is fetched from a hub.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file as load_safetensors

    from utils.checkpoint import FORMAT_NAME, FORMAT_VERSION, CheckpointError

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
        vocab_file = path / "vocab.txt"
        if not vocab_file.is_file():
            raise CheckpointError(f"{path}: the model uses a learnt vocabulary but vocab.txt is missing")
        try:
            vocab = vocab_file.read_text(encoding="utf-8").split("\n")[:-1]
        except (OSError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{vocab_file}: cannot be read as UTF-8 text ({exc})") from None
        record = {"vocab": vocab, "lowercase": bool(tokenizer_meta.get("lowercase", True))}
    else:
        record = {"name": str(path)}
        config["text"]["tokenizer"] = str(path)
    training = meta.get("training", {})
    return {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "model": state, "config": config,
            "tokenizer": record, "epoch": training.get("epoch"), "step": training.get("step"),
            "step_in_epoch": training.get("step_in_epoch"), "calibration": meta.get("calibration"),
            "model_folder": str(path)}
