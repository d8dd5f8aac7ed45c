"""Checkpoint files: atomic writes, safe loading, RNG state for exact resume.

Our checkpoint is a dict with ``format == "ivt-retrieval-checkpoint"`` (see ``engine.checkpoints`` for its
contents); everything in it loads with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import logging
import os
import random
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

import numpy as np
import torch

from utils.errors import UserError

FORMAT_NAME = "ivt-retrieval-checkpoint"
FORMAT_VERSION = 1

logger = logging.getLogger(__name__)


class CheckpointError(UserError, ValueError):
    """A checkpoint file that cannot be used; the message names the file and what was found."""


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write`` on a temporary file in the same folder, then rename it over ``path``.

    A crash at any moment leaves either the previous file or the complete new one, never half a file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_save(obj: Any, path: str | Path) -> None:
    """torch.save through :func:`atomic_write`."""
    atomic_write(path, lambda handle: torch.save(obj, handle))


def load_file(path: str | Path) -> Any:
    """Load a checkpoint file safely (tensors and plain containers only)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, zip errors, unsupported globals: all mean "not usable"
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
