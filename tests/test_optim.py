import math

import pytest
import torch

from utils.config import load_config
from utils.optim import build_optimizer, build_scheduler, set_schedule


def test_bias_groups_and_sgd_settings():
    cfg = load_config(None)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    opt = build_optimizer(model, cfg.train)
    assert isinstance(opt, torch.optim.SGD)
    weights, biases = opt.param_groups
    assert len(weights["params"]) == 2 and len(biases["params"]) == 2
    assert weights["lr"] == pytest.approx(0.005) and biases["lr"] == pytest.approx(0.01)
    assert weights["momentum"] == 0.9 and weights["weight_decay"] == biases["weight_decay"] == 1e-4


# The authors' learning rates per epoch (docs/recipe.md, optimisation), weight group and bias group.
@pytest.mark.parametrize("epoch, weight_lr, bias_lr", [
    (0, 5e-5, 5e-5), (1, 1.04e-3, 2.04e-3), (5, 4.979e-3, 9.957e-3), (30, 4.269e-3, None),
    (60, 2.505e-3, None), (90, 7.41e-4, None), (120, 1e-5, 1e-5),
])
def test_epoch_schedule_matches_the_authors(epoch, weight_lr, bias_lr):
    cfg = load_config(None)
    opt = build_optimizer(torch.nn.Linear(2, 2), cfg.train)
    scheduler = build_scheduler(opt, cfg.train, steps_per_epoch=100)
    set_schedule(scheduler, cfg.train, epoch, global_step=0)
    assert opt.param_groups[0]["lr"] == pytest.approx(weight_lr, rel=2e-3)
    if bias_lr is not None:
        assert opt.param_groups[1]["lr"] == pytest.approx(bias_lr, rel=2e-3)


def test_step_schedule_is_smooth_and_ends_at_min_lr():
    cfg = load_config(None, ["train.schedule_unit=step", "train.epochs=2", "train.warmup_epochs=1"])
    opt = build_optimizer(torch.nn.Linear(2, 2), cfg.train)
    scheduler = build_scheduler(opt, cfg.train, steps_per_epoch=10)
    lrs = []
    for step in range(21):
        set_schedule(scheduler, cfg.train, step // 10, step)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(5e-5)
    assert lrs[5] == pytest.approx(5e-5 + 0.5 * (0.005 - 5e-5))  # halfway through warmup
    assert all(a < b for a, b in zip(lrs[:9], lrs[1:10]))  # rising during warmup
    assert lrs[20] == pytest.approx(1e-5)


def _lrs(overrides, steps_per_epoch=10, per_step=False):
    cfg = load_config(None, overrides)
    opt = build_optimizer(torch.nn.Linear(2, 2), cfg.train)
    scheduler = build_scheduler(opt, cfg.train, steps_per_epoch=steps_per_epoch)
    lrs = []
    for step in range(cfg.train.epochs * steps_per_epoch):
        if per_step or step % steps_per_epoch == 0:
            set_schedule(scheduler, cfg.train, step // steps_per_epoch, step)
            lrs.append(opt.param_groups[0]["lr"])
    return lrs


def test_epoch_offset_reads_the_schedule_ahead():
    plain = _lrs(["train.epochs=10", "train.schedule_epochs=9"])
    ahead = _lrs(["train.epochs=9", "train.schedule_epochs=9", "train.schedule_epoch_offset=1"])
    assert ahead == plain[1:]  # the same curve, starting one epoch later
    assert plain[0] == pytest.approx(5e-5) and ahead[0] == pytest.approx(5e-5 + (0.005 - 5e-5) / 5)
    assert ahead[-2] == pytest.approx(1e-5 + 0.5 * (0.005 - 1e-5) * (1 + math.cos(math.pi * 8 / 9)))
    assert ahead[-1] == pytest.approx(1e-5)  # the last epoch reads t = T = 9: min_lr, as the authors' t = 120


def test_step_mode_offset_is_whole_epochs_of_steps():
    common = ["train.schedule_unit=step", "train.epochs=3", "train.warmup_epochs=1", "train.schedule_epochs=3"]
    plain = _lrs(common, per_step=True)
    ahead = _lrs(common + ["train.schedule_epoch_offset=1"], per_step=True)
    assert ahead[:20] == plain[10:]
    assert ahead[20:] == [pytest.approx(1e-5)] * 10  # past T: min_lr


def test_schedule_length_defaults_to_epochs_and_is_checked():
    assert _lrs(["train.epochs=6"]) == _lrs(["train.epochs=6", "train.schedule_epochs=6"])
    assert _lrs(["train.epochs=6"]) != _lrs(["train.epochs=6", "train.schedule_epochs=12"])
    for bad in (["train.schedule_epochs=0"], ["train.schedule_epochs=abc"], ["train.schedule_epoch_offset=-1"]):
        cfg = load_config(None, bad)
        with pytest.raises(ValueError, match="train.schedule_epoch"):
            build_scheduler(build_optimizer(torch.nn.Linear(2, 2), cfg.train), cfg.train, steps_per_epoch=5)


def test_batch_scaling_message_and_the_opt_in_linear_rule():
    from utils.optim import batch_scaling_message, effective_lr

    cfg = load_config(None)  # the authors' reference: 4 GPUs x 28 = 112 at lr 0.005
    assert batch_scaling_message(cfg.train, 4) is None and effective_lr(cfg.train, 4) == 0.005
    message = batch_scaling_message(cfg.train, 1)
    assert "global batch 28 (1 process(es) x train.batch_size_per_gpu 28 x train.grad_accum_steps 1)" in message
    assert "the linear rule gives lr 0.00125" in message and "training with 0.005" in message
    assert build_optimizer(torch.nn.Linear(2, 2), cfg.train, world_size=1).param_groups[0]["lr"] == 0.005
    scaled = load_config(None, ["train.scale_lr_with_batch=true", "train.grad_accum_steps=2"])
    weights, biases = build_optimizer(torch.nn.Linear(2, 2), scaled.train, world_size=1).param_groups
    assert weights["lr"] == pytest.approx(0.0025) and biases["lr"] == pytest.approx(0.005)  # 56 / 112, bias x2
    assert "training with the linearly scaled lr 0.0025" in batch_scaling_message(scaled.train, 1)
    assert batch_scaling_message(load_config(None, ["train.reference_batch_size=null"]).train, 1) is None
    rstp = load_config("configs/rstp.yaml")
    assert batch_scaling_message(rstp.train, 1) is None  # the authors' RSTPReid run: 1 GPU x 48
    with pytest.raises(Exception, match="reference_batch_size"):
        load_config(None, ["train.reference_batch_size=0"])


def test_config_warnings_come_from_rank_0_once(monkeypatch, caplog):
    overrides = ["train.epochs=2", "train.warmup_epochs=4"]
    monkeypatch.setenv("RANK", "1")
    with caplog.at_level("WARNING"):
        load_config(None, overrides)
    assert "never leaves warmup" not in caplog.text
    monkeypatch.setenv("RANK", "0")
    with caplog.at_level("WARNING"):
        load_config(None, overrides)
        load_config(None, overrides)
    assert caplog.text.count("never leaves warmup") == 1
