"""Checkpoint files: atomic writes, safe loading, RNG state for exact resume.

Our checkpoint is a dict with ``format == "ivt-retrieval-checkpoint"`` (see ``engine.checkpoints`` for its
contents); everything in it loads with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import logging
import os
import pickle
import random
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

import numpy as np
import torch

from utils.errors import UserError, out_of_space

FORMAT_NAME = "ivt-retrieval-checkpoint"
FORMAT_VERSION = 1
TMP_SUFFIX = ".tmp"  # atomic_write's temporary files: <name>.<random>.tmp beside the target

logger = logging.getLogger(__name__)


class CheckpointError(UserError, ValueError):
    """A checkpoint file that cannot be used; the message names the file and what was found."""


class DiskFullError(UserError, OSError):
    """A write ran out of space; the previous file at that path is intact."""


def file_mode() -> int:
    """Permissions a plain ``open()`` would give under the current umask (mkstemp alone makes files 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some filesystems do not open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def model_epoch(info: dict) -> int | None:
    """The epoch of the model a checkpoint holds, numbered as the training log numbers epochs (from 0).

    Checkpoints store ``epoch`` as the epoch to run next (ours and the authors' alike), so one written at the end
    of an epoch holds the model of ``epoch - 1``; one of ours written mid-epoch (a stopped run's last.pth,
    ``step_in_epoch > 0``) holds a model inside ``epoch``. Every report (evaluate.py, the web page, the model
    card) shows this number, so it matches the log's "best ... at epoch E" and the checkpoint's ``best_epoch``.
    ``info`` is the checkpoint dict or any dict with its ``epoch`` and ``step_in_epoch``; None when unknown.
    """
    epoch = info.get("epoch")
    if isinstance(epoch, bool) or not isinstance(epoch, int):
        return None
    return epoch if info.get("step_in_epoch") else epoch - 1


class OutputNotWritableError(UserError, PermissionError):
    """A folder a command would write into cannot take files (a read-only mount, an immutable folder, permissions,
    or a file where the folder should be); raised before the work whose results would be lost."""


def check_writable_folder(folder: str | Path, what: str) -> None:
    """OutputNotWritableError naming ``what`` (e.g. "--output-dir") when no file can be created in ``folder``, or,
    while it does not exist yet, in the nearest existing folder above it, where it would be made. A real file is
    created and removed: root ignores permission bits, a read-only mount or an immutable folder does not."""
    folder = Path(folder).absolute()
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise OutputNotWritableError(f"{what}: {probe} is a file, not a folder; remove it or choose another place")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".write-check.", suffix=TMP_SUFFIX, dir=probe)
        os.close(fd)
        os.remove(tmp)
    except OSError as exc:
        where = "" if probe == folder else f" (where {folder} would be created)"
        raise OutputNotWritableError(f"{what}: cannot write in {probe}{where}: {exc.strerror or exc}; choose a "
                                     "writable folder") from None


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None], expected_bytes: int | None = None) -> None:
    """Call ``write`` on a temporary file in the same folder, fsync it, then rename it over ``path``.

    A crash at any moment leaves either the previous file or the complete new one, never half a file; the file
    and the folder are synced so that a power loss after the rename keeps the new file. A full disk raises
    DiskFullError naming the path, the bytes the write needed (``expected_bytes`` when known) and the space left.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=TMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as exc:
        written = os.path.getsize(tmp) if os.path.exists(tmp) else 0
        if os.path.exists(tmp):
            os.remove(tmp)
        reason = out_of_space(exc) if isinstance(exc, Exception) else None
        if reason is not None:
            needed = f"about {expected_bytes / 2**20:.1f} MiB" if expected_bytes else f"more than {written} bytes"
            free = shutil.disk_usage(path.parent).free
            raise DiskFullError(f"{reason}: could not write {path} (the save needed {needed}; "
                                f"{free / 2**20:.1f} MiB free on that filesystem); the previous {path.name}, "
                                "if any, is intact") from None
        raise


def tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor inside nested dicts/lists: what a torch.save of ``obj`` needs, near enough."""
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def atomic_save(obj: Any, path: str | Path) -> None:
    """torch.save through :func:`atomic_write`."""
    atomic_write(path, lambda handle: torch.save(obj, handle), expected_bytes=tensor_bytes(obj))


def remove_orphan_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporary files an interrupted :func:`atomic_write` left in ``folder`` (1-2 GB each at full size).

    Call it when a run starts, before anything writes there.
    """
    folder = Path(folder)
    removed = sorted(folder.glob(f"*{TMP_SUFFIX}")) if folder.is_dir() else []
    for orphan in removed:
        orphan.unlink(missing_ok=True)
    if removed:
        logger.info("removed %d temporary file(s) left by an interrupted save in %s: %s", len(removed), folder,
                    ", ".join(p.name for p in removed[:5]))
    return removed


def verify_zip_checksums(path: str | Path) -> None:
    """CheckpointError when a stored CRC of a zip-format checkpoint does not match its bytes.

    torch.load does not check the CRCs its writer stores, so a flipped bit inside a tensor loads silently.
    """
    path = Path(path)
    if not zipfile.is_zipfile(path):
        return  # the legacy (pre-1.6) format has no checksums
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError) as exc:
        raise CheckpointError(f"{path}: damaged checkpoint ({exc})") from None
    if bad is not None:
        raise CheckpointError(f"{path}: damaged checkpoint: the checksum of {bad!r} does not match its bytes "
                              "(a bit flip or a partial copy); use another copy or an earlier checkpoint")


class UnsafePickleError(CheckpointError):
    """A file that holds objects other than tensors and plain containers: loading it would run pickled code."""


def load_file(path: str | Path, *, trust_pickle: bool = False, mmap: bool = False) -> Any:
    """Every ``torch.load`` of the project: a file's contents on the CPU, after checking its zip checksums.

    Tensors and plain containers only (``weights_only``), unless ``trust_pickle`` (runs the file's pickled code:
    only for a file the user vouches for); such a file refused raises UnsafePickleError. ``mmap`` maps the tensors
    instead of reading them (a zip-format file only), for callers that read a few fields of a large file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    verify_zip_checksums(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle, mmap=mmap or None)
    except Exception as exc:  # zip errors, truncated files, unsupported globals: all mean "not usable"
        if not trust_pickle and isinstance(exc, pickle.UnpicklingError) and "Unsupported global" in str(exc):
            # a class or function reference: loading it would run the file's code, which needs the user's word
            raise UnsafePickleError(f"{path}: holds objects other than tensors and plain containers, which are not "
                                    f"loaded unless the file is trusted ({exc})") from None
        raise CheckpointError(f"{path}: cannot be read as a PyTorch checkpoint ({type(exc).__name__}: {exc})") from None


def describe_keys(obj: Any, limit: int = 8) -> str:
    if not isinstance(obj, dict):
        return f"an object of type {type(obj).__name__}"
    keys = list(obj.keys())
    shown = ", ".join(map(str, keys[:limit])) + (", ..." if len(keys) > limit else "")
    return f"a dict with {len(keys)} keys ({shown})"


# --------------------------------------------------------------------------------------------- RNG state
def capture_rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict) -> None:
    random.setstate(_as_python_random_state(state["python"]))
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _as_python_random_state(saved: Any) -> tuple:
    # torch.load gives lists back for tuples in some versions; random.setstate needs tuples.
    version, internal, gauss = saved
    return (version, tuple(internal), gauss)
