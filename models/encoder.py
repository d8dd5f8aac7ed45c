"""The unified visual-textual encoder of IVT.

Images and captions go through the same pre-norm transformer blocks: attention, both LayerNorms and the final
norm are shared, each block has one feed-forward expert per modality (``mlp_vis`` / ``mlp_txt``). Parameter names
follow the authors' ``encoder_vl`` so that their checkpoints convert by a prefix rename (docs/recipe.md).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from timm.layers import DropPath, Mlp
from torch.nn.attention import SDPBackend, sdpa_kernel

from models.config import IVTConfig

VISION = "vis"
TEXT = "txt"

# cuDNN attention builds an execution plan per sequence length (~3.5 ms of CPU per layer and call on an H200);
# BMM and padding-to-longest change the length every step, which made a training step 3-5x slower. Flash and
# memory-efficient attention are as fast at a fixed length and need no per-shape plan.
_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
              dropout_p: float = 0.0) -> torch.Tensor:
    """Scaled dot-product attention. q [B,h,T,d], k/v [B,h,N,d], attn_mask bool [B,1,1,N] (True = attend)
    or None -> [B,h,T,d]."""
    with sdpa_kernel(_SDPA_BACKENDS):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)


def grid_size(img_size: Sequence[int], patch_size: int, stride: int) -> tuple[int, int]:
    """Patch grid (rows, cols) of a convolutional patch embedding with kernel ``patch_size`` and ``stride``."""
    height, width = int(img_size[0]), int(img_size[1])
    if stride < 1 or patch_size < 1:
        raise ValueError(f"patch_size and stride must be >= 1, got patch_size={patch_size}, stride={stride}")
    if height < patch_size or width < patch_size:
        raise ValueError(f"image size {height}x{width} is smaller than the patch size {patch_size}")
    return (height - patch_size) // stride + 1, (width - patch_size) // stride + 1


class PatchEmbed(nn.Module):
    """Overlapping patch embedding: a Conv2d with kernel ``patch_size`` and stride ``stride``."""

    def __init__(self, img_size: Sequence[int], patch_size: int, stride: int, embed_dim: int) -> None:
        super().__init__()
        self.img_size = (int(img_size[0]), int(img_size[1]))
        self.grid = grid_size(self.img_size, patch_size, stride)
        self.num_patches = self.grid[0] * self.grid[1]
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=stride)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [B,3,H,W] -> patch tokens [B, gy*gx, D], row-major over the grid."""
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, *self.img_size):
            raise ValueError(
                f"expected images of shape [B, 3, {self.img_size[0]}, {self.img_size[1]}], "
                f"got {list(images.shape)}")
        return self.proj(images).flatten(2).transpose(1, 2)


class TextEmbeddings(nn.Module):
    """BERT-style text embedding: word + position + token type (always 0), LayerNorm, dropout.

    Written here rather than borrowed from transformers because its BertEmbeddings signature changes across
    major versions; the parameter names are BERT's so BERT weights load by name.
    """

    def __init__(self, vocab_size: int, hidden_size: int, max_positions: int, type_vocab_size: int,
                 pad_token_id: int, dropout: float, layer_norm_eps: float = 1e-12) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, hidden_size, padding_idx=pad_token_id)
        self.position_embeddings = nn.Embedding(max_positions, hidden_size)
        self.token_type_embeddings = nn.Embedding(type_vocab_size, hidden_size)
        self.LayerNorm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B,T] int -> embeddings [B,T,D]."""
        length = ids.shape[1]
        if length > self.position_embeddings.num_embeddings:
            raise ValueError(
                f"text length {length} exceeds max_text_positions={self.position_embeddings.num_embeddings}")
        positions = torch.arange(length, device=ids.device)
        # Captions are single segments, so the token type is always 0 (as in the authors' code).
        x = self.word_embeddings(ids) + self.position_embeddings(positions) + self.token_type_embeddings.weight[0]
        return self.dropout(self.LayerNorm(x))


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection (rows q / k / v) and an optional key mask."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [B,N,D], attn_mask bool [B,1,1,N] (True = may attend) or None -> [B,N,D]."""
        batch, length, dim = x.shape
        qkv = self.qkv(x).reshape(batch, length, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        out = attention(qkv[0], qkv[1], qkv[2], attn_mask)
        return self.proj(out.transpose(1, 2).reshape(batch, length, dim))


class Block(nn.Module):
    """Pre-norm block with shared attention/norms and a feed-forward expert per modality."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, drop_path: float) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp_vis = Mlp(dim, hidden, act_layer=nn.GELU)
        self.mlp_txt = Mlp(dim, hidden, act_layer=nn.GELU)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor], modality: str) -> torch.Tensor:
        """x [B,N,D] -> [B,N,D]; ``modality`` picks the feed-forward expert ('vis' or 'txt')."""
        mlp = self.mlp_vis if modality == VISION else self.mlp_txt
        x = x + self.drop_path(self.attn(self.norm1(x), attn_mask))
        return x + self.drop_path(mlp(self.norm2(x)))


def _index_on(device: torch.device, index: torch.Tensor) -> torch.Tensor:
    """Move a small CPU index to ``device`` without making the host wait for the GPU queue."""
    if device.type == "cuda":
        return index.pin_memory().to(device, non_blocking=True)
    return index.to(device)


class UnifiedEncoder(nn.Module):
    """Shared transformer over image patches and caption tokens; outputs are after the final norm."""

    def __init__(self, config: IVTConfig) -> None:
        super().__init__()
        c = config
        self.embed_dim = c.embed_dim
        self.patch_size = c.patch_size
        self.stride = c.stride
        self.bmm_ratio = float(c.bmm_ratio)
        self.grad_checkpointing = bool(c.grad_checkpointing)
        self.text_pad_multiple = int(c.text_pad_multiple)

        self.patch_embed = PatchEmbed(c.img_size, c.patch_size, c.stride, c.embed_dim)
        num_tokens = self.patch_embed.num_patches + 1
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, c.embed_dim))
        self.type_embed = nn.Parameter(torch.zeros(1, num_tokens, c.embed_dim))
        self.embeddings = TextEmbeddings(c.vocab_size, c.embed_dim, c.max_text_positions, c.type_vocab_size,
                                         c.pad_token_id, c.text_dropout)
        rates = [c.drop_path_rate * i / (c.depth - 1) if c.depth > 1 else 0.0 for i in range(c.depth)]
        self.blocks = nn.ModuleList(Block(c.embed_dim, c.num_heads, c.mlp_ratio, c.qkv_bias, r) for r in rates)
        self.norm = nn.LayerNorm(c.embed_dim, eps=1e-6)

    @property
    def img_size(self) -> tuple[int, int]:
        return self.patch_embed.img_size

    @property
    def grid(self) -> tuple[int, int]:
        return self.patch_embed.grid

    def _drop_tokens(self, x: torch.Tensor, mask: Optional[torch.Tensor]
                     ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """BMM token dropping (§1.1.4): remove k ~ U{0..floor(ratio*N)} random non-CLS positions.

        x [B,N,D], mask [B,N] or None -> the same with N-k tokens; the same positions for the whole batch and
        the kept tokens in their original order. Draws come from torch's global CPU generator so that seeding
        torch reproduces them.
        """
        length = x.shape[1]
        max_drop = int(self.bmm_ratio * length)  # floor, as the authors; < length because ratio < 1
        num_drop = int(torch.randint(0, max_drop + 1, (1,)).item()) if max_drop > 0 else 0
        if num_drop == 0:
            return x, mask
        keep = torch.ones(length, dtype=torch.bool)
        keep[torch.randperm(length - 1)[:num_drop] + 1] = False
        index = _index_on(x.device, keep.nonzero().squeeze(1))
        x = x.index_select(1, index)
        if mask is not None:
            mask = mask.index_select(1, index)
        return x, mask

    def _run_blocks(self, x: torch.Tensor, mask: Optional[torch.Tensor], modality: str, tap: int = 0
                    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """x [B,N,D], key mask [B,N] (nonzero = real token) or None -> (normed output tokens [B,N,D], the tokens
        after block ``tap`` before any norm [B,N,D], or None when tap is 0)."""
        attn_mask = None if mask is None else mask.bool()[:, None, None, :]
        checkpointing = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        tapped = None
        for number, block in enumerate(self.blocks, start=1):
            if checkpointing:
                x = torch.utils.checkpoint.checkpoint(block, x, attn_mask, modality, use_reentrant=False)
            else:
                x = block(x, attn_mask, modality)
            if number == tap:
                tapped = x
        return self.norm(x), tapped

    def forward_image(self, images: torch.Tensor, bmm: bool = True, tap: int = 0
                      ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """images [B,3,H,W] -> (tokens [B,N',D], the tokens after block ``tap`` [B,N',D] or None; see _run_blocks);
        token 0 is CLS. N' < N+1 only when BMM dropped tokens."""
        x = self.patch_embed(images)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.pos_embed + self.type_embed
        if self.training and bmm and self.bmm_ratio > 0:
            x, _ = self._drop_tokens(x, None)
        return self._run_blocks(x, None, VISION, tap)

    def forward_text(self, ids: torch.Tensor, mask: Optional[torch.Tensor], bmm: bool = True, tap: int = 0
                     ) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        """ids [B,T], mask [B,T] (1 = token, 0 = padding; None = no padding) -> (tokens [B,T',D], mask [B,T'],
        the tokens after block ``tap`` [B,T',D] or None; see _run_blocks).

        Token 0 ([CLS]) must be a real token in every row; it is never dropped.
        """
        if mask is not None and mask.shape != ids.shape:
            raise ValueError(f"text mask shape {list(mask.shape)} differs from ids shape {list(ids.shape)}")
        x = self.embeddings(ids)
        if self.training and bmm and self.bmm_ratio > 0:
            x, mask = self._drop_tokens(x, mask)
        if self.text_pad_multiple > 1 and x.shape[1] % self.text_pad_multiple:
            tokens, tapped = self._run_blocks_padded(x, mask, self.text_pad_multiple, tap)
        else:
            tokens, tapped = self._run_blocks(x, mask, TEXT, tap)
        return tokens, mask, tapped

    def _run_blocks_padded(self, x: torch.Tensor, mask: Optional[torch.Tensor], multiple: int, tap: int
                           ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Text through the blocks at the next multiple of ``multiple`` tokens, then cut back to x's length.

        The added positions are zero vectors that no token attends to (key mask 0), so every real token's output
        is the unpadded one up to the order of floating-point sums; the blocks see a few fixed lengths instead of
        one per batch, which lets compiled graphs and kernel plans be reused. Padding comes after BMM dropping,
        so the drop draws (count and positions, from the unpadded length) stay those of the unpadded run.
        """
        batch, length, _ = x.shape
        extra = -length % multiple
        if mask is None:
            mask = torch.ones(batch, length, dtype=torch.long, device=x.device)
        x = F.pad(x, (0, 0, 0, extra))
        mask = F.pad(mask, (0, extra))
        tokens, tapped = self._run_blocks(x, mask, TEXT, tap)
        return tokens[:, :length], None if tapped is None else tapped[:, :length]
