"""Recipe-level settings that decide results: model selection metric and the per-dataset learning-rate schedule."""
from __future__ import annotations

from pathlib import Path

import pytest

from utils.config import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
FULL_SIZE = ["cuhkpedes", "icfg", "rstp", "cuhkpedes_rerank", "icfg_rerank", "rstp_rerank", "pretrain"]
DEMOS = ["demo", "demo_rerank", "demo_pretrain", "demo_finetune"]


def recipe(name: str):
    return load_config(CONFIGS / f"{name}.yaml")


def test_every_recipe_is_covered():
    assert sorted(p.stem for p in CONFIGS.glob("*.yaml") if p.stem != "base") == sorted(FULL_SIZE + DEMOS)


def test_the_pipeline_fine_tuning_is_the_demo_recipe_run_longer():
    """The pipeline's table gives the 24-epoch demo recipe from random weights and from the pretraining (its runs
    were made as demo.yaml train.epochs=24): that is demo_finetune.yaml only while the two differ in nothing else."""
    demo, finetune = recipe("demo").to_dict(), recipe("demo_finetune").to_dict()
    assert (demo["train"]["epochs"], finetune["train"]["epochs"]) == (12, 24)
    for cfg in (demo, finetune):
        del cfg["train"]["epochs"], cfg["output_dir"]
    assert finetune == demo


@pytest.mark.parametrize("name", FULL_SIZE)
def test_full_size_recipes_select_on_the_mean_of_r1_and_map(name):
    from engine.evaluation import selection_score

    metric = recipe(name).eval.selection_metric
    assert metric == "R1+mAP"
    assert selection_score({"t2i": {"R1": 61.0, "mAP": 40.0, "R5": 99.0}}, metric) == pytest.approx(50.5)


@pytest.mark.parametrize("name", DEMOS)
def test_demos_keep_selecting_on_r1(name):
    from engine.evaluation import selection_score

    metric = recipe(name).eval.selection_metric
    assert metric == "R1"
    assert selection_score({"t2i": {"R1": 61.0, "mAP": 40.0}}, metric) == 61.0


# ------------------------------------------------------------------------------------ learning-rate schedule
# The authors' schedule, stepped once per epoch: SGD lr 5e-3 (biases 1e-2); for t < 5 the warmup
# 5e-5 + t * (lr - 5e-5) / 5, then 1e-5 + (lr - 1e-5) * (1 + cos(pi * t / 120)) / 2, which is 1e-5 at t = 120.
# Their CUHK-PEDES loop reads t = 1..120 (120 epochs); ICFG-PEDES, RSTPReid and pretraining read t = 0..120
# (121 epochs). Table: t -> (weight lr, bias lr), evaluated from that formula.
AUTHORS_LR = {
    0: (5.0e-5, 5.0e-5), 1: (1.04e-3, 2.04e-3), 2: (2.03e-3, 4.03e-3), 3: (3.02e-3, 6.02e-3),
    118: (1.34193e-5, 1.68455e-5), 119: (1.08550e-5, 1.17117e-5), 120: (1.0e-5, 1.0e-5),
}
FIRST_AND_LAST_T = {
    "cuhkpedes": (120, [1, 2, 3, 118, 119, 120]),
    "icfg": (121, [0, 1, 2, 118, 119, 120]),
    "rstp": (121, [0, 1, 2, 118, 119, 120]),
    "pretrain": (121, [0, 1, 2, 118, 119, 120]),
}
FIRST_AND_LAST_T.update({f"{name}_rerank": FIRST_AND_LAST_T[name] for name in ("cuhkpedes", "icfg", "rstp")})


def authors_lr(t: int, base: float) -> float:
    import math

    if t < 5:
        return 5e-5 + t * (base - 5e-5) / 5
    return 1e-5 + 0.5 * (base - 1e-5) * (1 + math.cos(math.pi * min(t, 120) / 120))


def lrs_per_epoch(cfg, steps_per_epoch: int = 7) -> list[tuple[float, float]]:
    """(weight lr, bias lr) of every epoch, set the way the engine sets them at the start of each epoch."""
    import torch

    from utils.optim import build_optimizer, build_scheduler, set_schedule

    optimizer = build_optimizer(torch.nn.Linear(3, 2), cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train, steps_per_epoch)
    out = []
    for epoch in range(cfg.train.epochs):
        set_schedule(scheduler, cfg.train, epoch, epoch * steps_per_epoch)
        out.append((optimizer.param_groups[0]["lr"], optimizer.param_groups[1]["lr"]))
    return out


@pytest.mark.parametrize("name", sorted(FIRST_AND_LAST_T))
def test_recipe_lr_schedule_is_the_authors(name):
    cfg = recipe(name)
    epochs, ts = FIRST_AND_LAST_T[name]
    assert cfg.train.schedule_unit == "epoch" and cfg.train.epochs == epochs
    lrs = lrs_per_epoch(cfg)
    for (weight, bias), t in zip(lrs[:3] + lrs[-3:], ts):
        assert weight == pytest.approx(AUTHORS_LR[t][0], rel=1e-5), (t, weight)
        assert bias == pytest.approx(AUTHORS_LR[t][1], rel=1e-5), (t, bias)
    # and every epoch in between
    offset = ts[0]
    for epoch, (weight, bias) in enumerate(lrs):
        assert weight == pytest.approx(authors_lr(epoch + offset, 0.005), rel=1e-9)
        assert bias == pytest.approx(authors_lr(epoch + offset, 0.01), rel=1e-9)


@pytest.mark.parametrize("name", DEMOS)
def test_demo_schedule_is_unchanged(name):
    """The demos (step-wise schedule) read it exactly as before the offset and length keys existed."""
    import torch
    from timm.scheduler import CosineLRScheduler

    from utils.optim import build_optimizer, build_scheduler, set_schedule

    cfg = recipe(name)
    assert cfg.train.schedule_unit == "step" and cfg.train.schedule_epoch_offset == 0
    steps = 9
    optimizer = build_optimizer(torch.nn.Linear(3, 2), cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train, steps)
    before = build_optimizer(torch.nn.Linear(3, 2), cfg.train)
    reference = CosineLRScheduler(before, t_initial=cfg.train.epochs * steps, lr_min=cfg.train.min_lr,
                                  warmup_t=cfg.train.warmup_epochs * steps, warmup_lr_init=cfg.train.warmup_lr_init,
                                  warmup_prefix=False, cycle_limit=1, t_in_epochs=False)
    seen = []
    for step in range(cfg.train.epochs * steps + 1):
        set_schedule(scheduler, cfg.train, step // steps, step)
        reference.step_update(step)
        assert [g["lr"] for g in optimizer.param_groups] == [g["lr"] for g in before.param_groups], step
        seen.append(optimizer.param_groups[0]["lr"])
    assert seen[0] == pytest.approx(cfg.train.warmup_lr_init) and seen[-1] == pytest.approx(cfg.train.min_lr)
