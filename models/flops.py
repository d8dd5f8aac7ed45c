"""Model FLOPs of the unified encoder: the count behind model-FLOPs utilisation (MFU) in bench/train_step.py.

Counted: the matrix multiplies, 2 FLOPs per multiply-add. Per transformer block and per sequence of n tokens
(width d, feed-forward hidden h = int(d * mlp_ratio)):

    qkv projection   [n, d] @ [d, 3d]          2 * n * d * 3d
    scores q k^T     per head [n, d/H] @ [d/H, n]  summed over H heads: 2 * n * n * d
    weights @ v      per head [n, n] @ [n, d/H]    summed over H heads: 2 * n * n * d
    output proj      [n, d] @ [d, d]           2 * n * d * d
    mlp fc1, fc2     [n, d] @ [d, h], [n, h] @ [h, d]   2 * 2 * n * d * h
    -------------------------------------------------------------------------
    block(n) = 8 n d^2 + 4 n^2 d + 4 n d h     (= 24 n d^2 + 4 n^2 d at mlp_ratio 4)

plus the patch embedding of each image view, a convolution that is one matmul [P, 3 p^2] @ [3 p^2, d]:
2 * P * 3 p^2 * d for P patches of side p. A step's forward is depth * block(n) summed over every encoded
sequence at the length the blocks actually see: image views after BMM token dropping (1 + P - k tokens), texts
after padding (the longest caption of the batch, or the padded bucket with ``model.text_pad_multiple``) minus
their BMM drops. Training counts forward + backward = 3 x forward (backward is two matmuls per forward matmul).

Not counted (all elementwise or O(batch^2 d), well under 1% at the recipe's sizes): LayerNorm, softmax, GELU,
residual adds, embeddings (gathers), the CMPM/ITC similarity matrices, and the fusion stack (0 layers in the
fine-tuning recipe). Activation checkpointing recomputes the forward but is not counted again, by the usual
convention that MFU counts the model's FLOPs, not the hardware's.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

import torch

from models.config import IVTConfig
from models.encoder import grid_size


def block_flops(length: int, dim: int, mlp_hidden: int) -> int:
    """Forward FLOPs of one encoder block over one sequence of ``length`` tokens (formula in the module doc)."""
    return 8 * length * dim * dim + 4 * length * length * dim + 4 * length * dim * mlp_hidden


def patch_embed_flops(num_patches: int, patch_size: int, dim: int) -> int:
    """Forward FLOPs of the patch embedding of one image: [P, 3 p^2] @ [3 p^2, d]."""
    return 2 * num_patches * 3 * patch_size * patch_size * dim


def mlp_hidden(config: IVTConfig) -> int:
    return int(config.embed_dim * config.mlp_ratio)


def num_patches(config: IVTConfig) -> int:
    rows, cols = grid_size(config.img_size, config.patch_size, config.stride)
    return rows * cols


def padded(length: int, multiple: int) -> int:
    """``length`` rounded up to a multiple of ``multiple`` (unchanged when ``multiple`` <= 1)."""
    return length if multiple <= 1 else -(-length // multiple) * multiple


def encoder_forward_flops(config: IVTConfig, sequences: list[tuple[int, int]], images: int) -> int:
    """Forward FLOPs of the encoder for ``sequences`` [(count, length as the blocks see it), ...] and ``images``
    patch embeddings."""
    hidden = mlp_hidden(config)
    blocks = sum(count * block_flops(length, config.embed_dim, hidden) for count, length in sequences)
    return config.depth * blocks + images * patch_embed_flops(num_patches(config), config.patch_size,
                                                              config.embed_dim)


def expected_block_flops_after_bmm(config: IVTConfig, length: int, training: bool = True,
                                   pad_multiple: int = 1) -> float:
    """Mean forward FLOPs of one block over a sequence of ``length`` tokens after BMM's uniform drop of
    k ~ U{0..floor(bmm_ratio * length)} tokens, then padding to ``pad_multiple`` (exact: the mean over every k)."""
    max_drop = int(config.bmm_ratio * length) if training else 0
    hidden = mlp_hidden(config)
    total = sum(block_flops(padded(length - k, pad_multiple), config.embed_dim, hidden) for k in range(max_drop + 1))
    return total / (max_drop + 1)


@dataclass
class StepFlops:
    """FLOPs of one training step (forward, and forward + backward = 3 x forward)."""

    forward: float
    image_tokens: float  # mean tokens per image view as the blocks see them
    text_tokens: float  # mean tokens per text as the blocks see them

    @property
    def train(self) -> float:
        return 3.0 * self.forward


def expected_step_flops(config: IVTConfig, image_views: int, texts: int, text_length: int,
                        text_pad_multiple: int = 0, training: bool = True) -> StepFlops:
    """Expected FLOPs of a CMPM fine-tuning step: ``image_views`` views and ``texts`` texts padded to
    ``text_length`` (the batch's longest), each BMM-dropped in training; expectation over the BMM draws."""
    image_len = num_patches(config) + 1
    image_block = expected_block_flops_after_bmm(config, image_len, training)
    text_block = expected_block_flops_after_bmm(config, text_length, training, max(1, text_pad_multiple))
    forward = (config.depth * (image_views * image_block + texts * text_block)
               + image_views * patch_embed_flops(num_patches(config), config.patch_size, config.embed_dim))
    image_drop = int(config.bmm_ratio * image_len) if training else 0
    text_drop = int(config.bmm_ratio * text_length) if training else 0
    mean_text = sum(padded(text_length - k, max(1, text_pad_multiple)) for k in range(text_drop + 1)) / (text_drop + 1)
    return StepFlops(forward=float(forward), image_tokens=image_len - image_drop / 2, text_tokens=mean_text)


@dataclass
class TokenCounter:
    """Records the (sequences, length) of every call into the encoder's blocks and the images embedded.

    ``with counter.attach(model.encoder): ...`` hooks the first block and the patch embedding of a
    :class:`~models.encoder.UnifiedEncoder` (eager mode; a compiled module may not run Python hooks).
    """

    sequences: list[tuple[int, int]] = field(default_factory=list)
    images: int = 0
    enabled: bool = True  # a caller may switch counting off (e.g. during the recomputation of checkpointing)

    @contextlib.contextmanager
    def attach(self, encoder: torch.nn.Module) -> Iterator["TokenCounter"]:
        def on_block(module, args):
            if self.enabled:
                x = args[0]
                self.sequences.append((int(x.shape[0]), int(x.shape[1])))

        def on_patches(module, args):
            if self.enabled:
                self.images += int(args[0].shape[0])

        handles = [encoder.blocks[0].register_forward_pre_hook(on_block),
                   encoder.patch_embed.register_forward_pre_hook(on_patches)]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def forward_flops(self, config: IVTConfig) -> int:
        return encoder_forward_flops(config, self.sequences, self.images)
