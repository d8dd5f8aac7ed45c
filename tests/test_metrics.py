"""Retrieval metrics against a brute-force reference and hand-made rankings."""
import pytest
import torch
import torch.nn.functional as F

from utils.metrics import (
    apply_rerank,
    format_metrics_table,
    rank_statistics,
    retrieval_metrics,
    topk_indices,
)


def brute_force(scores, query_pids, gallery_pids, ks=(1, 5, 10)):
    """Per-query reference in plain Python: sort by (-score, index), then count."""
    per_query = []
    for row, qp in zip(scores, query_pids):
        order = sorted(range(len(row)), key=lambda j: (-row[j], j))
        hits = [gallery_pids[j] == qp for j in order]
        n_pos = sum(hits)
        if n_pos == 0:
            per_query.append(None)
            continue
        hit_ranks = [r for r, h in enumerate(hits) if h]
        ap = sum((i + 1) / (r + 1) for i, r in enumerate(hit_ranks)) / n_pos
        per_query.append(
            {
                "first": hit_ranks[0],
                "ap": ap,
                "inp": n_pos / (hit_ranks[-1] + 1),
                "hits": [hit_ranks[0] < k for k in ks],
                "n_pos": n_pos,
            }
        )
    valid = [p for p in per_query if p is not None]
    summary = {f"R{k}": 100.0 * sum(p["hits"][i] for p in valid) / len(valid) for i, k in enumerate(ks)}
    summary["mAP"] = 100.0 * sum(p["ap"] for p in valid) / len(valid)
    summary["mINP"] = 100.0 * sum(p["inp"] for p in valid) / len(valid)
    summary["num_queries_without_positive"] = len(per_query) - len(valid)
    return per_query, summary


def random_case(seed, num_q=37, num_g=23, num_ids=5, decimals=1):
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(num_q, num_g, generator=g)
    scores = torch.round(scores * 10**decimals) / 10**decimals  # many ties
    query_pids = torch.randint(0, num_ids + 1, (num_q,), generator=g)  # id num_ids is absent from the gallery
    gallery_pids = torch.randint(0, num_ids, (num_g,), generator=g)
    return scores, query_pids, gallery_pids


def score_hook(scores):
    return lambda sim, rows: scores[rows.start : rows.stop].to(sim.device)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rank_statistics_matches_brute_force(seed):
    scores, qp, gp = random_case(seed)
    ref, _ = brute_force(scores.tolist(), qp.tolist(), gp.tolist())
    stats = rank_statistics(scores, qp, gp, ks=(1, 5, 10))
    assert any(r is None for r in ref) and any(r is not None and r["n_pos"] > 1 for r in ref)
    for i, r in enumerate(ref):
        if r is None:
            assert stats["num_positives"][i] == 0 and stats["first_hit_rank"][i] == -1
            assert not stats["hits"][i].any()
            continue
        assert stats["num_positives"][i] == r["n_pos"]
        assert stats["first_hit_rank"][i] == r["first"]
        assert stats["ap"][i].item() == pytest.approx(r["ap"], rel=1e-6)
        assert stats["inp"][i].item() == pytest.approx(r["inp"], rel=1e-6)
        assert stats["hits"][i].tolist() == r["hits"]


@pytest.mark.parametrize("chunk_size", [1, 5, 16, 37, 1000])
def test_retrieval_metrics_chunks_match_brute_force(chunk_size):
    scores, qp, gp = random_case(seed=4, num_q=37, num_g=29, decimals=1)
    _, expected = brute_force(scores.tolist(), qp.tolist(), gp.tolist())
    feats_q, feats_g = torch.randn(37, 4), torch.randn(29, 4)  # replaced by the hook
    got = retrieval_metrics(feats_q, feats_g, qp, gp, chunk_size=chunk_size, score_fn=score_hook(scores))
    assert got["num_queries"] == 37 and got["num_gallery"] == 29
    assert got["num_queries_without_positive"] == expected["num_queries_without_positive"] > 0
    for key in ("R1", "R5", "R10", "mAP", "mINP"):
        assert got[key] == pytest.approx(expected[key], rel=1e-6), key


def test_retrieval_metrics_cosine_from_features():
    g = torch.Generator().manual_seed(7)
    qf, gf = torch.randn(50, 8, generator=g) * 3.0, torch.randn(20, 8, generator=g)
    qp, gp = torch.randint(0, 6, (50,), generator=g), torch.arange(20) % 6
    cos = (F.normalize(qf.double(), dim=1) @ F.normalize(gf.double(), dim=1).t()).tolist()
    _, expected = brute_force(cos, qp.tolist(), gp.tolist())
    got = retrieval_metrics(qf, gf, qp, gp, chunk_size=7)
    for key in ("R1", "R5", "R10", "mAP", "mINP"):
        assert got[key] == pytest.approx(expected[key], rel=1e-6), key
    # without normalisation the gallery norms change the ranking
    raw = (qf.double() @ gf.double().t()).tolist()
    _, expected_raw = brute_force(raw, qp.tolist(), gp.tolist())
    got_raw = retrieval_metrics(qf, gf, qp, gp, chunk_size=7, normalize=False)
    assert got_raw["mAP"] == pytest.approx(expected_raw["mAP"], rel=1e-6)
    assert got_raw["mAP"] != pytest.approx(got["mAP"], rel=1e-3)


def test_hand_made_ranking():
    scores = torch.tensor(
        [
            [0.9, 0.8, 0.7, 0.6, 0.5],  # positives at ranks 1 and 3
            [0.1, 0.2, 0.3, 0.4, 0.5],  # positive (index 4) at rank 0
            [0.5, 0.5, 0.5, 0.5, 0.5],  # all tied: positive at index 2 -> rank 2
            [0.9, 0.1, 0.2, 0.3, 0.4],  # pid 9: no positive in the gallery
        ]
    )
    qp = torch.tensor([1, 2, 3, 9])
    gp = torch.tensor([0, 1, 3, 1, 2])
    stats = rank_statistics(scores, qp, gp, ks=(1, 3))
    assert stats["first_hit_rank"].tolist() == [1, 0, 2, -1]
    assert stats["num_positives"].tolist() == [2, 1, 1, 0]
    # AP: (1/2 + 2/4) / 2; 1; 1/3.  INP: 2/4; 1; 1/3
    assert stats["ap"].tolist() == pytest.approx([0.5, 1.0, 1 / 3, 0.0])
    assert stats["inp"].tolist() == pytest.approx([0.5, 1.0, 1 / 3, 0.0])
    assert stats["hits"].tolist() == [[False, True], [True, True], [False, True], [False, False]]

    got = retrieval_metrics(torch.zeros(4, 2), torch.zeros(5, 2), qp, gp, ks=(1, 3), score_fn=score_hook(scores))
    assert got["R1"] == pytest.approx(100 / 3)
    assert got["R3"] == pytest.approx(100.0)
    assert got["mAP"] == pytest.approx(100 * (0.5 + 1 + 1 / 3) / 3)
    assert got["mINP"] == pytest.approx(100 * (0.5 + 1 + 1 / 3) / 3)
    assert got["num_queries_without_positive"] == 1


def test_tie_rule_is_gallery_index_ascending():
    # a positive tied with a negative ranks first only if its gallery index is lower
    scores = torch.tensor([[0.3, 0.7, 0.7], [0.3, 0.7, 0.7]])
    stats = rank_statistics(scores, torch.tensor([1, 2]), torch.tensor([0, 1, 2]), ks=(1,))
    assert stats["first_hit_rank"].tolist() == [0, 1]


def test_no_query_with_positive_is_an_error():
    with pytest.raises(ValueError, match="none of the 3 queries"):
        retrieval_metrics(torch.randn(3, 4), torch.randn(5, 4), torch.tensor([7, 8, 9]), torch.arange(5))


def test_nan_scores_are_rejected():
    with pytest.raises(ValueError, match="NaN"):
        rank_statistics(torch.tensor([[0.1, float("nan")]]), torch.tensor([0]), torch.tensor([0, 1]))


def test_topk_indices_matches_full_sort_with_ties():
    g = torch.Generator().manual_seed(2)
    gf = torch.randn(12, 5, generator=g)
    gf[7] = gf[3]  # identical gallery items tie for every query
    gf[10] = gf[3] * 2.0  # same direction: ties after normalisation
    qf = torch.cat([gf[3:4], torch.randn(10, 5, generator=g)])
    scores, idx = topk_indices(qf, gf, k=4, chunk_size=3)
    assert scores.shape == (11, 4) and idx.shape == (11, 4)
    assert idx[0, :3].tolist() == [3, 7, 10]
    sim = (F.normalize(qf, dim=1) @ F.normalize(gf, dim=1).t()).tolist()
    for r in range(11):
        ref = sorted(range(12), key=lambda j: (-sim[r][j], j))[:4]
        assert idx[r].tolist() == ref
    with pytest.raises(ValueError, match="k must be in 1..12"):
        topk_indices(qf, gf, k=13)


def test_apply_rerank_by_hand():
    sim = torch.tensor([[0.1, 0.9, 0.5, 0.3], [0.2, 0.4, 0.6, 0.8]])
    idx = torch.tensor([[1, 2], [0, 3]])
    new = torch.tensor([[-3.0, 2.0], [5.0, 5.0]])
    out = apply_rerank(sim, idx, new)
    assert torch.equal(out[0, [0, 3]], sim[0, [0, 3]]) and torch.equal(out[1, [1, 2]], sim[1, [1, 2]])
    assert out[0, 2] > out[0, 1] > sim[0].max()  # order of the new scores, all above the rest
    # equal new scores: the first-stage score decides (0.8 of index 3 before 0.2 of index 0), not the index
    assert out[1, 3] > out[1, 0] > sim[1].max()
    assert torch.equal(sim, torch.tensor([[0.1, 0.9, 0.5, 0.3], [0.2, 0.4, 0.6, 0.8]]))  # input untouched
    order = torch.sort(out, dim=1, descending=True, stable=True).indices
    assert order.tolist() == [[2, 1, 3, 0], [3, 0, 2, 1]]
    with pytest.raises(ValueError, match="repeat an index"):
        apply_rerank(sim, torch.tensor([[1, 1], [0, 3]]), new)


def test_apply_rerank_ties_by_cosine_then_index_and_never_merges_close_scores():
    sim = torch.tensor([[0.30, 0.70, 0.70, 0.10, 0.90]])
    idx = torch.tensor([[4, 2, 1, 0, 3]])
    new = torch.tensor([[1.0, 2.0, 2.0, 2.0, 1.0 + 1e-7]])  # a three-way tie and two scores 1 ulp apart
    order = torch.sort(apply_rerank(sim, idx, new), dim=1, descending=True, stable=True).indices[0].tolist()
    # the tie 2.0 among indices 2, 1, 0: cosine 0.7, 0.7, 0.3, so 1 before 2 (index) and 0 last of the three;
    # 1.0 + 1e-7 (index 3) stays above 1.0 (index 4) even though both lift to the same magnitude
    assert order == [1, 2, 0, 3, 4]
    # the margin holds for large first-stage scores too
    big = apply_rerank(sim * 1e6, idx, new)
    assert torch.sort(big, dim=1, descending=True, stable=True).indices[0].tolist() == [1, 2, 0, 3, 4]


def brute_force_trapezoidal(scores, query_pids, gallery_pids):
    """Per-query trapezoidal AP in plain Python (0 for a query without positives)."""
    aps = []
    for row, qp in zip(scores, query_pids):
        order = sorted(range(len(row)), key=lambda j: (-row[j], j))
        ranks = [r for r, j in enumerate(order) if gallery_pids[j] == qp]
        ap = 0.0
        for i, r in enumerate(ranks, start=1):
            before = 1.0 if r == 0 else (i - 1) / r
            ap += (before + i / (r + 1)) / 2 / len(ranks)
        aps.append(ap)
    return aps


def test_trapezoidal_ap_by_hand_three_queries():
    # gallery pids [1, 2, 1, 3, 2]; each row's scores give the ranking written next to it
    gp = torch.tensor([1, 2, 1, 3, 2])
    scores = torch.tensor([
        [0.9, 0.8, 0.7, 0.6, 0.5],  # pid 1: ranking 0,1,2,3,4 -> positives (gallery 0, 2) at ranks 0 and 2
        [0.1, 0.9, 0.2, 0.3, 0.4],  # pid 3: ranking 1,4,3,2,0 -> the positive (gallery 3) at rank 2
        [0.5, 0.4, 0.3, 0.2, 0.1],  # pid 8: no positive in the gallery
    ])
    qp = torch.tensor([1, 3, 8])
    # By hand, AP = 1/n * sum_i (p_before_i + p_i) / 2 with p_i = i / (r_i + 1), p_before_i = (i - 1) / r_i:
    #   query 0: i=1, r=0: (1 + 1) / 2 = 1;  i=2, r=2: (1/2 + 2/3) / 2 = 7/12;  AP = (1 + 7/12) / 2 = 19/24
    #   query 1: i=1, r=2: (0/2 + 1/3) / 2 = 1/6;                               AP = 1/6
    #   query 2: no positive, counted as 0
    #   mAP = (19/24 + 1/6 + 0) / 3 = (19/24 + 4/24) / 3 = 23/72 = 31.944...%
    stats = rank_statistics(scores, qp, gp, ks=(1,), ap_formula="trapezoidal")
    assert stats["ap"].tolist() == pytest.approx([19 / 24, 1 / 6, 0.0])
    got = retrieval_metrics(torch.zeros(3, 2), torch.zeros(5, 2), qp, gp, ks=(1, 3), score_fn=score_hook(scores),
                            ap_formula="trapezoidal", without_positive="zero")
    assert got["mAP"] == pytest.approx(100 * 23 / 72)
    assert got["R1"] == pytest.approx(100 / 3) and got["R3"] == pytest.approx(200 / 3)  # 3 queries, not 2
    # the standard formula and protocol on the same ranking: AP (1 + 2/3)/2 = 5/6 and 1/3, over 2 queries
    standard = retrieval_metrics(torch.zeros(3, 2), torch.zeros(5, 2), qp, gp, ks=(1, 3), score_fn=score_hook(scores))
    assert standard["mAP"] == pytest.approx(100 * (5 / 6 + 1 / 3) / 2)
    assert standard["R1"] == pytest.approx(50.0) and standard["num_queries_without_positive"] == 1


@pytest.mark.parametrize("seed", [0, 3])
def test_trapezoidal_ap_matches_brute_force_and_is_never_higher(seed):
    scores, qp, gp = random_case(seed, num_q=41, num_g=31, decimals=1)
    expected = brute_force_trapezoidal(scores.tolist(), qp.tolist(), gp.tolist())
    trapezoid = rank_statistics(scores, qp, gp, ap_formula="trapezoidal")["ap"]
    standard = rank_statistics(scores, qp, gp)["ap"]
    assert trapezoid.tolist() == pytest.approx(expected, rel=1e-6)
    assert bool((trapezoid <= standard + 1e-7).all()) and bool((trapezoid < standard - 1e-3).any())
    got = retrieval_metrics(torch.zeros(41, 2), torch.zeros(31, 2), qp, gp, chunk_size=9,
                            score_fn=score_hook(scores), ap_formula="trapezoidal", without_positive="zero")
    assert got["mAP"] == pytest.approx(100 * sum(expected) / 41, rel=1e-6)
    with pytest.raises(ValueError, match="ap_formula"):
        rank_statistics(scores, qp, gp, ap_formula="market")
    with pytest.raises(ValueError, match="without_positive"):
        retrieval_metrics(torch.randn(3, 2), torch.randn(3, 2), torch.arange(3), torch.arange(3),
                          without_positive="skip")


def test_rerank_with_a_perfect_itm_reaches_r1_100():
    g = torch.Generator().manual_seed(0)
    num_ids, dim = 20, 16
    gallery_pids = torch.arange(num_ids)
    centres = torch.randn(num_ids, dim, generator=g)
    gallery = centres + 0.6 * torch.randn(num_ids, dim, generator=g)
    query_pids = torch.arange(num_ids).repeat(3)
    queries = centres[query_pids] + 0.6 * torch.randn(len(query_pids), dim, generator=g)

    plain = retrieval_metrics(queries, gallery, query_pids, gallery_pids, chunk_size=16)
    k = num_ids  # the whole gallery, so every true match is in the top k
    top_scores, top_idx = topk_indices(queries, gallery, k=k, chunk_size=16)
    # a fake ITM head: it recognises the true identity, otherwise prefers the first-stage order reversed
    itm = (gallery_pids[top_idx] == query_pids[:, None]).float() * 10.0 - top_scores

    def rerank(sim, rows):
        return apply_rerank(sim, top_idx[rows.start : rows.stop], itm[rows.start : rows.stop])

    reranked = retrieval_metrics(queries, gallery, query_pids, gallery_pids, chunk_size=16, score_fn=rerank)
    assert plain["R1"] < 95.0
    assert reranked["R1"] == pytest.approx(100.0)
    assert reranked["mAP"] == pytest.approx(100.0)


def test_format_metrics_table():
    text = format_metrics_table({"R1": 65.4321, "mAP": 60.0, "num_queries": 6156}, "CUHK-PEDES test")
    lines = text.splitlines()
    assert lines[0] == "CUHK-PEDES test"
    assert "65.43" in lines[4] and "60.00" in lines[4] and "6156" in lines[4]
    assert lines[2].split("|")[1].strip() == "R1"
    assert len({len(line) for line in lines[1:]}) == 1  # fixed width
