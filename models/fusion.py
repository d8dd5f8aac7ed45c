"""Cross-modal fusion stack and its heads (ITM, MLM), BERT-style.

Each fusion layer is a post-norm BERT layer with a cross-attention over image tokens inserted between
self-attention and the feed-forward (docs/recipe.md). Parameter names are BERT's
(``attention.self.query`` ...) so that BERT layers and the authors' ``encoder_fusion`` load by name.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from models.encoder import attention


def _key_mask(mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """mask [B,N] (nonzero = real token) or None -> SDPA boolean mask [B,1,1,N] or None."""
    return None if mask is None else mask.bool()[:, None, None, :]


class MultiHeadAttention(nn.Module):
    """Attention with separate query/key/value projections; keys and values may come from another width."""

    def __init__(self, hidden_size: int, num_heads: int, kv_width: int, dropout: float) -> None:
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.dropout = dropout
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(kv_width, hidden_size)
        self.value = nn.Linear(kv_width, hidden_size)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.num_heads, -1).transpose(1, 2)

    def forward(self, x: torch.Tensor, context: torch.Tensor, attn_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """x [B,T,H] queries, context [B,N,W] keys/values, attn_mask bool [B,1,1,N] or None -> [B,T,H]."""
        out = attention(self._heads(self.query(x)), self._heads(self.key(context)), self._heads(self.value(context)),
                        attn_mask, dropout_p=self.dropout if self.training else 0.0)
        return out.transpose(1, 2).flatten(2)


class ResidualOutput(nn.Module):
    """BERT's post-norm output: LayerNorm(dropout(dense(h)) + residual)."""

    def __init__(self, in_features: int, hidden_size: int, eps: float, dropout: float) -> None:
        super().__init__()
        self.dense = nn.Linear(in_features, hidden_size)
        self.LayerNorm = nn.LayerNorm(hidden_size, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """h [B,T,in], residual [B,T,H] -> [B,T,H]."""
        return self.LayerNorm(self.dropout(self.dense(h)) + residual)


class AttentionSublayer(nn.Module):
    """``attention`` / ``crossattention`` of a BERT layer: ``self`` (q/k/v) and ``output`` (dense, LayerNorm)."""

    def __init__(self, hidden_size: int, num_heads: int, kv_width: int, eps: float, dropout: float) -> None:
        super().__init__()
        self.self = MultiHeadAttention(hidden_size, num_heads, kv_width, dropout)
        self.output = ResidualOutput(hidden_size, hidden_size, eps, dropout)

    def forward(self, x: torch.Tensor, context: torch.Tensor, attn_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """x [B,T,H], context [B,N,W] -> [B,T,H]."""
        return self.output(self.self(x, context, attn_mask), x)


class Intermediate(nn.Module):
    """BERT's ``intermediate``: dense + GELU."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden_size, intermediate_size)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class FusionLayer(nn.Module):
    """Self-attention -> cross-attention over image tokens -> feed-forward, each post-norm."""

    def __init__(self, hidden_size: int, num_heads: int, intermediate_size: int, image_width: int,
                 eps: float, dropout: float) -> None:
        super().__init__()
        self.attention = AttentionSublayer(hidden_size, num_heads, hidden_size, eps, dropout)
        self.crossattention = AttentionSublayer(hidden_size, num_heads, image_width, eps, dropout)
        self.intermediate = Intermediate(hidden_size, intermediate_size)
        self.output = ResidualOutput(intermediate_size, hidden_size, eps, dropout)

    def forward(self, x: torch.Tensor, text_mask: Optional[torch.Tensor], image: torch.Tensor,
                image_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """x [B,T,H], image [B,N,W]; masks are SDPA boolean masks [B,1,1,*] or None -> [B,T,H]."""
        x = self.attention(x, x, text_mask)
        x = self.crossattention(x, image, image_mask)
        return self.output(self.intermediate(x), x)


class FusionStack(nn.Module):
    """A stack of fusion layers (``layer.{j}``) turning text tokens into image-conditioned text tokens."""

    def __init__(self, num_layers: int = 6, hidden_size: int = 768, num_heads: int = 12,
                 intermediate_size: int = 3072, image_width: int = 768, layer_norm_eps: float = 1e-12,
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.layer = nn.ModuleList(
            FusionLayer(hidden_size, num_heads, intermediate_size, image_width, layer_norm_eps, dropout)
            for _ in range(num_layers))

    def forward(self, text_tokens: torch.Tensor, text_mask: Optional[torch.Tensor], image_tokens: torch.Tensor,
                image_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """text_tokens [B,T,H], text_mask [B,T] (1 = token) or None, image_tokens [B,N,W],
        image_mask [B,N] or None -> fused text tokens [B,T,H]."""
        if text_tokens.shape[0] != image_tokens.shape[0]:
            raise ValueError(f"text batch {text_tokens.shape[0]} differs from image batch {image_tokens.shape[0]}")
        text_attn, image_attn = _key_mask(text_mask), _key_mask(image_mask)
        x = text_tokens
        for layer in self.layer:
            x = layer(x, text_attn, image_tokens, image_attn)
        return x


class PredictionTransform(nn.Module):
    """MLM transform: dense -> GELU -> LayerNorm."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.act = nn.GELU()
        self.LayerNorm = nn.LayerNorm(hidden_size, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.act(self.dense(x)))


class MlmHead(nn.Module):
    """Masked-language-model head. ``decoder.weight`` [V,H] stands for BERT's tied word embeddings."""

    def __init__(self, hidden_size: int, vocab_size: int, layer_norm_eps: float = 1e-12) -> None:
        super().__init__()
        self.transform = PredictionTransform(hidden_size, layer_norm_eps)
        self.decoder = nn.Linear(hidden_size, vocab_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., H] -> vocabulary logits [..., V]."""
        return self.decoder(self.transform(hidden))
