"""The model-FLOP count behind bench/train_step.py's MFU (models/flops.py), against a count by hand."""
from __future__ import annotations

import torch

from models.config import IVTConfig
from models.encoder import UnifiedEncoder
from models.flops import (TokenCounter, block_flops, encoder_forward_flops, expected_block_flops_after_bmm,
                          expected_step_flops, patch_embed_flops)

# d = 4, 2 heads of width 2, MLP hidden 8, 2 blocks; 8x8 images in 4x4 patches at stride 4: a 2x2 grid, 5 tokens
TINY = IVTConfig(img_size=(8, 8), patch_size=4, stride=4, embed_dim=4, depth=2, num_heads=2, mlp_ratio=2.0,
                 vocab_size=50, max_text_positions=16, bmm_ratio=0.0, drop_path_rate=0.0, text_dropout=0.0)


def test_flop_formula_equals_a_hand_count_of_the_tiny_config():
    # One sequence of n tokens through one block, matmul by matmul (2 FLOPs per multiply-add):
    #   qkv   [n,4]@[4,12]                     2*n*4*12
    #   q k^T 2 heads x [n,2]@[2,n]            2 * (2*n*2*n)
    #   a v   2 heads x [n,n]@[n,2]            2 * (2*n*n*2)
    #   proj  [n,4]@[4,4]                      2*n*4*4
    #   fc1   [n,4]@[4,8], fc2 [n,8]@[8,4]     2*n*4*8 + 2*n*8*4
    # n = 5 (image: CLS + 4 patches): 480 + 200 + 200 + 160 + 320 + 320 = 1680
    # n = 3 (a text of 3 tokens):     288 +  72 +  72 +  96 + 192 + 192 =  912
    assert block_flops(5, 4, 8) == 1680
    assert block_flops(3, 4, 8) == 912
    # Patch embedding per image: 4 patches, [4, 3*4*4] @ [48, 4] = 2*4*48*4 = 1536.
    assert patch_embed_flops(4, 4, 4) == 1536
    # A step of 2 image views and 3 texts of 3 tokens, 2 blocks each:
    #   images 2 views * 2 blocks * 1680 = 6720, patches 2 * 1536 = 3072, texts 3 * 2 * 912 = 5472
    #   forward 15264, forward + backward 3 * 15264 = 45792
    assert encoder_forward_flops(TINY, [(2, 5), (3, 3)], images=2) == 15264
    step = expected_step_flops(TINY, image_views=2, texts=3, text_length=3)
    assert step.forward == 15264 and step.train == 45792
    assert (step.image_tokens, step.text_tokens) == (5, 3)


def test_the_counter_sees_what_the_encoder_runs():
    encoder = UnifiedEncoder(TINY).eval()
    counter = TokenCounter()
    with counter.attach(encoder), torch.no_grad():
        encoder.forward_image(torch.zeros(2, 3, 8, 8))
        encoder.forward_text(torch.ones(3, 3, dtype=torch.long), torch.ones(3, 3, dtype=torch.long))
    assert counter.sequences == [(2, 5), (3, 3)] and counter.images == 2
    assert counter.forward_flops(TINY) == 15264


def test_expected_bmm_flops_is_the_mean_over_the_uniform_drop():
    # ratio 0.5 on 5 tokens: k ~ U{0, 1, 2} -> lengths 5, 4, 3 equally likely.
    config = IVTConfig(**{**TINY.__dict__, "bmm_ratio": 0.5})
    hand = (block_flops(5, 4, 8) + block_flops(4, 4, 8) + block_flops(3, 4, 8)) / 3
    assert expected_block_flops_after_bmm(config, 5) == hand
    assert expected_block_flops_after_bmm(config, 5, training=False) == block_flops(5, 4, 8)
    # Padding to a multiple of 4 after the drop: 5 -> 8, 4 -> 4, 3 -> 4.
    padded = (block_flops(8, 4, 8) + 2 * block_flops(4, 4, 8)) / 3
    assert expected_block_flops_after_bmm(config, 5, pad_multiple=4) == padded
    # And it is what a training encoder does on average.
    encoder = UnifiedEncoder(config).train()
    counter = TokenCounter()
    torch.manual_seed(0)
    with counter.attach(encoder), torch.no_grad():
        for _ in range(600):
            encoder.forward_image(torch.zeros(1, 3, 8, 8))
    measured = sum(block_flops(n, 4, 8) for _, n in counter.sequences) / len(counter.sequences)
    assert abs(measured - hand) / hand < 0.03
    assert {n for _, n in counter.sequences} == {3, 4, 5}


def test_base_recipe_step_is_about_fifteen_teraflop():
    # The estimate for the recipe: 84 views at ~280 tokens after BMM, 84 texts at ~58: ~15 TFLOP per step.
    base = IVTConfig()
    step = expected_step_flops(base, image_views=84, texts=84, text_length=64)
    assert 280 <= step.image_tokens <= 282
    assert 14e12 < step.train < 16e12
