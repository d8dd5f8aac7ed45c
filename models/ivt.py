"""IVT: the unified encoder, a learnable temperature and, optionally, the fusion stack with ITM/MLM heads.

The training ``forward(batch)`` is added by the training code; this module only exposes the building blocks
(``encode_image``, ``encode_text``, ``fuse``, ``itm_logits``, ``mlm_logits``).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.nn as nn

from models.encoder import UnifiedEncoder
from models.fusion import FusionStack, MlmHead


class IVT(nn.Module):
    """Dual-use retrieval model: CLS features of the shared encoder for ranking, fusion heads for ITM/MLM."""

    def __init__(self, *, img_size: Sequence[int] = (384, 128), patch_size: int = 16, stride: int = 12,
                 embed_dim: int = 768, depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, drop_path_rate: float = 0.1, vocab_size: int = 30522,
                 max_text_positions: int = 512, type_vocab_size: int = 2, text_dropout: float = 0.1,
                 pad_token_id: int = 0, bmm_ratio: float = 0.2, grad_checkpointing: bool = False,
                 fusion_layers: int = 0, temperature_init: float = 0.07) -> None:
        super().__init__()
        if fusion_layers < 0:
            raise ValueError(f"fusion_layers must be >= 0, got {fusion_layers}")
        self.encoder = UnifiedEncoder(
            img_size=img_size, patch_size=patch_size, stride=stride, embed_dim=embed_dim, depth=depth,
            num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop_path_rate=drop_path_rate,
            vocab_size=vocab_size, max_text_positions=max_text_positions, type_vocab_size=type_vocab_size,
            text_dropout=text_dropout, pad_token_id=pad_token_id, bmm_ratio=bmm_ratio,
            grad_checkpointing=grad_checkpointing)
        self.temperature = nn.Parameter(torch.tensor(float(temperature_init)))
        if fusion_layers > 0:
            self.fusion = FusionStack(fusion_layers, embed_dim, num_heads, int(embed_dim * mlp_ratio),
                                      image_width=embed_dim, layer_norm_eps=1e-12, dropout=text_dropout)
            self.itm_head = nn.Linear(embed_dim, 2)
            self.mlm_head = MlmHead(embed_dim, vocab_size)
        self.apply(self._init_module)
        for param in (self.encoder.cls_token, self.encoder.pos_embed, self.encoder.type_embed):
            nn.init.trunc_normal_(param, std=0.02)

    def _init_module(self, module: nn.Module) -> None:
        # The authors' init: trunc-normal(0.02) Linear with zero bias, LayerNorm 1/0; embeddings as BERT.
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    @property
    def has_fusion(self) -> bool:
        return hasattr(self, "fusion")

    def encode_image(self, images: torch.Tensor, bmm: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """images [B,3,H,W] -> (tokens [B,N,D], global feature [B,D] = CLS token)."""
        tokens = self.encoder.forward_image(images, bmm=bmm)
        return tokens, tokens[:, 0]

    def encode_text_with_mask(self, ids: torch.Tensor, mask: Optional[torch.Tensor], bmm: bool = True
                              ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """ids [B,T], mask [B,T] -> (tokens [B,T',D], feature [B,D], kept mask [B,T']); T' < T only after BMM."""
        tokens, kept_mask = self.encoder.forward_text(ids, mask, bmm=bmm)
        return tokens, tokens[:, 0], kept_mask

    def encode_text(self, ids: torch.Tensor, mask: Optional[torch.Tensor], bmm: bool = True
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """ids [B,T], mask [B,T] -> (tokens [B,T',D], global feature [B,D] = CLS token)."""
        tokens, feature, _ = self.encode_text_with_mask(ids, mask, bmm=bmm)
        return tokens, feature

    def _require_fusion(self) -> None:
        if not self.has_fusion:
            raise RuntimeError("this IVT model was built with fusion_layers=0; it has no fusion stack or heads")

    def fuse(self, text_tokens: torch.Tensor, text_mask: Optional[torch.Tensor], image_tokens: torch.Tensor,
             image_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """text_tokens [B,T,D], text_mask [B,T], image_tokens [B,N,D], image_mask [B,N] | None -> [B,T,D]."""
        self._require_fusion()
        return self.fusion(text_tokens, text_mask, image_tokens, image_mask)

    def itm_logits(self, text_tokens: torch.Tensor, text_mask: Optional[torch.Tensor], image_tokens: torch.Tensor,
                   image_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Image-text matching logits [B,2] (index 1 = match) from the fused CLS token."""
        return self.itm_head(self.fuse(text_tokens, text_mask, image_tokens, image_mask)[:, 0])

    def mlm_logits(self, text_tokens: torch.Tensor, text_mask: Optional[torch.Tensor], image_tokens: torch.Tensor,
                   image_mask: Optional[torch.Tensor] = None, *, positions: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits [n_selected, V] at ``positions`` (bool [B,T]) of the fused text tokens.

        The decoder runs only at the selected positions, row-major over (batch, position), which keeps the
        [B,T,V] logits tensor out of memory. ``positions`` indexes ``text_tokens`` as passed, so the caller
        encodes the masked caption without BMM token dropping.
        """
        fused = self.fuse(text_tokens, text_mask, image_tokens, image_mask)
        if positions.shape != fused.shape[:2]:
            raise ValueError(f"positions shape {list(positions.shape)} differs from text shape {list(fused.shape[:2])}")
        return self.mlm_head(fused[positions.bool()])


def build_model(cfg: Any) -> IVT:
    """Build IVT from ``cfg.input.image_size`` and ``cfg.model.*`` (attribute access only; reads no files)."""
    m = cfg.model
    return IVT(
        img_size=tuple(cfg.input.image_size), patch_size=m.patch_size, stride=m.stride, embed_dim=m.embed_dim,
        depth=m.depth, num_heads=m.num_heads, mlp_ratio=m.mlp_ratio, qkv_bias=m.qkv_bias,
        drop_path_rate=m.drop_path_rate, vocab_size=m.vocab_size, max_text_positions=m.max_text_positions,
        type_vocab_size=m.type_vocab_size, text_dropout=m.text_dropout, pad_token_id=m.pad_token_id,
        bmm_ratio=m.bmm_ratio, grad_checkpointing=m.grad_checkpointing, fusion_layers=m.fusion_layers,
        temperature_init=m.temperature_init)
