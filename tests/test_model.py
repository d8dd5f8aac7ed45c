"""The IVT model: shapes, masks, BMM token dropping, fusion heads, parameter counts, init."""
import math
import random
from types import SimpleNamespace

import pytest
import torch

from models.config import IVTConfig, ModelConfigError
from models.encoder import Attention, UnifiedEncoder, grid_size
from models.fusion import FusionStack
from models.ivt import IVT, build_model

TINY = dict(img_size=(64, 32), patch_size=16, stride=12, embed_dim=32, depth=2, num_heads=4, vocab_size=50,
            max_text_positions=24, drop_path_rate=0.1, bmm_ratio=0.2)


def tiny(**overrides) -> IVT:
    torch.manual_seed(0)
    return IVT(IVTConfig(**{**TINY, "fusion_layers": 2, **overrides}))


def test_grid_size_matches_the_authors_numbers():
    assert grid_size((384, 128), 16, 12) == (31, 10)
    assert grid_size((384, 128), 16, 16) == (24, 8)
    assert grid_size((64, 32), 16, 12) == (5, 2)
    with pytest.raises(ValueError, match="smaller than the patch"):
        grid_size((8, 32), 16, 12)


def test_base_parameter_counts_on_meta_device():
    counts = {}
    for stride in (12, 16):
        with torch.device("meta"):
            encoder = UnifiedEncoder(IVTConfig(stride=stride))
        counts[stride] = sum(p.numel() for p in encoder.parameters())
    assert counts == {12: 166_631_424, 16: 166_450_176}
    with torch.device("meta"):
        model = IVT(IVTConfig(stride=16, fusion_layers=6))
    # The authors' pretraining model has 247,622,205 unique parameters, of which the fusion BERT's unused
    # position/type embeddings and embedding LayerNorm (512*768 + 2*768 + 2*768 = 396,288) have no place here.
    assert sum(p.numel() for p in model.parameters()) == 247_622_205 - 396_288
    assert model.encoder.pos_embed.shape == (1, 193, 768)


def test_forward_backward_shapes_and_finite_gradients():
    model = tiny().train()
    images = torch.randn(3, 3, 64, 32)
    ids = torch.randint(1, 50, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:] = 0
    image_tokens, image_feat = model.encode_image(images)
    text_tokens, text_feat, kept = model.encode_text_with_mask(ids, mask)
    assert image_feat.shape == (3, 32) and text_feat.shape == (3, 32)
    assert 11 - int(0.2 * 11) <= image_tokens.shape[1] <= 11
    assert text_tokens.shape[:2] == kept.shape and 9 - int(0.2 * 9) <= kept.shape[1] <= 9
    itm = model.itm_logits(text_tokens, kept, image_tokens)
    plain_tokens, _ = model.encode_text(ids, mask, bmm=False)
    positions = torch.zeros(3, 9, dtype=torch.bool)
    positions[0, 2] = positions[1, 3] = positions[2, 1] = positions[2, 4] = True
    mlm = model.mlm_logits(plain_tokens, mask, image_tokens, positions=positions)
    assert itm.shape == (3, 2) and mlm.shape == (4, 50)
    loss = image_feat.square().mean() + text_feat.square().mean() + itm.logsumexp(-1).mean() + mlm.logsumexp(-1).mean()
    loss.backward()
    no_grad = sorted(n for n, p in model.named_parameters() if p.grad is None)
    assert no_grad == ["temperature"]  # no loss here uses it
    assert all(torch.isfinite(p.grad).all() for n, p in model.named_parameters() if p.grad is not None)
    assert image_tokens.shape[-1] == 32 and torch.isfinite(image_tokens).all()


def encoded_pairs(model: IVT, batch: int, padded_row: int, kept: int):
    """(image tokens, image features, text tokens, text features, mask) of random pictures and 7-token captions,
    row ``padded_row`` keeping only its first ``kept`` tokens."""
    images, ids = torch.randn(batch, 3, 64, 32), torch.randint(1, 50, (batch, 7))
    mask = torch.ones(batch, 7, dtype=torch.long)
    mask[padded_row, kept:] = 0
    image_tokens, image_feat = model.encode_image(images, bmm=False)
    text_tokens, text_feat = model.encode_text(ids, mask, bmm=False)
    return image_tokens, image_feat, text_tokens, text_feat, mask


def test_the_fusion_stack_can_read_an_earlier_block_of_both_modalities():
    model = tiny(fusion_reads_block=1).eval()
    images, ids = torch.randn(3, 3, 64, 32), torch.randint(1, 50, (3, 7))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 5:] = 0
    after_first: list[torch.Tensor] = []
    handle = model.encoder.blocks[0].register_forward_hook(lambda _m, _a, out: after_first.append(out))
    with torch.no_grad():
        image_tokens, image_feat = model.encode_image(images, bmm=False)
        fusion_image, fusion_image_feat = model.encode_image(images, bmm=False, for_fusion=True)
        text_tokens, text_feat = model.encode_text(ids, mask, bmm=False)
        fusion_text, fusion_text_feat = model.encode_text(ids, mask, bmm=False, for_fusion=True)
    handle.remove()
    # the first block's output of each pass, through the fusion stack's own norm; the features are the output's
    torch.testing.assert_close(fusion_image, model.fusion_input_norm(after_first[1]))
    torch.testing.assert_close(fusion_text, model.fusion_input_norm(after_first[3]))
    assert torch.equal(fusion_image_feat, image_feat) and torch.equal(fusion_text_feat, text_feat)
    assert (fusion_image - image_tokens).abs().max() > 0.1 and (fusion_text - text_tokens).abs().max() > 0.01
    # texts run padded to a multiple of 4 give the same tokens for the fusion stack
    padded = tiny(fusion_reads_block=1, text_pad_multiple=4).eval()
    with torch.no_grad():
        torch.testing.assert_close(padded.encode_text(ids, mask, bmm=False, for_fusion=True)[0], fusion_text,
                                   rtol=1e-5, atol=1e-5)
    # The ITM loss then trains the blocks up to the one read and the norm, not the later blocks; reading the
    # output tokens (the default, which adds no parameter), it trains them all.
    for reads, later_block_trained in ((1, False), (0, True)):
        model = tiny(fusion_reads_block=reads).train()
        tokens, _ = model.encode_image(images, for_fusion=True)
        words, _, kept = model.encode_text_with_mask(ids, mask, for_fusion=True)
        model.itm_logits(words, kept, tokens)[:, 1].sum().backward()
        assert model.encoder.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
        assert (model.encoder.blocks[1].attn.qkv.weight.grad is not None) == later_block_trained
        assert hasattr(model, "fusion_input_norm") == (reads == 1)


def test_fusion_reads_block_names_a_block_before_the_last_of_a_model_with_fusion():
    with pytest.raises(ModelConfigError, match=r"model.fusion_reads_block must be 0 \(the output tokens\) or a "
                                               r"block 1..1 of the 2-block encoder, got 2"):
        IVTConfig(**TINY, fusion_layers=1, fusion_reads_block=2)
    with pytest.raises(ModelConfigError, match="fusion_reads_block is set but model.fusion_layers is 0"):
        IVTConfig(**TINY, fusion_reads_block=1)


def test_residual_itm_adds_the_pairs_cosine_over_temperature_without_gradient():
    plain, residual = tiny().eval(), tiny(itm_residual=True).eval()
    residual.load_state_dict(plain.state_dict())
    image_tokens, image_feat, text_tokens, text_feat, mask = encoded_pairs(residual, 4, padded_row=2, kept=5)
    head = plain.itm_logits(text_tokens, mask, image_tokens)
    cosine = torch.nn.functional.cosine_similarity(text_feat, image_feat, dim=-1)
    expected = head + torch.stack([torch.zeros(4), cosine / residual.temperature], dim=1)
    features = (text_feat, image_feat)
    torch.testing.assert_close(residual.itm_logits(text_tokens, mask, image_tokens, features=features), expected)
    with pytest.raises(ValueError, match="itm_residual: itm_logits needs the pairs' global features"):
        residual.itm_logits(text_tokens, mask, image_tokens)
    # A residual head that has learnt nothing (zero output) scores pairs in the cosine's own order.
    torch.nn.init.zeros_(residual.itm_head.weight)
    torch.nn.init.zeros_(residual.itm_head.bias)
    pairs = residual.itm_logits(text_tokens[[0, 0, 0, 0]], mask[[0, 0, 0, 0]], image_tokens,
                                features=(text_feat[[0, 0, 0, 0]], image_feat))
    margin = pairs[:, 1] - pairs[:, 0]
    assert margin.argsort().tolist() == (text_feat[0] @ torch.nn.functional.normalize(image_feat, dim=-1).t()
                                         ).argsort().tolist()
    # The cosine is a fixed prior: the ITM loss trains the head only, never the features through it.
    assert not residual.cosine_prior(text_feat.requires_grad_(), image_feat).requires_grad


def test_mean_itm_pool_reads_the_mean_of_the_fused_real_text_tokens():
    model = tiny(itm_pool="mean").eval()
    image_tokens, _, text_tokens, _, mask = encoded_pairs(model, 3, padded_row=1, kept=4)
    fused = model.fuse(text_tokens, mask, image_tokens)
    by_hand = torch.stack([fused[0].mean(0), fused[1, :4].mean(0), fused[2].mean(0)])
    torch.testing.assert_close(model.itm_logits(text_tokens, mask, image_tokens), model.itm_head(by_hand))
    # cls reads token 0 only: the two pools differ on the same weights.
    cls = tiny().eval()
    cls.load_state_dict(model.state_dict())
    torch.testing.assert_close(cls.itm_logits(text_tokens, mask, image_tokens), cls.itm_head(fused[:, 0]))
    with pytest.raises(ModelConfigError, match="model.itm_pool must be one of cls | mean, got 'max'"):
        IVTConfig(**{**TINY, "itm_pool": "max"})


def test_attention_matches_a_brute_force_reference_with_key_padding():
    torch.manual_seed(1)
    attn = Attention(16, 4)
    x = torch.randn(2, 5, 16)
    keep = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    out = attn(x, keep[:, None, None, :])
    q, k, v = attn.qkv(x).reshape(2, 5, 3, 4, 4).permute(2, 0, 3, 1, 4)
    scores = q @ k.transpose(-1, -2) / 2.0  # head dim 4 -> scale 4 ** -0.5
    scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
    ref = attn.proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 5, 16))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_appending_padding_does_not_change_text_features(pool):
    model = tiny(feature_pool=pool).eval()
    ids = torch.randint(1, 50, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    padded_ids = torch.cat([ids, torch.zeros(2, 4, dtype=torch.long)], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(2, 4, dtype=torch.long)], dim=1)
    tokens, feat = model.encode_text(ids, mask)
    padded_tokens, padded_feat = model.encode_text(padded_ids, padded_mask)
    torch.testing.assert_close(padded_feat, feat, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(padded_tokens[:, :6], tokens, atol=1e-5, rtol=1e-5)
    # The same padding left visible does change the feature, so the comparison above has teeth.
    _, unmasked_feat = model.encode_text(padded_ids, torch.ones_like(padded_mask))
    assert (unmasked_feat - feat).abs().max() > 1e-3


def test_fusion_ignores_padded_text_and_masked_image_tokens():
    model = tiny().eval()
    text = torch.randn(2, 5, 32)
    image = torch.randn(2, 7, 32)
    text_mask = torch.ones(2, 5, dtype=torch.long)
    fused = model.fuse(text, text_mask, image)
    padded_text = torch.cat([text, torch.randn(2, 3, 32)], dim=1)
    padded_mask = torch.cat([text_mask, torch.zeros(2, 3, dtype=torch.long)], dim=1)
    extra_image = torch.cat([image, torch.randn(2, 4, 32)], dim=1)
    image_mask = torch.cat([torch.ones(2, 7), torch.zeros(2, 4)], dim=1)
    fused_padded = model.fuse(padded_text, padded_mask, extra_image, image_mask)
    torch.testing.assert_close(fused_padded[:, :5], fused, atol=1e-5, rtol=1e-5)
    assert (model.fuse(text, text_mask, extra_image) - fused).abs().max() > 1e-3


def test_mlm_logits_equal_the_full_decoder_at_selected_positions():
    model = tiny().eval()
    text, image = torch.randn(2, 6, 32), torch.randn(2, 11, 32)
    mask = torch.ones(2, 6, dtype=torch.long)
    positions = torch.tensor([[0, 1, 0, 0, 1, 0], [1, 0, 0, 0, 0, 0]], dtype=torch.bool)
    full = model.mlm_head(model.fuse(text, mask, image))
    expected = torch.stack([full[0, 1], full[0, 4], full[1, 0]])
    torch.testing.assert_close(model.mlm_logits(text, mask, image, positions=positions), expected)


def _marked_tokens(batch: int, length: int, dim: int = 32) -> torch.Tensor:
    """x[b, n, :] = n, so the kept positions can be read back from the output."""
    return torch.arange(length, dtype=torch.float32)[None, :, None].expand(batch, length, dim).clone()


def test_bmm_drops_a_bounded_random_subset_keeping_cls_and_order():
    encoder = UnifiedEncoder(IVTConfig(**{**TINY, "bmm_ratio": 0.5}))
    length = 11
    max_drop = math.floor(0.5 * length)
    mask = torch.randint(0, 2, (3, length))
    torch.manual_seed(123)
    random.seed(0)
    seen_counts = set()
    for _ in range(200):
        out, kept_mask = encoder._drop_tokens(_marked_tokens(3, length), mask)
        positions = out[0, :, 0].long()
        seen_counts.add(length - positions.numel())
        assert positions[0] == 0  # CLS is never dropped
        assert torch.all(positions[1:] > positions[:-1])  # original order, no duplicates
        assert torch.equal(out[:, :, 0].long(), positions.expand(3, -1))  # same positions for the batch
        assert torch.equal(kept_mask, mask[:, positions])
    assert seen_counts == set(range(max_drop + 1))  # k is uniform on 0..floor(ratio*N): every value occurs


def test_bmm_follows_the_torch_seed_only():
    encoder = UnifiedEncoder(IVTConfig(**TINY))
    results = []
    for python_seed in (1, 2):
        torch.manual_seed(7)
        random.seed(python_seed)
        results.append([encoder._drop_tokens(_marked_tokens(1, 30), None)[0][0, :, 0] for _ in range(5)])
    for a, b in zip(*results):
        assert torch.equal(a, b)
    assert len({tuple(r.tolist()) for r in results[0]}) > 1  # successive calls draw afresh


def test_bmm_runs_only_in_training_with_bmm_enabled():
    ids = torch.randint(1, 50, (2, 20))
    mask = torch.ones(2, 20, dtype=torch.long)
    images = torch.randn(2, 3, 64, 32)
    model = tiny(bmm_ratio=0.5)

    def text_lengths(bmm: bool) -> set:
        return {model.encode_text_with_mask(ids, mask, bmm=bmm)[2].shape[1] for _ in range(8)}

    model.train()
    torch.manual_seed(0)
    lengths = text_lengths(True)
    assert min(lengths) >= 20 - 10 and len(lengths) > 1
    assert len({model.encode_image(images)[0].shape[1] for _ in range(8)}) > 1
    assert text_lengths(False) == {20}
    model.eval()
    assert text_lengths(True) == {20}
    assert model.encode_image(images)[0].shape[1] == 11
    no_bmm = tiny(bmm_ratio=0.0).train()
    assert no_bmm.encode_text_with_mask(ids, mask)[2].shape[1] == 20


def test_gradient_checkpointing_gives_the_same_outputs_and_gradients():
    plain = tiny(drop_path_rate=0.0, text_dropout=0.0, bmm_ratio=0.0).train()
    ckpt = tiny(drop_path_rate=0.0, text_dropout=0.0, bmm_ratio=0.0, grad_checkpointing=True).train()
    ckpt.load_state_dict(plain.state_dict())
    images, ids = torch.randn(2, 3, 64, 32), torch.randint(1, 50, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    for model in (plain, ckpt):
        (model.encode_image(images)[1].sum() + model.encode_text(ids, mask)[1].square().sum()).backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters()):
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, msg=name)


def test_build_model_from_attribute_config_and_init():
    cfg = SimpleNamespace(
        input=SimpleNamespace(image_size=[64, 32]),
        model=SimpleNamespace(embed_dim=64, depth=2, num_heads=4, mlp_ratio=4.0, patch_size=16, stride=16,
                              qkv_bias=True, drop_path_rate=0.1, vocab_size=100, max_text_positions=32,
                              type_vocab_size=2, text_dropout=0.1, pad_token_id=0, bmm_ratio=0.2,
                              fusion_layers=0, temperature_init=0.5, grad_checkpointing=False,
                              text_pad_multiple=0, feature_pool="cls", itm_residual=False, itm_pool="cls",
                              fusion_reads_block=0))
    torch.manual_seed(0)
    model = build_model(cfg)
    assert not model.has_fusion and not hasattr(model, "itm_head")
    assert model.temperature.shape == () and model.temperature.item() == 0.5
    assert model.encoder.pos_embed.shape == (1, 4 * 2 + 1, 64)
    assert model.encoder.blocks[0].mlp_txt.fc1.out_features == 256
    with pytest.raises(RuntimeError, match="fusion_layers=0"):
        model.fuse(torch.zeros(1, 2, 64), None, torch.zeros(1, 3, 64))
    # Init: LayerNorm 1/0, Linear biases 0, weights trunc-normal(0.02), padding embedding row 0.
    block = model.encoder.blocks[1]
    assert torch.all(block.norm1.weight == 1) and torch.all(block.norm1.bias == 0)
    assert torch.all(block.attn.qkv.bias == 0)
    words = model.encoder.embeddings.word_embeddings.weight
    assert torch.all(words[0] == 0)
    for weight in (block.mlp_vis.fc1.weight, words[1:], model.encoder.pos_embed):
        assert abs(weight.std().item() - 0.02) < 0.003


def test_fusion_stack_parameter_names_follow_bert():
    names = set(dict(FusionStack(num_layers=1, hidden_size=32, num_heads=4, intermediate_size=64,
                                 image_width=48).named_parameters()))
    expected = {f"layer.0.{part}.{kind}" for kind in ("weight", "bias") for part in (
        "attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
        "attention.output.LayerNorm", "crossattention.self.query", "crossattention.self.key",
        "crossattention.self.value", "crossattention.output.dense", "crossattention.output.LayerNorm",
        "intermediate.dense", "output.dense", "output.LayerNorm")}
    assert names == expected


def test_feature_pool_takes_the_cls_token_or_the_mean_of_the_real_tokens():
    model = tiny(feature_pool="mean").eval()
    ids = torch.randint(1, 50, (2, 7))
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    tokens, feature = model.encode_text(ids, mask)
    torch.testing.assert_close(feature[0], tokens[0].sum(0) / 7)
    torch.testing.assert_close(feature[1], tokens[1, :4].sum(0) / 4)
    image_tokens, image_feature = model.encode_image(torch.randn(2, 3, 64, 32))
    torch.testing.assert_close(image_feature, image_tokens.sum(1) / image_tokens.shape[1])
    # The same weights with pool "cls" give token 0: only the pooling differs.
    model_cls = tiny(feature_pool="cls").eval()
    model_cls.load_state_dict(model.state_dict())
    tokens_cls, feature_cls = model_cls.encode_text(ids, mask)
    torch.testing.assert_close(tokens_cls, tokens)
    torch.testing.assert_close(feature_cls, tokens[:, 0])
    with pytest.raises(ValueError, match="model.feature_pool must be one of cls | mean, got 'max'"):
        IVTConfig(feature_pool="max")


def test_bad_inputs_raise_clear_errors():
    model = tiny().eval()
    with pytest.raises(ValueError, match=r"\[B, 3, 64, 32\]"):
        model.encode_image(torch.randn(1, 3, 64, 48))
    with pytest.raises(ValueError, match="max_text_positions=24"):
        model.encode_text(torch.ones(1, 30, dtype=torch.long), None)
    with pytest.raises(ValueError, match="mask shape"):
        model.encode_text(torch.ones(1, 5, dtype=torch.long), torch.ones(1, 4))


def test_model_config_defaults_are_the_yaml_defaults():
    from utils.config import load_config

    assert IVTConfig.from_config(load_config()) == IVTConfig()
    with pytest.raises(ValueError, match="model.bmm_ratio"):
        IVTConfig(bmm_ratio=1.0)
