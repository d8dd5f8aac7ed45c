"""bench/bench_rerank_ceiling.py: which top-k images fit a caption, and the R@1 of a perfect attribute checker
(hand-made identities and rankings)."""
from __future__ import annotations

from dataclasses import replace

import torch

from bench.bench_rerank_ceiling import ceiling, fits_caption, within_query_spread
from datasets.synthetic.identities import Identity

ANNA = Identity(gender="woman", hair_length="long", hair_colour="brown", skin=0, upper_type="coat",
                upper_colour="blue", pattern="plain", lower_type="skirt", lower_colour="red", shoes_colour="black",
                bag="backpack", bag_colour="green", hat_colour=None, glasses=False, umbrella_colour=None)
PEOPLE = {1: ANNA, 2: replace(ANNA, lower_colour="gray"), 3: replace(ANNA, upper_colour="orange", gender="man"),
          4: replace(ANNA, shoes_colour="white")}


def test_the_verifier_moves_fitting_images_ahead_and_keeps_the_cosine_order_among_them():
    texts = ["A woman in a blue coat and a red skirt",  # person 1: only person 1 (and 4) fit
             "A woman in a blue coat",                  # person 1: 1, 2 and 4 fit
             "A woman in a blue coat and a gray skirt"]  # person 2
    query_pids = torch.tensor([1, 1, 2])
    candidates = torch.tensor([[3, 2, 1, 4],    # the wrong #1 contradicts gender and coat
                               [2, 1, 3, 4],    # the wrong #1 fits the caption: a tie nothing can break
                               [2, 3, 1, 4]])   # right at #1
    fits, named = fits_caption(texts, query_pids, candidates, PEOPLE)
    assert fits.tolist() == [[False, False, True, True], [True, True, False, True], [True, False, False, False]]
    out = ceiling(texts, query_pids, candidates, fits, named, PEOPLE)
    assert out["queries"] == 3 and out["right_in_top_k"] == 100.0
    assert out["cosine_R1"] == round(100 / 3, 2)
    # verifier order: query 0 -> [1, 4, 3, 2] (right), query 1 -> [2, 1, 4, 3] (wrong), query 2 -> 2 (right)
    assert out["verifier_R1"] == round(200 / 3, 2)
    assert out["wrong_first"] == 2 and out["wrong_first_fits"] == 1
    assert out["wrong_first_contradicts"] == {"gender": 1, "upper": 1}
    assert out["fields_named"] == {"gender": 3, "upper": 3, "lower": 2}


def test_within_query_spread_ignores_each_querys_offset():
    prior = torch.tensor([[2.0, 0.0], [11.0, 9.0]])  # both queries spread +-1 about their means
    head = torch.tensor([[-5.5, -4.5], [3.0, 3.0]])  # query 0 against the prior by 0.5, query 1 flat
    # deviations: prior (1, -1, 1, -1), head (-0.5, 0.5, 0, 0): root mean squares 1 and 0.5 / sqrt(2); pooled
    # correlation -1 / (2 x sqrt(0.5)) = -0.707 (query 1's flat head weakens it)
    assert within_query_spread(prior, head) == {"prior_std": 1.0, "head_std": 0.354, "correlation": -0.707}
