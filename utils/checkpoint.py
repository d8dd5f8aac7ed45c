"""Self-describing checkpoints: atomic writes, safe loading, format detection, rebuilding a model for inference.

Our checkpoint is a dict with ``format == "ivt-retrieval-checkpoint"`` holding the model state dict, the
resolved config as a plain dict and the tokenizer (its vocabulary when it was learnt from the data), plus the
optimizer, scheduler, scaler, epoch, global step, best metric and RNG states for exact resume. Everything in it
loads with ``torch.load(weights_only=True)``. The authors' checkpoints are recognised and converted on the fly.
"""
from __future__ import annotations

import logging
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from utils.config import Config, config_from_dict, load_config

FORMAT_NAME = "ivt-retrieval-checkpoint"
FORMAT_VERSION = 1

logger = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file and what was found."""


def atomic_save(obj: Any, path: str | Path) -> None:
    """torch.save to a temporary file in the same folder, then rename: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_file(path: str | Path) -> Any:
    """Load a checkpoint file safely (tensors and plain containers only)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, zip errors, unsupported globals: all mean "not usable"
        raise CheckpointError(f"{path}: cannot be read as a PyTorch checkpoint ({type(exc).__name__}: {exc})") from None


def detect_format(obj: Any) -> str:
    """'ours', 'official' (the authors' fine-tune or pretrain checkpoints) or 'unknown'."""
    if isinstance(obj, dict) and obj.get("format") == FORMAT_NAME:
        return "ours"
    from models.convert_official import is_official_checkpoint

    return "official" if is_official_checkpoint(obj) else "unknown"


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


# ------------------------------------------------------------------------------------------ tokenizer
def tokenizer_record(tokenizer, text_cfg: Config) -> dict:
    """What a checkpoint stores to rebuild the tokenizer: the vocabulary itself when it was learnt here."""
    if text_cfg.tokenizer == "train":
        from datasets.tokenizer import tokenizer_vocab

        return {"vocab": tokenizer_vocab(tokenizer), "lowercase": bool(text_cfg.lowercase)}
    return {"name": text_cfg.tokenizer}


def tokenizer_from_record(record: dict | None, text_cfg: Config):
    from datasets.tokenizer import build_tokenizer, tokenizer_from_vocab

    if record and "vocab" in record:
        return tokenizer_from_vocab(list(record["vocab"]), bool(record.get("lowercase", True)))
    if text_cfg.tokenizer == "train":
        raise CheckpointError("the config says text.tokenizer=train but the checkpoint holds no vocabulary")
    return build_tokenizer(text_cfg)


# ------------------------------------------------------------------------------------------- loading
def _strict_load(model: torch.nn.Module, state_dict: dict, path: Path) -> None:
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

    Ours: the config stored in the checkpoint, with ``--config``'s data and eval sections (a different data root
    or batch size) and then ``overrides`` on top. The authors': the recipe ``config_path`` (default: base) with
    the architecture inferred from the tensors.
    """
    from models.ivt import build_model

    path = Path(path)
    obj = load_file(path)
    kind = detect_format(obj)
    if kind == "ours":
        cfg = config_from_dict(obj["config"], source=str(path))
        if config_path is not None:
            recipe = load_config(config_path)
            cfg = cfg.replace(data=recipe.data.to_dict(), eval=recipe.eval.to_dict())
        cfg = cfg.replace(overrides)
        model = build_model(cfg)
        _strict_load(model, obj["model"], path)
        tokenizer = tokenizer_from_record(obj.get("tokenizer"), cfg.text)
        info = {"format": "ours", "epoch": obj.get("epoch"), "step": obj.get("step")}
    elif kind == "official":
        from models.convert_official import convert_official, load_official_into

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


def export_safetensors(checkpoint_path: str | Path, out_path: str | Path) -> None:
    """Write the model weights of one of our checkpoints as .safetensors (config as JSON metadata)."""
    import json

    from safetensors.torch import save_file

    obj = load_file(checkpoint_path)
    if detect_format(obj) != "ours":
        raise CheckpointError(f"{checkpoint_path}: not one of our checkpoints; convert it first")
    tensors = {k: v.contiguous() for k, v in obj["model"].items()}
    save_file(tensors, str(out_path), metadata={"config": json.dumps(obj["config"])})
