"""The task plan: what each task means for records, evaluation, batches and synthesis, resolved from a config."""
from __future__ import annotations

import dataclasses

import pytest

from utils.config import load_config
from utils.task_plan import TaskPlan


def test_retrieval_trains_and_evaluates_on_one_dataset_in_identity_batches():
    cfg = load_config(None, ["data.format=rstp", "data.root=data/r", "input.num_views=2",
                             "data.synthetic_num_ids=30", "data.synthetic_style=street"])
    plan = TaskPlan.from_config(cfg)
    assert plan == TaskPlan(task="retrieval", train_on_corpora=False, eval_format="rstp", eval_root="data/r",
                            eval_annotation_file=None, identity_batches=True, views_per_record=2,
                            synthetic_sets=(("data/r", "rstp", "street", 30),))


@pytest.mark.parametrize("eval_root", [None, "data/zs"])
def test_pretraining_trains_on_corpora_with_one_view_and_evaluates_zero_shot_when_given(eval_root):
    extra = [f"data.eval_root={eval_root}", "data.eval_format=icfg", "data.eval_synthetic_num_ids=7"] if eval_root else []
    cfg = load_config(None, ["task=pretrain", "data.root=data/p", "data.synthetic_num_ids=9", *extra])
    plan = TaskPlan.from_config(cfg)
    assert (plan.task, plan.train_on_corpora, plan.identity_batches, plan.views_per_record) == ("pretrain", True,
                                                                                                False, 1)
    assert plan.eval_root == eval_root and plan.eval_annotation_file is None
    assert plan.eval_format == ("icfg" if eval_root else "cuhkpedes")  # the default data.eval_format
    wanted = [("data/p", "pretrain", cfg.data.synthetic_style, 9)]
    if eval_root:
        wanted.append(("data/zs", "icfg", cfg.data.eval_synthetic_style, 7))
    assert plan.synthetic_sets == tuple(wanted)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.task = "retrieval"  # type: ignore[misc]
