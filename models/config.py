"""The architecture of IVT as one dataclass, built from the YAML's ``model`` section in one place.

The defaults are those of ``configs/base.yaml`` (a test keeps the two equal), so a model built in code with
``IVTConfig()`` is the model a recipe builds without overrides. Weight sources (``model.vit_weights`` and the
like) are not architecture and stay in the YAML.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from utils.errors import UserError


class ModelConfigError(UserError, ValueError):
    """A model or loss setting the model cannot use; the message names the ``model.*`` / ``loss.*`` key."""


FEATURE_POOLS = ("cls", "mean")


@dataclass(frozen=True)
class IVTConfig:
    img_size: tuple[int, int] = (384, 128)  # [height, width] of the input images (input.image_size)
    patch_size: int = 16
    stride: int = 12  # patch stride: 12 gives the overlapping 31x10 grid at 384x128
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_path_rate: float = 0.1
    vocab_size: int = 30522
    max_text_positions: int = 512
    type_vocab_size: int = 2
    text_dropout: float = 0.1
    pad_token_id: int = 0
    bmm_ratio: float = 0.2  # BMM: drop up to floor(ratio * N) tokens per modality in training
    fusion_layers: int = 0  # 0 = the faithful dual encoder; > 0 adds the fusion stack with ITM/MLM heads
    temperature_init: float = 0.5
    grad_checkpointing: bool = False
    text_pad_multiple: int = 0  # > 1: texts run the blocks padded to a multiple of this after BMM (fewer shapes)
    feature_pool: str = "cls"  # the retrieval feature: cls (the CLS token's output, IVT) | mean (of the real tokens)
    itm_residual: bool = False  # the ITM match logit adds the pair's cosine / temperature: the head learns a correction
    itm_pool: str = "cls"  # what the ITM head reads of the fused text: cls (the fused CLS token, the authors') | mean
    fusion_reads_block: int = 0  # the fusion stack reads the output tokens (0, the authors') or those after block k

    def __post_init__(self) -> None:
        object.__setattr__(self, "img_size", tuple(int(s) for s in self.img_size))
        if not 0.0 <= self.bmm_ratio < 1.0:
            raise ModelConfigError(f"model.bmm_ratio must be in [0, 1), got {self.bmm_ratio}")
        if self.fusion_layers < 0:
            raise ModelConfigError(f"model.fusion_layers must be >= 0, got {self.fusion_layers}")
        if not 0 <= self.fusion_reads_block < max(self.depth, 1):
            raise ModelConfigError(f"model.fusion_reads_block must be 0 (the output tokens) or a block "
                                   f"1..{self.depth - 1} of the {self.depth}-block encoder, got "
                                   f"{self.fusion_reads_block}")
        if self.fusion_reads_block and not self.fusion_layers:
            raise ModelConfigError("model.fusion_reads_block is set but model.fusion_layers is 0: there is no fusion "
                                   "stack to read it")
        if self.text_pad_multiple < 0:
            raise ModelConfigError(f"model.text_pad_multiple must be >= 0, got {self.text_pad_multiple}")
        for key in ("feature_pool", "itm_pool"):
            if getattr(self, key) not in FEATURE_POOLS:
                raise ModelConfigError(f"model.{key} must be one of {' | '.join(FEATURE_POOLS)}, got "
                                       f"{getattr(self, key)!r}")
        if self.embed_dim % self.num_heads:
            raise ModelConfigError(f"model.embed_dim {self.embed_dim} is not divisible by model.num_heads "
                                   f"{self.num_heads}")

    @classmethod
    def from_config(cls, cfg: Any) -> "IVTConfig":
        """``cfg.model.*`` and ``cfg.input.image_size`` of a recipe (attribute access only)."""
        values = {f.name: getattr(cfg.model, f.name) for f in fields(cls) if f.name != "img_size"}
        return cls(img_size=tuple(cfg.input.image_size), **values)
