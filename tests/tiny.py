"""Tiny-model overrides shared by the end-to-end tests (CPU, seconds per run)."""
from __future__ import annotations

from pathlib import Path

TINY_MODEL = [
    "model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.patch_size=8", "model.stride=8",
    "model.drop_path_rate=0.0", "model.vocab_size=400", "model.max_text_positions=64",
    "model.vit_weights=null", "model.bert_weights=null", "input.image_size=[32,16]",
    "text.tokenizer=train", "text.tokenizer_vocab_size=400", "text.max_text_len=48",
]


def tiny_overrides(data_root: Path, fmt: str = "cuhkpedes", num_ids: int = 12, steps: int = 3,
                   epochs: int = 2) -> list[str]:
    return TINY_MODEL + [
        "task=pretrain" if fmt == "pretrain" else f"data.format={fmt}", f"data.root={data_root}", "data.synthesize_if_missing=true",
        f"data.synthetic_num_ids={num_ids}", "data.num_workers=0", "data.pin_memory=false",
        f"train.epochs={epochs}", "train.batch_size_per_gpu=8", f"train.max_steps_per_epoch={steps}",
        "train.amp=none", "train.log_every_steps=1", "train.warmup_epochs=1", "train.optimizer=adamw",
        "train.lr=0.001", "eval.batch_size=16", "eval.chunk_size=7",
        # the "no good match" half-splits run at every evaluation; ten are plenty for what tests read of them
        "eval.no_match_held_out_splits=10",
    ]
