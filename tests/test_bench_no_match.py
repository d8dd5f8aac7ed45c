"""bench/bench_no_match.py: which attributes a synthetic caption names, which absent-person queries are about
nobody, and the per-subset rates (hand-made identities and scores)."""
from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from bench.bench_no_match import about_nobody, clauses, compare, gap, measure, named_attributes, per_query, rates_of
from datasets.synthetic.identities import Identity

ANNA = Identity(gender="woman", hair_length="long", hair_colour="brown", skin=0, upper_type="coat",
                upper_colour="blue", pattern="plain", lower_type="skirt", lower_colour="red", shoes_colour="black",
                bag="backpack", bag_colour="green", hat_colour=None, glasses=False, umbrella_colour=None)


def test_named_attributes_reads_what_the_caption_says():
    named = named_attributes("A woman wears a blue overcoat and a red short skirt. She has a green backpack on "
                             "her back.", ANNA)
    assert named == {"gender": "woman", "upper": ("coat", "blue"), "lower": ("skirt", "red"),
                     "bag": ("backpack", "green")}
    # a garment word of another type, or a colour on another garment, names nothing
    assert named_attributes("The person has on a blue jacket, black shoes.", ANNA) == {"shoes": "black"}
    assert named_attributes("The person is walking", ANNA) == {}
    assert named_attributes("this lady with long brown hair", ANNA) == {"gender": "woman",
                                                                        "hair": ("long", "brown")}


def test_about_nobody_needs_every_named_attribute_of_someone_else():
    twin_coat = replace(ANNA, lower_colour="gray")  # the same blue coat, other skirt
    man = replace(ANNA, gender="man", upper_colour="orange")
    people = {1: ANNA, 2: twin_coat, 3: man}
    captions = ["A woman in a blue coat", "A woman in a blue coat and a red skirt", "The person is walking",
                "A woman in a blue coat"]
    # queries 1-3 are person 1's: person 2 shares the coat, not the skirt, and everyone fits "the person is
    # walking"; query 4 is person 2's, whose coat person 1 wears too
    nobody = about_nobody(captions, [1, 1, 1, 2], [1, 1, 2, 3], people)
    assert nobody.tolist() == [False, True, False, False]
    assert about_nobody(["A woman in a blue coat"], [2], [2, 3], people).tolist() == [True]  # person 1 gone


def test_rates_split_absent_queries_by_whether_they_fit_someone():
    # 4 queries, each the only query of its person; gallery: one image per person
    texts = torch.eye(4)
    images = torch.eye(4)
    measured = measure(["a b"] * 4, texts, images, torch.arange(4), torch.arange(4))
    assert measured["right"].tolist() == [True] * 4 and measured["words"].tolist() == [2] * 4
    # absent: each query's best left is 0 (orthogonal); flagged below 0.5, all four
    thresholds = {"cosine": {"words": [0.0, 0.0], "values": [0.5, 0.5]}}
    nobody = torch.tensor([True, True, False, False])
    rates = rates_of(measured, thresholds, nobody)
    assert rates["right_top1_flagged"] == 0.0 and rates["absent_not_flagged"] == 0.0
    assert rates["absent_queries_about_nobody"] == 2 and rates["absent_not_flagged_fits_someone"] == 0.0
    assert measured["absent_gap@2"].tolist() == pytest.approx([0.0] * 4)
    assert measured["present_gap@2"].tolist() == pytest.approx([1.0] * 4)


def test_gap_by_hand():
    scores = torch.tensor([[0.9, 0.8, 0.5, 0.1], [0.3, 0.3, 0.3, 0.3]])
    assert gap(scores, None, 2).tolist() == pytest.approx([0.1, 0.0])
    assert gap(scores, None, 3).tolist() == pytest.approx([0.4, 0.0])
    assert gap(scores, None, 8).tolist() == pytest.approx([0.8, 0.0])  # fewer than the rank: the lowest
    keep = torch.tensor([[False, True, True, False], [True, False, False, False]])
    # row 0 keeps 0.8 and 0.5; row 1 keeps one score: no gap
    assert gap(scores, keep, 2).tolist() == pytest.approx([0.3, 0.0])
    assert gap(scores, keep, 16).tolist() == pytest.approx([0.3, 0.0])


def test_clauses_are_the_parts_a_right_person_must_fit():
    assert clauses("The person is walking, wearing a pink shirt, green shorts.") == \
        ["The person is walking", "wearing a pink shirt", "green shorts"]
    assert clauses("A man with long hair wears a blue coat and red shorts.") == \
        ["A man", "long hair wears a blue coat", "red shorts"]
    assert clauses("coat") == ["coat"]  # nothing of two words: the whole text


def test_rules_are_fitted_for_new_people_as_evaluate_fits_its_own():
    """Two people whose right answers score high (0.7, 0.8) and two low (0.3, 0.4), one picture each: fitted for
    val's own people the cosine rule's threshold is the 0.25 quantile of the eight right answers, 0.375; for new
    people (evaluate.py's default) each rule is fitted at the quantile quantile_for_new_people finds for its own
    statistics on val's people, lower here, and the threshold with it."""
    from engine.calibration import people_halves, quantile_for_new_people

    image_feats = torch.cat([torch.eye(4), torch.zeros(4, 1)], dim=1)
    cosines = [0.7, 0.8, 0.7, 0.8, 0.3, 0.4, 0.3, 0.4]
    text_feats = torch.tensor([[c if d == i // 2 else 0.0 for d in range(4)] + [math.sqrt(1 - c * c)]
                               for i, c in enumerate(cosines)])
    texts = [f"person {i // 2} caption {i}" for i in range(8)]

    def measured() -> dict:
        m = measure(texts, text_feats, image_feats, torch.arange(8) // 2, torch.arange(4))
        return {**m, "about_nobody": None}

    sets = {split: {"short": measured(), "full": measured()} for split in ("val", "test")}
    assert sets["val"]["short"]["pids"].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    own = compare(sets, 0.25, 10.0, (0.75, 0.25), "fitted_people")
    assert own["quantile_on"] == "fitted_people" and own["rules"]["cosine"]["fitted_quantile"] == 0.25
    assert own["rules"]["cosine"]["thresholds"]["cosine"]["values"] == pytest.approx([0.375, 0.375])

    sets = {split: {"short": measured(), "full": measured()} for split in ("val", "test")}
    new = compare(sets, 0.25, 10.0, (0.75, 0.25), "new_people", 60)
    record = per_query(sets["val"]["short"])
    for rule in ("cosine", "cosine+zscore"):
        expected = quantile_for_new_people(people_halves(record, record, 60), 0.25, "", (0.75, 0.25),
                                           statistics=rule.split("+"))
        assert new["rules"][rule]["fitted_quantile"] == pytest.approx(expected)
    assert new["rules"]["cosine"]["fitted_quantile"] < 0.2 and new["held_out_splits"] == 60
    assert max(new["rules"]["cosine"]["thresholds"]["cosine"]["values"]) < 0.375
