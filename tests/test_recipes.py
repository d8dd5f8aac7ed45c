"""Recipe-level settings that decide results: model selection metric and the per-dataset learning-rate schedule."""
from __future__ import annotations

from pathlib import Path

import pytest

from utils.config import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
FULL_SIZE = ["cuhkpedes", "icfg", "rstp", "cuhkpedes_rerank", "icfg_rerank", "rstp_rerank", "pretrain"]
DEMOS = ["demo", "demo_rerank"]


def recipe(name: str):
    return load_config(CONFIGS / f"{name}.yaml")


def test_every_recipe_is_covered():
    assert sorted(p.stem for p in CONFIGS.glob("*.yaml") if p.stem != "base") == sorted(FULL_SIZE + DEMOS)


@pytest.mark.parametrize("name", FULL_SIZE)
def test_full_size_recipes_select_on_the_mean_of_r1_and_map(name):
    from utils.engine import selection_score

    metric = recipe(name).eval.selection_metric
    assert metric == "R1+mAP"
    assert selection_score({"t2i": {"R1": 61.0, "mAP": 40.0, "R5": 99.0}}, metric) == pytest.approx(50.5)


@pytest.mark.parametrize("name", DEMOS)
def test_demos_keep_selecting_on_r1(name):
    from utils.engine import selection_score

    metric = recipe(name).eval.selection_metric
    assert metric == "R1"
    assert selection_score({"t2i": {"R1": 61.0, "mAP": 40.0}}, metric) == 61.0
