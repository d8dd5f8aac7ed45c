"""IVT: the unified encoder, a learnable temperature and, optionally, the fusion stack with ITM/MLM heads.

The training ``forward(batch)`` is added by the training code; this module only exposes the building blocks
(``encode_image``, ``encode_text``, ``fuse``, ``itm_logits``, ``mlm_logits``).
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.config import IVTConfig
from models.encoder import UnifiedEncoder
from models.fusion import FusionStack, MlmHead


class IVT(nn.Module):
    """Dual-use retrieval model: CLS features of the shared encoder for ranking, fusion heads for ITM/MLM."""

    def __init__(self, config: IVTConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = UnifiedEncoder(config)
        self.temperature = nn.Parameter(torch.tensor(float(config.temperature_init)))
        if config.fusion_layers > 0:
            width = config.embed_dim
            self.fusion = FusionStack(config.fusion_layers, width, config.num_heads, int(width * config.mlp_ratio),
                                      image_width=width, layer_norm_eps=1e-12, dropout=config.text_dropout)
            self.itm_head = nn.Linear(width, 2)
            self.mlm_head = MlmHead(width, config.vocab_size)
            if config.fusion_reads_block:
                # the blocks' residual stream is unnormalised; the final norm is the retrieval features'
                self.fusion_input_norm = nn.LayerNorm(width, eps=1e-6)
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

    def global_feature(self, tokens: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """tokens [B,N,D], mask [B,N] (nonzero = real token) or None -> the retrieval feature [B,D].

        ``cls`` (IVT) takes token 0. ``mean`` averages the real tokens (CLS included): from random weights the CLS
        output barely depends on the input, and CMPM first collapses every feature onto one direction and only
        leaves that saddle after a few hundred steps; a mean keeps the input's content from step 0 (the CPU demo).
        """
        if self.config.feature_pool == "cls":
            return tokens[:, 0]
        return self._mean_of_real(tokens, mask)

    @staticmethod
    def _mean_of_real(tokens: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """tokens [B,N,D], mask [B,N] (nonzero = real token) or None -> mean of the real tokens [B,D]."""
        if mask is None:
            return tokens.mean(dim=1)
        weights = mask.to(tokens.dtype)[..., None]  # [B,N,1]
        return (tokens * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)

    def _fusion_input(self, tokens: torch.Tensor, tapped: Optional[torch.Tensor]) -> torch.Tensor:
        """The tokens [B,N,D] the fusion stack reads: the output tokens, or the normed block output that
        ``model.fusion_reads_block`` names (tapped)."""
        return tokens if tapped is None else self.fusion_input_norm(tapped)

    def encode_image(self, images: torch.Tensor, bmm: bool = True, for_fusion: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """images [B,3,H,W] -> (tokens [B,N,D], global feature [B,D], see :meth:`global_feature`).

        tokens: the encoder's output tokens, or with ``for_fusion`` the tokens that ``fuse``, ``itm_logits`` and
        ``mlm_logits`` read (the same unless ``model.fusion_reads_block`` names an earlier block); the feature is
        always the output's.
        """
        tap = self.config.fusion_reads_block if for_fusion else 0
        tokens, tapped = self.encoder.forward_image(images, bmm=bmm, tap=tap)
        return self._fusion_input(tokens, tapped), self.global_feature(tokens, None)

    def encode_text_with_mask(self, ids: torch.Tensor, mask: Optional[torch.Tensor], bmm: bool = True,
                              for_fusion: bool = False
                              ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """ids [B,T], mask [B,T] -> (tokens [B,T',D], feature [B,D], kept mask [B,T']); T' < T only after BMM.
        tokens as :meth:`encode_image`'s."""
        tap = self.config.fusion_reads_block if for_fusion else 0
        tokens, kept_mask, tapped = self.encoder.forward_text(ids, mask, bmm=bmm, tap=tap)
        return self._fusion_input(tokens, tapped), self.global_feature(tokens, kept_mask), kept_mask

    def encode_text(self, ids: torch.Tensor, mask: Optional[torch.Tensor], bmm: bool = True, for_fusion: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """ids [B,T], mask [B,T] -> (tokens [B,T',D], global feature [B,D]), as :meth:`encode_text_with_mask`."""
        tokens, feature, _ = self.encode_text_with_mask(ids, mask, bmm=bmm, for_fusion=for_fusion)
        return tokens, feature

    def _require_fusion(self) -> None:
        if not self.has_fusion:
            raise RuntimeError("this IVT model was built with fusion_layers=0; it has no fusion stack or heads")

    def fuse(self, text_tokens: torch.Tensor, text_mask: Optional[torch.Tensor], image_tokens: torch.Tensor,
             image_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """text_tokens [B,T,D], text_mask [B,T], image_tokens [B,N,D], image_mask [B,N] | None -> [B,T,D]; tokens as
        ``encode_*(..., for_fusion=True)`` return them."""
        self._require_fusion()
        return self.fusion(text_tokens, text_mask, image_tokens, image_mask)

    def itm_logits(self, text_tokens: torch.Tensor, text_mask: Optional[torch.Tensor], image_tokens: torch.Tensor,
                   image_mask: Optional[torch.Tensor] = None, *,
                   features: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        """Image-text matching logits [B,2] float32 (index 1 = match) from the fused text tokens.

        Tokens as ``encode_*(..., for_fusion=True)`` return them. features: the pairs' global features (text
        [B,D], image [B,D]), which ``model.itm_residual`` adds as the prior (see :meth:`cosine_prior`).
        ``model.itm_pool`` cls reads the fused CLS token (the authors'); mean averages the fused real tokens, so
        that a word's own cross-attention to the image ("blue" looking for blue) counts without first being
        gathered into CLS by the few self-attention layers of a small fusion stack. The 2-way projection runs
        in float32 even inside autocast: in bf16 the logits of different pairs tie often, and re-ranking sorts
        by them.
        """
        if self.config.itm_residual and features is None:
            raise ValueError("model.itm_residual: itm_logits needs the pairs' global features (features=(text, image))")
        fused = self.fuse(text_tokens, text_mask, image_tokens, image_mask)
        pooled = fused[:, 0] if self.config.itm_pool == "cls" else self._mean_of_real(fused, text_mask)
        with torch.autocast(device_type=pooled.device.type, enabled=False):
            logits = self.itm_head(pooled.float())
            if self.config.itm_residual:
                logits = logits + self.cosine_prior(*features)
            return logits

    @torch.no_grad()
    def cosine_prior(self, text_feature: torch.Tensor, image_feature: torch.Tensor) -> torch.Tensor:
        """text_feature [B,D], image_feature [B,D] (global features) -> [B,2] float32: (0, cosine / temperature)
        of each pair, no gradient.

        With ``model.itm_residual`` the ITM head's logits are added to it: the head is trained, and scores, on top
        of the ranking it re-ranks, so its capacity goes to the pairs the cosine orders wrong instead of to
        re-learning what the features already tell (the cosine of a top-k list's near-duplicates differs little;
        a head from a small fusion stack orders fewer of those pairs right than the cosine does).
        """
        text, image = F.normalize(text_feature.float(), dim=-1), F.normalize(image_feature.float(), dim=-1)
        match = (text * image).sum(dim=-1) / self.temperature.float()
        return torch.stack([torch.zeros_like(match), match], dim=1)

    def mlm_logits(self, text_tokens: torch.Tensor, text_mask: Optional[torch.Tensor], image_tokens: torch.Tensor,
                   image_mask: Optional[torch.Tensor] = None, *, positions: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits [n_selected, V] at ``positions`` (bool [B,T]) of the fused text tokens.

        Tokens as ``encode_*(..., for_fusion=True)`` return them. The decoder runs only at the selected
        positions, row-major over (batch, position), which keeps the [B,T,V] logits tensor out of memory.
        ``positions`` indexes ``text_tokens`` as passed, so the caller encodes the masked caption without BMM
        token dropping.
        """
        fused = self.fuse(text_tokens, text_mask, image_tokens, image_mask)
        if positions.shape != fused.shape[:2]:
            raise ValueError(f"positions shape {list(positions.shape)} differs from text shape {list(fused.shape[:2])}")
        return self.mlm_head(fused[positions.bool()])


def build_model(cfg: Any) -> IVT:
    """Build IVT from a recipe's ``model`` section and ``input.image_size`` (reads no files)."""
    return IVT(IVTConfig.from_config(cfg))
