"""What a ranking can be trusted with (engine.calibration) and the ITM negatives that make the head worth using:
hand-checked statistics, the blend never below cosine where its weight was chosen, the sampler's new limits."""
from __future__ import annotations

import math

import pytest
import torch

from engine.calibration import (blend_evidence, blend_grid, blend_scores, calibrate_no_match, choose_blend_weight,
                                clauses_of, first_clause, flagged, held_out_rates, held_out_spread, is_no_match,
                                itm_pair_accuracy, match_statistic, no_match_measure, no_match_rates,
                                no_match_thresholds, people_halves, quantile_for_new_people, short_queries,
                                sign_test_p, threshold_at)
from models.losses import sample_hard_negatives
from utils.config import ConfigError, load_config
from utils.metrics import retrieval_metrics, selection_value


def test_first_clause_is_what_a_person_types():
    assert first_clause("The man has on a green collared shirt, and red shorts.") == \
        "The man has on a green collared shirt"
    assert first_clause("A man. He wears a red coat, black pants.") == "A man. He wears a red coat"
    assert first_clause("a woman in a blue coat") == "a woman in a blue coat"
    assert first_clause("  red coat.  ") == "red coat"


def test_every_clause_of_a_caption_is_a_short_query():
    assert clauses_of("The lady wears a blue overcoat, and blue shorts. She has a green backpack on her back.") == \
        ["The lady wears a blue overcoat", "and blue shorts", "She has a green backpack on her back"]
    # the description of a caption that opens with the scene is in its later parts
    assert clauses_of("In this picture, a young guy is seen from the side. He wears a green shirt.") == \
        ["In this picture", "a young guy is seen from the side", "He wears a green shirt"]
    # a part under 3 words runs on to the next mark; a short tail joins the part before it
    assert clauses_of("A man. He wears a red coat, black pants.") == ["A man. He wears a red coat, black pants"]
    assert clauses_of("a woman in a blue coat") == ["a woman in a blue coat"]
    assert clauses_of("  red coat.  ") == ["red coat"]
    texts, owner = short_queries(["a man in red, blue jeans and a cap", "a woman"], "clauses")
    assert texts == ["a man in red", "blue jeans and a cap", "a woman"] and owner.tolist() == [0, 0, 1]
    texts, owner = short_queries(["a man in red, blue jeans and a cap", "a woman"], "first_clause")
    assert texts == ["a man in red", "a woman"] and owner.tolist() == [0, 1]
    with pytest.raises(ValueError, match="no_match_short_queries"):
        short_queries(["a man"], "sentences")


def test_the_short_queries_are_measured_as_queries_about_their_captions_person():
    """Two people, one picture each; both captions open with the scene. Their first clauses find one right answer
    between them (a coin toss of "In this picture"), every clause finds three, each measured against its own
    caption's person."""
    feature = {"In this picture": [0.6, 0.8], "a man in a red coat": [1.0, 0.1],
               "a woman in a blue dress": [0.1, 1.0]}
    captions = ["In this picture, a man in a red coat", "In this picture, a woman in a blue dress"]
    text_feats = torch.tensor([[1.0, 0.2], [0.2, 1.0]])
    image_feats, pids = torch.eye(2), torch.tensor([0, 1])
    encoded: list[str] = []

    def encode(texts):
        encoded.extend(texts)
        return torch.tensor([feature[t] for t in texts])

    def calibrated(how: str) -> dict:
        ev = load_config(None, [f"eval.no_match_short_queries={how}"]).eval
        return calibrate_no_match(encode, captions, text_feats, image_feats, pids, pids, 8, ev, None)

    by_clauses = calibrated("clauses")
    assert encoded == ["In this picture", "a man in a red coat", "In this picture", "a woman in a blue dress"]
    assert by_clauses["short_queries"]["queries_answered_right"] == 3  # all but the man's "In this picture"
    assert by_clauses["short_queries"]["absent_queries"] == 4
    assert by_clauses["full_captions"]["queries_answered_right"] == 2
    assert by_clauses["short_queries_from"] == "every clause of each caption"
    assert "every clause" in by_clauses["calibrated_on"]
    # two people: each split fits on one and reads the other; carried with the rule, not measured again
    held_out = by_clauses["held_out"]
    assert (held_out["splits"], held_out["people_fitted"]) == (100, 1) and held_out["splits_kept"] == 100
    ev = load_config(None, ["eval.no_match_held_out_splits=7"]).eval
    carried = calibrate_no_match(encode, captions, text_feats, image_feats, pids, pids, 8, ev, by_clauses)
    assert carried["held_out"] == held_out and carried["thresholds"] == by_clauses["thresholds"]
    # applied, a carried rule is compared with the others at its own fitted quantile, not searched for again
    assert carried["every_rule"]["cosine"]["thresholds"] == by_clauses["thresholds"]
    off = load_config(None, ["eval.no_match_held_out_splits=0", "eval.no_match_quantile_on=fitted_people"]).eval
    unmeasured = calibrate_no_match(encode, captions, text_feats, image_feats, pids, pids, 8, off, None)
    assert unmeasured["held_out"] is None and unmeasured["fitted_quantile"] == unmeasured["quantile"] == 0.08
    with pytest.raises(ConfigError, match="no_match_held_out_splits"):
        load_config(None, ["eval.no_match_held_out_splits=-1"])
    with pytest.raises(ConfigError, match="new_people"):  # the default needs the half-splits
        load_config(None, ["eval.no_match_held_out_splits=0"])
    encoded.clear()
    by_first = calibrated("first_clause")
    assert encoded == ["In this picture", "In this picture"]
    assert by_first["short_queries"]["queries_answered_right"] == 1  # the woman's: "In this picture" leans to her
    with pytest.raises(ConfigError, match="no_match_short_queries"):
        load_config(None, ["eval.no_match_short_queries=sentences"])


def _people_record(right_scores: dict[int, list[float]], words: int, absent_score: float) -> dict:
    """A no_match_measure record of right best answers only: each person's statistics, one query per score."""
    pids = [p for p, scores in right_scores.items() for _ in scores]
    n = len(pids)
    return {"present_cosine": torch.tensor([s for scores in right_scores.values() for s in scores]),
            "absent_cosine": torch.full((n,), absent_score), "right": torch.ones(n, dtype=torch.bool),
            "has_positive": torch.ones(n, dtype=torch.bool), "words": torch.full((n,), words),
            "pids": torch.tensor(pids)}


def _people_subset_by_hand(record: dict, people: set[int]) -> dict:
    keep = torch.tensor([int(p) in people for p in record["pids"]])
    return {k: v[keep] for k, v in record.items()}


def test_held_out_rates_refit_on_half_the_people_by_hand():
    """Four people whose right answers score alike: any two of them give the same thresholds (short queries: the
    0.25 quantile of 0.2, 0.2, 0.4, 0.4, ... is 0.35; whole captions: 0.575), which flag the other two's 0.2 and
    0.5, a quarter of their answers; their absent-person queries (0.3 short, 0.6 whole) are flagged, not flagged."""
    short = _people_record({p: [0.2, 0.4, 0.6, 0.8] for p in range(4)}, 3, 0.3)
    full = _people_record({p: [0.5, 0.6, 0.7, 0.9] for p in range(4)}, 12, 0.6)
    fitted = no_match_thresholds(_people_subset_by_hand(short, {0, 1}), _people_subset_by_hand(full, {0, 1}), 0.25,
                                 "cosine", (0.75, 0.25))["cosine"]
    assert fitted["words"] == [3.0, 12.0] and fitted["values"] == pytest.approx([0.35, 0.575])
    rates = held_out_rates(people_halves(short, full, 5), 0.25, "cosine", (0.75, 0.25))
    assert len(rates) == 5
    for split in rates:
        assert split["short_queries"]["right_top1_flagged"] == pytest.approx(25.0)
        assert split["short_queries"]["absent_not_flagged"] == pytest.approx(0.0)
        assert split["full_captions"]["right_top1_flagged"] == pytest.approx(25.0)
        assert split["full_captions"]["absent_not_flagged"] == pytest.approx(100.0)
        assert split["short_queries"]["queries_answered_right"] == 8  # two people's four answers: half held out
    spread = held_out_spread(rates, 5, 4)
    assert spread["short_queries"]["right_top1_flagged"] == pytest.approx([25.0] * 3)
    assert (spread["splits"], spread["splits_kept"], spread["people_fitted"]) == (5, 5, 2)


def test_held_out_rates_move_with_the_people_fitted():
    """Two people whose right answers score high (0.7, 0.8) and two low (0.3, 0.4), quantile 0.25: fitted on the
    high pair the threshold is 0.7 and flags every answer of the low pair (100%); on the low pair, 0.3 flags none
    (0%); on one of each, 0.375 flags the other low person's 0.3 (25%). Every split is one of those three; the
    percentiles say how far a split of people moves the rate."""
    scores = {0: [0.7, 0.8], 1: [0.7, 0.8], 2: [0.3, 0.4], 3: [0.3, 0.4]}
    short, full = _people_record(scores, 3, 0.0), _people_record(scores, 12, 0.0)
    rates = held_out_rates(people_halves(short, full, 60), 0.25, "cosine", (0.75, 0.25))
    seen = sorted({round(r["short_queries"]["right_top1_flagged"], 6) for r in rates})
    assert seen == [0.0, 25.0, 100.0]
    assert all(r["short_queries"]["right_top1_flagged"] == r["full_captions"]["right_top1_flagged"] for r in rates)
    # the same halves on every call (a seeded draw), another seed draws others
    assert rates == held_out_rates(people_halves(short, full, 60), 0.25, "cosine", (0.75, 0.25))
    order = [r["short_queries"]["right_top1_flagged"] for r in rates]
    assert order != [r["short_queries"]["right_top1_flagged"]
                     for r in held_out_rates(people_halves(short, full, 60, seed=1), 0.25, "cosine", (0.75, 0.25))]
    spread = held_out_spread(rates, 60, 4)["short_queries"]["right_top1_flagged"]
    assert spread == pytest.approx([0.0, 25.0, 100.0])  # 1 in 6 splits fits the low pair, 1 in 6 the high pair
    assert held_out_spread(rates, 60, 4)["short_queries"]["absent_not_flagged"] == pytest.approx([0.0] * 3)
    # one person: no half to fit on
    one = _people_record({0: [0.5, 0.6]}, 3, 0.0)
    assert held_out_rates(people_halves(one, one, 10), 0.25, "cosine", (0.75, 0.25)) == []
    assert held_out_spread([], 10, 1)["short_queries"]["right_top1_flagged"] is None


def test_the_quantile_for_new_people_by_hand():
    """Alike people: a half's threshold flags the other half's right answers as often as its own, so the quantile
    stays the share asked for. High and low people (as above): for any quantile above 0 a split flags 100% (fitted
    on the high pair), 0% (the low pair) or 25% (one of each) of the held-out answers, a mean M over the splits
    drawn; the whole split's rate on new people is read as (q + M) / 2, which meets 25% at q = 50% - M."""
    alike = {p: [0.2, 0.4, 0.6, 0.8] for p in range(4)}
    short, full = _people_record(alike, 3, 0.0), _people_record(alike, 12, 0.0)
    assert quantile_for_new_people(people_halves(short, full, 20), 0.25, "cosine", (0.75, 0.25)) == 0.25
    scores = {0: [0.7, 0.8], 1: [0.7, 0.8], 2: [0.3, 0.4], 3: [0.3, 0.4]}
    short, full = _people_record(scores, 3, 0.0), _people_record(scores, 12, 0.0)
    rates = held_out_rates(people_halves(short, full, 60), 0.1, "cosine", (0.75, 0.25))
    mean = sum(r["short_queries"]["right_top1_flagged"] for r in rates) / len(rates) / 100
    assert 0.25 < mean < 0.5  # held out, more than the 25% fitted
    fitted = quantile_for_new_people(people_halves(short, full, 60), 0.25, "cosine", (0.75, 0.25), steps=12)
    assert fitted == pytest.approx(0.5 - mean, abs=0.25 / 2 ** 12)


def test_calibration_fits_at_the_quantile_for_new_people():
    """The high and low people of the test above as features: one picture each, two one-clause captions each whose
    cosine with their own picture is 0.7 and 0.8 (0.3 and 0.4 for the low pair) and 0 with the others'. Fitted
    for val's own people (fitted_people), the threshold is the 0.25 quantile of the eight right answers, 0.375;
    for new people, that of the quantile quantile_for_new_people finds on the same answers, lower."""
    image_feats = torch.cat([torch.eye(4), torch.zeros(4, 1)], dim=1)
    cosines = [0.7, 0.8, 0.7, 0.8, 0.3, 0.4, 0.3, 0.4]
    text_feats = torch.tensor([[c if d == i // 2 else 0.0 for d in range(4)] + [math.sqrt(1 - c * c)]
                               for i, c in enumerate(cosines)])
    captions = [f"person {i // 2} caption {i}" for i in range(8)]
    query_pids, gallery_pids = torch.arange(8) // 2, torch.arange(4)
    by_text = dict(zip(captions, text_feats))

    def calibrated(on: str) -> dict:
        ev = load_config(None, ["eval.no_match_quantile=0.25", "eval.no_match_held_out_splits=60",
                                f"eval.no_match_quantile_on={on}"]).eval
        return calibrate_no_match(lambda texts: torch.stack([by_text[t] for t in texts]), captions, text_feats,
                                  image_feats, query_pids, gallery_pids, 8, ev, None)

    own = calibrated("fitted_people")
    assert own["fitted_quantile"] == 0.25
    assert own["thresholds"]["cosine"]["values"] == pytest.approx([0.375, 0.375])
    new = calibrated("new_people")
    record = _people_record({0: [0.7, 0.8], 1: [0.7, 0.8], 2: [0.3, 0.4], 3: [0.3, 0.4]}, 4, 0.0)
    expected = quantile_for_new_people(people_halves(record, record, 60), 0.25, "cosine", (0.75, 0.25))
    assert new["quantile"] == 0.25 and new["fitted_quantile"] == pytest.approx(expected) and expected < 0.2
    # the 0.3 and 0.4 of the eight sorted right answers, read at 7 x the fitted quantile
    assert new["thresholds"]["cosine"]["values"] == pytest.approx([0.3 + (7 * expected - 1) * 0.1] * 2)


def test_match_statistic_by_hand():
    scores = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.5, 0.5]])
    # row 0: mean 0.25, sample std sqrt((0.75^2 + 3 * 0.25^2) / 3) = 0.5, so (1 - 0.25) / 0.5 = 1.5
    assert match_statistic(scores).tolist() == pytest.approx([1.5, 0.0])
    assert match_statistic(scores, rule="cosine").tolist() == pytest.approx([1.0, 0.5])
    keep = torch.tensor([[False, True, True, True], [True, True, False, False]])
    assert match_statistic(scores, keep).tolist() == pytest.approx([0.0, 0.0])  # no spread left: 0
    assert match_statistic(scores, keep, "cosine").tolist() == pytest.approx([0.0, 0.5])
    with pytest.raises(ValueError, match="zscore"):
        match_statistic(scores, rule="both")


def test_no_match_rates_by_hand():
    # 2-d features: person 0 and person 1 each have one image; queries 0 and 1 point at their person, query 2
    # (person 1) points between both, query 3 (person 0) points the wrong way
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    gallery_pids = torch.tensor([0, 1, 2])
    texts = torch.tensor([[1.0, 0.1], [0.1, 1.0], [0.6, 0.8], [-1.0, 0.2]])
    query_pids = torch.tensor([0, 1, 1, 0])
    measured = no_match_measure(texts, images, query_pids, gallery_pids, chunk_size=3)
    measured["words"] = torch.tensor([4, 4, 4, 4])
    assert measured["right"].tolist() == [True, True, True, False]
    assert measured["has_positive"].tolist() == [True, True, True, True]
    q = torch.nn.functional.normalize(texts, dim=1)
    cosine = q @ images.t()
    assert measured["present_cosine"].tolist() == pytest.approx(cosine.max(dim=1).values.tolist())
    # absent: query 0 without image 0 has cosines [0.0995, -0.995]: best 0.0995
    assert float(measured["absent_cosine"][0]) == pytest.approx(0.1 / math.sqrt(1.01), abs=1e-4)
    # long captions score higher: the same queries, counted as 12 words, 0.1 higher
    longer = {**measured, "present_cosine": measured["present_cosine"] + 0.1, "words": torch.full((4,), 12)}
    thresholds = no_match_thresholds(measured, longer, 0.0, "cosine", (0.75, 0.25))  # lowest right: 0.8 and 0.9
    assert thresholds["cosine"]["words"] == [4.0, 12.0]
    assert thresholds["cosine"]["values"] == pytest.approx([0.8, 0.9])
    assert threshold_at(thresholds["cosine"], torch.tensor([2, 4, 8, 12, 40])).tolist() == \
        pytest.approx([0.8, 0.8, 0.85, 0.9, 0.9])
    fixed = {"cosine": {"words": [4.0, 12.0], "values": [0.79, 0.79]}}
    rates = no_match_rates(measured, fixed)
    assert rates["right_top1_flagged"] == 0.0 and rates["queries_answered_right"] == 3
    # absent best cosines: q0 0.0995, q1 0.0995, q2 0.6 (its person 1 removed, image 0 left), q3 0.98 (image 2)
    assert rates["absent_not_flagged"] == 25.0
    assert no_match_rates(measured, {"cosine": {"words": [4.0, 4.0], "values": [0.5, 0.5]}})["absent_not_flagged"] == 50.0
    both = no_match_thresholds(measured, longer, 0.5, "both", (0.75, 0.25))
    assert set(both) == {"zscore", "cosine"}
    assert flagged(measured, {"cosine": {"words": [0, 0], "values": [0.9, 0.9]},
                              "zscore": {"words": [0, 0], "values": [-10.0, -10.0]}}, "present").tolist() == \
        [False, False, True, False]
    no, stats, limits = is_no_match(cosine[2], {"thresholds": thresholds}, 8)
    assert no and stats["cosine"] == pytest.approx(0.8) and limits["cosine"] == pytest.approx(0.85)


def test_the_blend_at_weight_zero_is_the_cosine_ranking_and_never_loses_where_chosen():
    torch.manual_seed(0)
    texts, images = torch.randn(40, 8), torch.randn(30, 8)
    query_pids, gallery_pids = torch.randint(0, 10, (40,)), torch.arange(30) % 10
    cosine = torch.nn.functional.normalize(texts, dim=1) @ torch.nn.functional.normalize(images, dim=1).t()
    top_cos, top_idx = cosine.topk(6, dim=1)
    itm = torch.randn(40, 6) * 3 + 5
    assert torch.equal(blend_scores(top_cos, itm, 0.0), top_cos)
    # the ITM scores are rescaled to the cosine's spread: a huge logit scale changes nothing
    assert torch.allclose(blend_scores(top_cos, itm, 1.0), blend_scores(top_cos, itm * 100 - 7, 1.0), atol=1e-5)
    options = {"ap_formula": "standard", "without_positive": "exclude"}
    grid = blend_grid(texts, images, query_pids, gallery_pids, top_idx, itm, [0.0, 0.5, 2.0, 100.0], 7, options)
    plain = retrieval_metrics(texts, images, query_pids, gallery_pids, chunk_size=7, **options)
    assert grid[0.0]["R1"] == pytest.approx(plain["R1"]) and grid[0.0]["mAP"] == pytest.approx(plain["mAP"])
    for metric in ("R1", "mAP", "R1+mAP"):
        for alpha in (0.05, 1.0):
            chosen, _ = choose_blend_weight(grid, metric, alpha)
            assert selection_value(grid[chosen], metric) >= selection_value(plain, metric) - 1e-9
    tied = {0.0: {"R1": 10.0, "mAP": 5.0}, 1.0: {"R1": 10.0, "mAP": 5.0}}
    assert choose_blend_weight(tied, "R1") == (0.0, None)  # ties go to the cosine order


def test_sign_test_by_hand():
    assert sign_test_p(7, 0) == pytest.approx(1 / 128)
    assert sign_test_p(2, 1) == pytest.approx(4 / 8)  # 2 or 3 heads of 3: (3 + 1) / 8
    assert sign_test_p(9, 4) == pytest.approx(sum(math.comb(13, i) for i in range(9, 14)) / 2 ** 13)
    assert sign_test_p(0, 0) == 1.0 and sign_test_p(0, 5) == pytest.approx(1.0)
    assert sign_test_p(600, 400) == pytest.approx(
        sum(math.comb(1000, i) for i in range(600, 1001)) / 2 ** 1000, rel=1e-9)


def _per_query(first_hit_rank: list[int], ap: list[float]) -> dict:
    return {"first_hit_rank": torch.tensor(first_hit_rank), "ap": torch.tensor(ap)}


def test_a_blend_weight_needs_more_queries_it_ranks_better_than_chance_gives():
    # 20 queries: the cosine ranks the first 10 right at rank 1. Weight 1 also ranks queries 10-13 right and loses
    # query 0: 4 better, 1 worse (p = 6/32 = 0.1875). Weight 2 ranks queries 10-19 right and loses none: 10 better
    # (p = 1/1024). Bonferroni over the two non-zero weights: threshold 0.05 / 2 = 0.025.
    def entry(hits: list[int]) -> dict:
        ranks = [0 if q in hits else 3 for q in range(20)]
        return {"R1": 100.0 * len(hits) / 20, "mAP": 0.0, "per_query": _per_query(ranks, [0.0] * 20)}
    cosine = entry(list(range(10)))
    some = entry(list(range(1, 14)))
    many = entry(list(range(20)))
    assert blend_evidence(some, cosine, "R1") == {"better": 4, "worse": 1, "p_value": pytest.approx(6 / 32)}
    weight, evidence = choose_blend_weight({0.0: cosine, 1.0: some, 2.0: many}, "R1", 0.05)
    assert weight == 2.0 and evidence["better"] == 10 and evidence["threshold"] == pytest.approx(0.025)
    weight, evidence = choose_blend_weight({0.0: cosine, 1.0: some}, "R1", 0.05)
    assert weight == 0.0 and evidence["p_value"] == pytest.approx(6 / 32) and evidence["threshold"] == 0.05
    assert choose_blend_weight({0.0: cosine, 1.0: some}, "R1", 1.0) == (1.0, None)  # alpha 1: no test
    # mAP compares each query's AP: three queries gain a little, none loses
    flat = {"R1": 0.0, "mAP": 10.0, "per_query": _per_query([1] * 5, [0.1] * 5)}
    up = {"R1": 0.0, "mAP": 16.0, "per_query": _per_query([1] * 5, [0.2, 0.2, 0.2, 0.1, 0.1])}
    assert blend_evidence(up, flat, "mAP") == {"better": 3, "worse": 0, "p_value": pytest.approx(1 / 8)}
    assert blend_evidence(up, flat, "R1") == {"better": 0, "worse": 0, "p_value": 1.0}


def test_itm_pair_accuracy_by_hand():
    pids = torch.tensor([[7, 3, 7], [2, 2, 2]])  # query 1 has no wrong image in its top k: no pair
    query_pids = torch.tensor([7, 2])
    cosine = torch.tensor([[0.9, 0.8, 0.1], [0.5, 0.4, 0.3]])
    itm = torch.tensor([[1.0, 2.0, 2.0], [0.0, 0.0, 0.0]])
    acc = itm_pair_accuracy(pids, query_pids, cosine, itm)
    # pairs (right, wrong): (0, 1), (2, 1); cosine orders (0, 1) right and (2, 1) wrong; ITM (0, 1) wrong, (2, 1) tied
    assert acc == {"itm": 25.0, "cosine": 50.0, "pairs": 2, "queries": 1}


def test_negatives_from_the_top_k_never_false_and_floored():
    pids = torch.tensor([0, 1, 2, 3])
    sim = torch.tensor([[9.0, 5.0, 1.0, 0.0], [5.0, 9.0, 0.0, 1.0], [1.0, 0.0, 9.0, 5.0], [0.0, 1.0, 5.0, 9.0]])
    g = torch.Generator().manual_seed(0)
    for _ in range(20):  # top 1: always each anchor's most similar other person
        neg_img, neg_txt = sample_hard_negatives(sim, pids, pids, generator=g, top_k=1)
        assert neg_img.tolist() == [1, 0, 3, 2] and neg_txt.tolist() == [1, 0, 3, 2]
    never = torch.zeros(4, 4, dtype=torch.bool)
    never[0, 1] = never[1, 0] = True  # persons 0 and 1 have the same caption: no true non-match
    for _ in range(20):
        neg_img, neg_txt = sample_hard_negatives(sim, pids, pids, generator=g, top_k=1, never=never)
        assert neg_img[:2].tolist() == [2, 3] and neg_txt[:2].tolist() == [2, 3]
    everything = ~torch.eye(4, dtype=torch.bool)  # a row left with nothing keeps what ``never`` removed
    neg_img, _ = sample_hard_negatives(sim, pids, pids, generator=g, never=everything)
    assert (neg_img != torch.arange(4)).all()
    # the floor: with uniform-zero softmax mass far away, a higher floor draws the far negatives more often
    far = torch.tensor([[0.0, 30.0, -30.0], [30.0, 0.0, -30.0], [-30.0, -30.0, 0.0]])
    counts = {}
    for floor in (1e-5, 1e-1):
        g = torch.Generator().manual_seed(1)
        drawn = [int(sample_hard_negatives(far, torch.arange(3), torch.arange(3), generator=g, floor=floor)[1][0])
                 for _ in range(300)]
        counts[floor] = drawn.count(2)
    assert counts[1e-5] == 0 and counts[1e-1] > 0


def test_the_itm_hardness_ramp():
    from models.ivt import build_model
    from models.objectives import RetrievalObjective
    from utils.config import load_config

    cfg = load_config(None, ["model.embed_dim=32", "model.depth=1", "model.num_heads=2", "model.fusion_layers=1",
                             "loss.itm_weight=1.0", "loss.itm_negative_hardness=0.8",
                             "loss.itm_negative_hardness_ramp_epochs=4.0", "model.vit_weights=null",
                             "model.bert_weights=null"])
    objective = RetrievalObjective(build_model(cfg), cfg.loss)
    seen = []
    for epochs in (0.0, 1.0, 2.0, 4.0, 9.0):
        objective.set_progress(epochs)
        seen.append(objective.hardness())
    assert seen == pytest.approx([0.0, 0.2, 0.4, 0.8, 0.8])
    steady_cfg = cfg.replace(["loss.itm_negative_hardness_ramp_epochs=0"])
    steady = RetrievalObjective(build_model(steady_cfg), steady_cfg.loss)
    assert steady.hardness() == 0.8


def test_the_itm_objective_trains_the_same_pairs_with_the_chosen_loss(monkeypatch):
    from models.ivt import build_model
    from models.losses import itm_loss, itm_rank_loss, itm_targets
    from models.objectives import RetrievalObjective
    from utils.config import load_config

    base = ["model.embed_dim=32", "model.depth=1", "model.num_heads=2", "model.fusion_layers=1",
            "loss.itm_weight=1.0", "model.vit_weights=null", "model.bert_weights=null"]
    fused = torch.randn(12, 2, generator=torch.Generator().manual_seed(0))  # the 3 x 4 pairs' logits
    inputs = (torch.randn(4, 5, 32), torch.randn(4, 32), torch.randn(4, 6, 32), torch.randn(4, 32),
              torch.ones(4, 6, dtype=torch.long), torch.tensor([0, 0, 1, 1]), torch.tensor(0.07))
    losses = {}
    for objective_name in ("match", "rank"):
        cfg = load_config(None, base + [f"loss.itm_objective={objective_name}"])
        objective = RetrievalObjective(build_model(cfg), cfg.loss)
        monkeypatch.setattr(objective.model, "itm_logits", lambda *args, features: fused)
        losses[objective_name] = float(objective._itm(*inputs))
    assert losses == {"match": pytest.approx(float(itm_loss(fused, itm_targets(4, "cpu")))),
                      "rank": pytest.approx(float(itm_rank_loss(fused)))}
    cfg = load_config(None, base + ["loss.itm_objective=listwise"])
    with pytest.raises(ValueError, match="loss.itm_objective must be one of match | rank, got 'listwise'"):
        RetrievalObjective(build_model(cfg), cfg.loss)


def test_several_itm_negatives_per_anchor_pair_each_anchor_with_its_draws_and_weigh_them_1_over_n(monkeypatch):
    from models.ivt import build_model
    from models.losses import itm_loss, itm_rank_loss, itm_targets
    from models.objectives import RetrievalObjective
    from utils.config import load_config

    base = ["model.embed_dim=32", "model.depth=1", "model.num_heads=2", "model.fusion_layers=1",
            "loss.itm_weight=1.0", "model.vit_weights=null", "model.bert_weights=null", "loss.itm_negatives=2"]
    g = torch.Generator().manual_seed(0)
    fused = torch.randn(20, 2, generator=g)  # (1 + 2 x 2) x 4 pairs' logits
    # every token of item i is i, so each fused pair shows which text and image it joined
    image_tokens = torch.arange(4.0)[:, None, None].expand(4, 5, 32).clone()
    text_tokens = torch.arange(4.0)[:, None, None].expand(4, 6, 32).clone()
    pids = torch.tensor([0, 0, 1, 1])
    inputs = (image_tokens, torch.randn(4, 32, generator=g), text_tokens, torch.randn(4, 32, generator=g),
              torch.ones(4, 6, dtype=torch.long), pids, torch.tensor(0.07))
    seen, losses = [], {}
    for objective_name in ("match", "rank"):
        cfg = load_config(None, base + [f"loss.itm_objective={objective_name}"])
        objective = RetrievalObjective(build_model(cfg), cfg.loss)

        def fake_itm_logits(texts, masks, images, features):
            seen.append((texts[:, 0, 0].long(), images[:, 0, 0].long()))
            return fused
        monkeypatch.setattr(objective.model, "itm_logits", fake_itm_logits)
        losses[objective_name] = float(objective._itm(*inputs))
    weights = torch.tensor([1.0] * 4 + [0.5] * 16)
    assert losses == {"match": pytest.approx(float(itm_loss(fused, itm_targets(4, "cpu", 2), weights))),
                      "rank": pytest.approx(float(itm_rank_loss(fused, 2)))}
    texts, images = seen[0]
    assert texts[:4].tolist() == images[:4].tolist() == [0, 1, 2, 3]
    # rows 4-11: text b (draw-major) with two different images of the other person; rows 12-19: image b likewise
    assert texts[4:12].tolist() == [0, 1, 2, 3, 0, 1, 2, 3] and images[12:].tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    for anchors, drawn in ((texts[4:12], images[4:12]), (images[12:], texts[12:])):
        assert (pids[drawn] != pids[anchors]).all()
        assert (drawn[:4] != drawn[4:]).all()
    cfg = load_config(None, base[:-1] + ["loss.itm_negatives=0"])
    with pytest.raises(ValueError, match="loss.itm_negatives must be at least 1"):
        RetrievalObjective(build_model(cfg), cfg.loss)


def test_the_thresholds_flag_the_share_of_each_set_as_read_per_query():
    # 40 short queries of 4-12 words, 40 whole captions of 12-20, whole captions scoring 0.2 above short queries,
    # each set rising little with length (as measured); the ends' quantiles at the medians alone flag more of the
    # short set than asked (its longer half reads thresholds raised towards the whole captions'), the fitted ends
    # flag each set at the share as read
    g = torch.Generator().manual_seed(0)
    sets = []
    for low, base in ((4, 0.3), (12, 0.5)):
        words = torch.randint(low, low + 9, (40,), generator=g)
        sets.append({"present_cosine": base + 0.005 * words + 0.05 * torch.randn(40, generator=g),
                     "right": torch.ones(40, dtype=torch.bool), "words": words})
    fitted = no_match_thresholds(*sets, 0.1, "cosine", (0.5, 0.5))
    for m in sets:
        assert float(flagged(m, fitted, "present").float().mean()) == pytest.approx(0.1, abs=0.026)  # 4 of 40 +- 1
    median_ends = {"cosine": {"words": fitted["cosine"]["words"],
                              "values": [float(torch.quantile(m["present_cosine"], 0.1)) for m in sets]}}
    assert float(flagged(sets[0], median_ends, "present").float().mean()) > 0.3
    # the ends at the short queries' upper quartile of lengths and the whole captions' lower one
    quartiles = no_match_thresholds(*sets, 0.1, "cosine", (0.75, 0.25))["cosine"]
    assert quartiles["words"] == [float(torch.quantile(sets[0]["words"].float(), 0.75)),
                                  float(torch.quantile(sets[1]["words"].float(), 0.25))]


def test_no_threshold_end_goes_below_its_sets_lowest_right_answer():
    # share 0: no right answer may be flagged. Short queries of 2, 4 and 6 words (median 4) score 0.3, 0.4, 0.35,
    # whole captions of 12 words 0.9. The 6-word query would read 0.3 + (6 - 4) / (12 - 4) * (0.9 - 0.3) = 0.45:
    # to pass it the short end would have to fall to 1/6, below every short right answer (0.3); it stays at 0.3
    # and that query is flagged
    short = {"present_cosine": torch.tensor([0.3, 0.4, 0.35]), "right": torch.tensor([True] * 3),
             "words": torch.tensor([2, 4, 6])}
    full = {"present_cosine": torch.tensor([0.9, 0.9]), "right": torch.tensor([True] * 2),
            "words": torch.tensor([12, 12])}
    entry = no_match_thresholds(short, full, 0.0, "cosine", (0.5, 0.5))["cosine"]
    assert entry["words"] == [4.0, 12.0] and entry["values"] == pytest.approx([0.3, 0.9])
    assert flagged(short, {"cosine": entry}, "present").tolist() == [False, False, True]
    # the ends at the short queries' upper quartile (5 words) and the whole captions' lower one (12)
    assert no_match_thresholds(short, full, 0.0, "cosine", (0.75, 0.25))["cosine"]["words"] == [5.0, 12.0]
    # knots that cross (the short queries' longest past the whole captions' shortest) fall back to the medians
    # (torch's: the lower middle value)
    crossing = {**full, "words": torch.tensor([5, 12])}
    assert no_match_thresholds(short, crossing, 0.0, "cosine", (1.0, 0.0))["cosine"]["words"] == [4.0, 5.0]
