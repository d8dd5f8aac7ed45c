"""What a config's ``task`` means for the rest of the code, resolved once: ``TaskPlan.from_config(cfg)``.

``task: retrieval`` trains and evaluates on one person-retrieval dataset (``data.format`` in ``data.root``) with
P x K identity batches of ``input.num_views`` views. ``task: pretrain`` trains on image-caption corpora
(``data.pretrain_corpora``) with one view per record in plainly shuffled batches, and evaluates zero-shot on
``data.eval_format`` in ``data.eval_root`` when one is given. Code asks the plan and never tests ``cfg.task``
itself, so a new task is one more branch here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

SyntheticSet = tuple[str, str, str, int]  # (root, format, style, identities) of a synthetic dataset to write


@dataclass(frozen=True)
class TaskPlan:
    """Which records train, which dataset evaluates, how batches are drawn and what synthesis writes."""

    task: str
    train_on_corpora: bool  # records from data.pretrain_corpora; else the train split of the evaluated dataset
    eval_format: str  # the format of the evaluated dataset (data.format, or data.eval_format when pretraining)
    eval_root: Optional[str]  # its folder; None when pretraining has no zero-shot set
    eval_annotation_file: Optional[str]  # data.annotation_file (retrieval only)
    identity_batches: bool  # P x K identity batches (sampler.num_instances), input.num_views views, text.levels
    views_per_record: int  # images per training record in a batch
    synthetic_sets: tuple[SyntheticSet, ...]  # what data.synthesize_if_missing writes when absent

    @classmethod
    def from_config(cls, cfg: Any) -> "TaskPlan":
        data = cfg.data
        if cfg.task == "pretrain":
            synthetic = [(data.root, "pretrain", data.synthetic_style, data.synthetic_num_ids)]
            if data.eval_root:
                synthetic.append((data.eval_root, data.eval_format, data.eval_synthetic_style,
                                  data.eval_synthetic_num_ids))
            return cls(cfg.task, True, str(data.eval_format), data.eval_root or None, None, False, 1,
                       tuple(synthetic))
        return cls(cfg.task, False, str(data.format), data.root, data.annotation_file, True,
                   int(cfg.input.num_views), ((data.root, data.format, data.synthetic_style, data.synthetic_num_ids),))
