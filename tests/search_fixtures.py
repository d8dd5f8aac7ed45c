"""Tiny checkpoints and galleries shared by the search, export and web-page tests (CPU, seconds)."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Sequence

import torch

from utils.checkpoint import atomic_save
from utils.config import load_config

TINY = ["model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.patch_size=16", "model.stride=16",
        "input.image_size=[64,32]", "text.tokenizer=train", "text.tokenizer_vocab_size=200", "model.vocab_size=200",
        "eval.batch_size=2", "data.num_workers=0", "eval.amp=false"]
QUERY = "a woman in a red coat and black pants with a backpack"


def synthetic_captions(synth_root: Path) -> list[str]:
    from datasets.readers import load_annotations

    return [r.caption for r in load_annotations("cuhkpedes", synth_root).train]


def make_checkpoint(path: Path, synth_root: Path, seed: int, extra: Sequence[str] = (), tokenizer=None) -> Path:
    """One of our checkpoints of a randomly initialised tiny model (``extra`` overrides on top of TINY)."""
    from datasets.tokenizer import build_tokenizer, tokenizer_vocab
    from engine.checkpoints import checkpoint_dict, tokenizer_record
    from models.ivt import build_model

    cfg = load_config(None, TINY + list(extra))
    if tokenizer is None:
        tokenizer = build_tokenizer(cfg.text, synthetic_captions(synth_root))
    torch.manual_seed(seed)
    record = ({"vocab": tokenizer_vocab(tokenizer), "lowercase": True} if cfg.text.tokenizer == "train"
              else tokenizer_record(tokenizer, cfg.text))
    atomic_save(checkpoint_dict(build_model(cfg).state_dict(), cfg.to_dict(), record, epoch=3, step=42), path)
    return path


def copy_gallery(synth_root: Path, folder: Path, count: int = 5) -> list[Path]:
    """``count`` synthetic person images copied into ``folder``; returns their new paths."""
    folder.mkdir(parents=True, exist_ok=True)
    copied = []
    for i, image in enumerate(sorted((synth_root / "imgs").rglob("*.jpg"))[:count]):
        copied.append(Path(shutil.copy(image, folder / f"p{i}.jpg")))
    return copied
