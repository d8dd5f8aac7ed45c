"""Switches of the training step for speed (train.optimizer_impl, loss.itm_negative_check, model.text_pad_multiple):
each keeps the fp32 CPU results (bit for bit where the arithmetic allows), and the step reads nothing back on the
host that a GPU would wait for."""
from __future__ import annotations

import pytest
import torch

from models.config import IVTConfig
from models.flops import TokenCounter
from models.ivt import IVT
from models.losses import sample_hard_negatives
from models.objectives import RetrievalObjective
from utils.config import load_config
from bench.host_sync import HostSyncCounter
from utils.optim import build_optimizer

TINY = dict(img_size=(32, 16), patch_size=8, stride=8, embed_dim=32, depth=2, num_heads=2, vocab_size=60,
            max_text_positions=32, drop_path_rate=0.1, text_dropout=0.1)
LOSSES = {"cmpm_weight": 1.0, "itc_weight": 0.0, "itm_weight": 0.0, "mlm_weight": 0.0, "itc_normalize": False,
          "gather_features": False}


def _batch(records=4, views=3, levels=3, length=11, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    pids = torch.arange(records) // 2
    ids = torch.randint(5, 60, (levels * records, length), generator=g)
    ids[:, 0] = 2
    lengths = torch.randint(3, length + 1, (levels * records,), generator=g)
    mask = (torch.arange(length)[None] < lengths[:, None]).long()
    mask[0] = 1  # one text of the full length: the batch is padded to its longest
    ids = ids * mask
    return {"images": torch.randn(views * records, 3, 32, 16, generator=g), "image_pids": pids.repeat(views),
            "text_ids": ids, "text_mask": mask, "text_pids": pids.repeat(levels), "pids": pids,
            "caption_ids": ids[:records].clone(), "caption_mask": mask[:records].clone()}


def _train(steps: int, model_overrides=None, loss_overrides=None, train_overrides=(), seed=0):
    """Parameters after ``steps`` SGD steps of the tiny model, and the losses on the way."""
    torch.manual_seed(seed)
    model = IVT(IVTConfig(**{**TINY, **(model_overrides or {})}))
    objective = RetrievalObjective(model, {**LOSSES, **(loss_overrides or {})}).train()
    cfg = load_config(None, ["train.optimizer=sgd", "train.lr=0.05", *train_overrides])
    optimizer = build_optimizer(model, cfg.train)
    losses = []
    for step in range(steps):
        out = objective(_batch(seed=step))
        loss = sum(v for k, v in out.items() if k.endswith("_loss"))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, losses, optimizer


def test_foreach_sgd_is_bit_identical_and_fused_agrees_to_rounding():
    default, losses, optimizer = _train(3)
    foreach, foreach_losses, foreach_opt = _train(3, train_overrides=["train.optimizer_impl=foreach"])
    fused, _, fused_opt = _train(3, train_overrides=["train.optimizer_impl=fused"])
    assert foreach_opt.defaults["foreach"] is True and fused_opt.defaults["fused"] is True
    assert not optimizer.defaults.get("foreach") and not optimizer.defaults.get("fused")
    assert losses == foreach_losses
    for key in default:
        assert torch.equal(default[key], foreach[key]), key
        torch.testing.assert_close(default[key], fused[key], rtol=1e-5, atol=1e-6, msg=key)


def _step_syncs(model_overrides, loss_overrides, batch_extra=None) -> HostSyncCounter:
    torch.manual_seed(0)
    model = IVT(IVTConfig(**{**TINY, "fusion_layers": 1, **model_overrides}))
    objective = RetrievalObjective(model, {**LOSSES, **loss_overrides}).train()
    optimizer = build_optimizer(model, load_config(None, ["train.optimizer_impl=foreach"]).train)
    batch = {**_batch(), **(batch_extra or {})}
    with HostSyncCounter() as syncs:
        out = objective(batch)
        sum(v for k, v in out.items() if k.endswith("_loss")).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return syncs


def test_the_itm_step_has_no_host_sync_with_the_device_side_check():
    itm = {"itm_weight": 1.0, "itc_weight": 1.0}
    host = _step_syncs({"bmm_ratio": 0.0}, {**itm, "itm_negative_check": "host"})
    assert host.total == 1 and "_check_every_row_has_a_negative" in next(iter(host.sites))
    device = _step_syncs({"bmm_ratio": 0.0}, {**itm, "itm_negative_check": "device"})
    assert device.total == 0, device.sites
    several = _step_syncs({"bmm_ratio": 0.0}, {**itm, "itm_negative_check": "device", "itm_negatives": 3})
    assert several.total == 0, several.sites


def test_swapped_caption_negatives_add_no_host_sync():
    batch = _batch()
    rows = torch.tensor([0, 2])  # the collator's layout: the items that have a swap, and their swapped captions
    swap_ids = batch["caption_ids"][rows].clone()
    swap_ids[:, [1, 2]] = swap_ids[:, [2, 1]]
    extra = {"swap_rows": rows, "swap_ids": swap_ids, "swap_mask": batch["caption_mask"][rows].clone()}
    losses = {"itm_weight": 1.0, "itc_weight": 1.0, "itc_normalize": True, "itm_negative_check": "device",
              "itm_swap_words": ["red", "blue"], "itc_swap_negatives": True}
    syncs = _step_syncs({"bmm_ratio": 0.0}, losses, extra)
    assert syncs.total == 0, syncs.sites


def test_the_fine_tuning_step_reads_back_only_its_host_side_bmm_draws():
    assert _step_syncs({"bmm_ratio": 0.0}, {}).total == 0
    # BMM draws its drop count and positions on the CPU generator (host tensors by design, no device wait).
    with_bmm = _step_syncs({"bmm_ratio": 0.2}, {})
    assert with_bmm.total > 0 and all("_drop_tokens" in site for site in with_bmm.sites), with_bmm.sites


def test_device_side_negative_check_still_catches_a_batch_of_one_identity():
    pids = torch.zeros(4, dtype=torch.long)
    with pytest.raises(RuntimeError, match="no negative"):
        sample_hard_negatives(torch.randn(4, 4), pids, pids, check="device")
    with pytest.raises(ValueError, match="check must be"):
        sample_hard_negatives(torch.randn(4, 4), pids + torch.arange(4), pids + torch.arange(4), check="later")
    # Same draws either way.
    sim, pids = torch.randn(6, 6), torch.arange(6) // 2
    a = sample_hard_negatives(sim, pids, pids, torch.Generator().manual_seed(1), check="host")
    b = sample_hard_negatives(sim, pids, pids, torch.Generator().manual_seed(1), check="device")
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_text_padding_to_a_multiple_keeps_bmm_draws_and_outputs():
    torch.manual_seed(0)
    plain = IVT(IVTConfig(**{**TINY, "drop_path_rate": 0.0, "text_dropout": 0.0})).train()
    padded = IVT(IVTConfig(**{**TINY, "drop_path_rate": 0.0, "text_dropout": 0.0, "text_pad_multiple": 8})).train()
    padded.load_state_dict(plain.state_dict())
    batch = _batch(length=11)
    lengths = []
    for model in (plain, padded):
        counter = TokenCounter()
        torch.manual_seed(5)  # the same BMM draws
        with counter.attach(model.encoder):
            outs = [model.encode_text_with_mask(batch["text_ids"], batch["text_mask"]) for _ in range(6)]
        lengths.append([n for _, n in counter.sequences])
        if model is plain:
            reference = outs
    assert all(n % 8 == 0 for n in lengths[1]) and len(set(lengths[1])) < len(set(lengths[0]))
    assert [-(-n // 8) * 8 for n in lengths[0]] == lengths[1]  # each batch padded after the same drop
    for (tokens, feats, mask), (ref_tokens, ref_feats, ref_mask) in zip(outs, reference):
        assert tokens.shape == ref_tokens.shape and torch.equal(mask, ref_mask)
        torch.testing.assert_close(tokens, ref_tokens, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(feats, ref_feats, rtol=1e-5, atol=1e-5)


def test_text_padding_trains_like_the_unpadded_model():
    plain, plain_losses, _ = _train(3)
    padded, padded_losses, _ = _train(3, model_overrides={"text_pad_multiple": 16})
    assert plain_losses == pytest.approx(padded_losses, rel=1e-5)
    for key in plain:
        torch.testing.assert_close(plain[key], padded[key], rtol=1e-4, atol=1e-5, msg=key)
