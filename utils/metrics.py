"""Text-to-image retrieval metrics: R@k, mAP and mINP, vectorised on the device.

A gallery item matches a query when they share the person id. Each query's gallery is ranked by descending
score; equal scores are ordered by gallery index ascending (stable sort), so results are deterministic.
Similarities are computed a chunk of queries at a time so that memory stays bounded for large galleries.

Average precision comes in two formulas (``AP_FORMULAS``): "standard", the mean over the positives of the
precision at each positive's rank (IRRA and most of the field), and "trapezoidal", the older Market-1501
baseline's variant that averages, at each positive, the precision just before it and the precision at it;
the second is never higher on the same ranking (the precision just before the i-th positive, at 0-based
rank r >= i-1, is (i-1)/r <= i/(r+1)) and equal only when every positive is at the top. Queries without any positive in the gallery are either left out of every average
("exclude") or counted as zero ("zero").
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "rank_statistics",
    "retrieval_metrics",
    "topk_indices",
    "apply_rerank",
    "format_metrics_table",
    "default_chunk_size",
    "AP_FORMULAS",
    "WITHOUT_POSITIVE",
]

AP_FORMULAS = ("standard", "trapezoidal")
WITHOUT_POSITIVE = ("exclude", "zero")

ScoreFn = Callable[[torch.Tensor, range], torch.Tensor]


def default_chunk_size(device: torch.device | str) -> int:
    """Queries per chunk for retrieval_metrics, from bench/bench_eval.py (about 27 bytes * chunk * gallery)."""
    return 4096 if torch.device(device).type == "cuda" else 1024


def _check_pids(name: str, pids: torch.Tensor, n: int, what: str) -> None:
    if pids.dim() != 1 or pids.shape[0] != n:
        raise ValueError(f"{name}: {what} pids must have shape [{n}], got {tuple(pids.shape)}")


def rank_statistics(
    similarity: torch.Tensor,
    query_pids: torch.Tensor,
    gallery_pids: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
    ap_formula: str = "standard",
) -> dict[str, torch.Tensor]:
    """Per-query ranking statistics for one block of queries.

    Args:
        similarity: [Q, G] scores, higher is better; NaN is rejected.
        query_pids: [Q] person ids of the queries.
        gallery_pids: [G] person ids of the gallery.
        ks: the cut-offs for the CMC hits.
        ap_formula: "standard" or "trapezoidal" (see "ap" below).

    Returns (all on similarity's device):
        "num_positives": [Q] long, gallery items with the query's pid.
        "first_hit_rank": [Q] long, 0-based rank of the first positive, -1 if there is none.
        "ap": [Q] float32, average precision over the whole ranking (0 without positives). With the i-th
            positive (1-based) at 0-based rank r_i and n positives: "standard" = sum_i (i / (r_i + 1)) / n;
            "trapezoidal" = sum_i ((p_before_i + i / (r_i + 1)) / 2) / n with p_before_i = (i - 1) / r_i,
            or 1 when r_i = 0.
        "inp": [Q] float32, num_positives / (rank of the last positive + 1) (0 without positives).
        "hits": [Q, len(ks)] bool, whether a positive is within the top k, for each k in ks.
    """
    if similarity.dim() != 2:
        raise ValueError(f"rank_statistics: similarity must be [Q, G], got {tuple(similarity.shape)}")
    num_q, num_g = similarity.shape
    _check_pids("rank_statistics", query_pids, num_q, "query")
    _check_pids("rank_statistics", gallery_pids, num_g, "gallery")
    if bool(torch.isnan(similarity).any()):
        raise ValueError("rank_statistics: the similarity matrix contains NaN")
    if ap_formula not in AP_FORMULAS:
        raise ValueError(f"rank_statistics: ap_formula must be one of {AP_FORMULAS}, got {ap_formula!r}")
    device = similarity.device
    query_pids = query_pids.to(device)
    gallery_pids = gallery_pids.to(device)

    order = torch.sort(similarity.float(), dim=1, descending=True, stable=True).indices  # [Q, G]
    # gather the bool match matrix rather than the pids: 1 byte per entry instead of 8
    matches = (query_pids[:, None] == gallery_pids[None, :]).gather(1, order)
    del order
    # Work on the positives only: nonzero lists them row by row with ascending rank, which is all that
    # first hit, AP and INP need, instead of several passes over the whole [Q, G] ranking.
    rows, pos_ranks = matches.nonzero(as_tuple=True)
    num_pos = torch.bincount(rows, minlength=num_q)
    has_pos = num_pos > 0
    row_start = torch.cumsum(num_pos, dim=0) - num_pos
    nth = torch.arange(rows.shape[0], device=device) - row_start[rows]  # 0-based index among the row's positives
    precision = (nth + 1).double() / (pos_ranks + 1).double()
    if ap_formula == "trapezoidal":
        # the precision just before each positive: nth / rank, and 1 for a positive at rank 0 (where nth = 0)
        before = torch.where(pos_ranks > 0, nth.double() / pos_ranks.clamp(min=1).double(), 1.0)
        precision = (before + precision) / 2
    # per-row sums as differences of one running sum: deterministic on CUDA, unlike index_add_'s atomics
    running = torch.cat([precision.new_zeros(1), torch.cumsum(precision, dim=0)])
    ap = ((running[row_start + num_pos] - running[row_start]) / num_pos.clamp(min=1)).float()
    first_hit_rank = torch.full((num_q,), -1, dtype=torch.long, device=device)
    is_first = nth == 0
    first_hit_rank[rows[is_first]] = pos_ranks[is_first]
    last_rank = torch.zeros(num_q, dtype=torch.long, device=device)
    is_last = nth == num_pos[rows] - 1
    last_rank[rows[is_last]] = pos_ranks[is_last]
    inp = torch.where(has_pos, num_pos.float() / (last_rank + 1).float(), 0.0)
    ks_t = torch.as_tensor(list(ks), device=device, dtype=torch.long)
    hits = has_pos[:, None] & (first_hit_rank[:, None] < ks_t[None, :])
    return {
        "num_positives": num_pos,
        "first_hit_rank": first_hit_rank,
        "ap": ap,
        "inp": inp,
        "hits": hits,
    }


def _prepare_feats(
    query_feats: torch.Tensor, gallery_feats: torch.Tensor, normalize: bool, name: str
) -> tuple[torch.Tensor, torch.Tensor]:
    if query_feats.dim() != 2 or gallery_feats.dim() != 2 or query_feats.shape[1] != gallery_feats.shape[1]:
        raise ValueError(
            f"{name}: expected query [Q, D] and gallery [G, D] features, got {tuple(query_feats.shape)} and "
            f"{tuple(gallery_feats.shape)}"
        )
    if gallery_feats.shape[0] == 0:
        raise ValueError(f"{name}: the gallery is empty")
    q = query_feats.float()
    g = gallery_feats.to(device=q.device, dtype=torch.float32)
    if normalize:
        q = F.normalize(q, dim=1)
        g = F.normalize(g, dim=1)
    return q, g


def _chunk_similarities(q: torch.Tensor, g: torch.Tensor, chunk_size: int):
    """Yields (range of query indices, [q, G] float32 similarity) one chunk of queries at a time."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    g_t = g.t().contiguous()
    for start in range(0, q.shape[0], chunk_size):
        stop = min(start + chunk_size, q.shape[0])
        # fp32 matmul even inside an autocast region: scores in bf16 create spurious ties
        with torch.autocast(device_type=q.device.type, enabled=False):
            yield range(start, stop), q[start:stop] @ g_t


def selection_value(metrics: dict, metric: str) -> float:
    """The number ``eval.selection_metric`` (R1, mAP or R1+mAP, their mean) names, from retrieval_metrics' dict."""
    return 0.5 * (metrics["R1"] + metrics["mAP"]) if metric == "R1+mAP" else metrics[metric]


def retrieval_metrics(
    query_feats: torch.Tensor,
    gallery_feats: torch.Tensor,
    query_pids: torch.Tensor,
    gallery_pids: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 1024,
    normalize: bool = True,
    score_fn: ScoreFn | None = None,
    ap_formula: str = "standard",
    without_positive: str = "exclude",
    per_query: bool = False,
) -> dict:
    """R@k, mAP and mINP of ranking the gallery for every query, chunk by chunk over the queries.

    Args:
        query_feats: [Q, D] query (text) features.
        gallery_feats: [G, D] gallery (image) features.
        query_pids: [Q] person ids; gallery_pids: [G] person ids.
        ks: cut-offs reported as "R{k}".
        chunk_size: queries scored at once; peak memory is about 27 bytes * chunk_size * G.
        normalize: L2-normalise the features first, so the score is the cosine similarity.
        score_fn: optional hook score_fn(sim_chunk [q, G], query_index_range) -> [q, G] that may replace the
            scores (re-ranking) before ranking.
        ap_formula: "standard" or "trapezoidal" average precision (see ``rank_statistics``).
        without_positive: "exclude" leaves queries without a positive out of every average; "zero" averages
            over all queries, those counting 0 in R@k, mAP and mINP.
        per_query: also return "per_query": {"first_hit_rank": [Q] long (0-based, -1 without positive),
            "ap": [Q] float32} on the CPU.

    Returns:
        {"R1", "R5", "R10" (one per k), "mAP", "mINP"} as percentages in [0, 100], plus "num_queries",
        "num_gallery" and "num_queries_without_positive". Raises ValueError when no query has a positive.
    """
    if without_positive not in WITHOUT_POSITIVE:
        raise ValueError(f"retrieval_metrics: without_positive must be one of {WITHOUT_POSITIVE}, "
                         f"got {without_positive!r}")
    q, g = _prepare_feats(query_feats, gallery_feats, normalize, "retrieval_metrics")
    num_q, num_g = q.shape[0], g.shape[0]
    query_pids = torch.as_tensor(query_pids, device=q.device)
    gallery_pids = torch.as_tensor(gallery_pids, device=q.device)
    _check_pids("retrieval_metrics", query_pids, num_q, "query")
    _check_pids("retrieval_metrics", gallery_pids, num_g, "gallery")

    if num_q == 0:
        raise ValueError("retrieval_metrics: there are no queries")
    if not ks or any(int(k) < 1 for k in ks):
        raise ValueError(f"retrieval_metrics: ks must be positive cut-offs, got {tuple(ks)}")

    per_chunk = []
    for rows, sim in _chunk_similarities(q, g, chunk_size):
        if score_fn is not None:
            sim = score_fn(sim, rows)
            if sim.shape != (len(rows), num_g):
                raise ValueError(
                    f"retrieval_metrics: score_fn returned shape {tuple(sim.shape)} for queries "
                    f"{rows.start}..{rows.stop - 1}, expected {(len(rows), num_g)}"
                )
        stats = rank_statistics(sim, query_pids[rows.start : rows.stop], gallery_pids, ks, ap_formula)
        per_chunk.append(stats)
    # per-query vectors are small; averaging them in float64 on the CPU works for every device type
    stats = {key: torch.cat([c[key] for c in per_chunk]).cpu() for key in per_chunk[0]}
    valid = stats["num_positives"] > 0
    num_valid = int(valid.sum())
    if num_valid == 0:
        raise ValueError(f"retrieval_metrics: none of the {num_q} queries has a matching pid in the gallery")
    # rank_statistics gives 0 for hits, AP and INP of a query without positives, so "zero" is a plain mean
    counted = valid if without_positive == "exclude" else torch.ones_like(valid)
    result: dict = {}
    hit_rates = stats["hits"][counted].double().mean(dim=0).mul(100.0).tolist()
    for k, rate in zip(ks, hit_rates):
        result[f"R{k}"] = rate
    result["mAP"] = stats["ap"][counted].double().mean().item() * 100.0
    result["mINP"] = stats["inp"][counted].double().mean().item() * 100.0
    result["num_queries"] = num_q
    result["num_gallery"] = num_g
    result["num_queries_without_positive"] = num_q - num_valid
    if per_query:
        result["per_query"] = {"first_hit_rank": stats["first_hit_rank"], "ap": stats["ap"]}
    return result


def topk_indices(
    query_feats: torch.Tensor,
    gallery_feats: torch.Tensor,
    k: int,
    chunk_size: int = 1024,
    normalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best gallery items per query, best first, ties by gallery index (the ranking's tie rule).

    Args:
        query_feats: [Q, D]; gallery_feats: [G, D]; k: 1..G.

    Returns:
        scores [Q, k] float32 and indices [Q, k] long, on query_feats' device.
    """
    q, g = _prepare_feats(query_feats, gallery_feats, normalize, "topk_indices")
    if not 1 <= k <= g.shape[0]:
        raise ValueError(f"topk_indices: k must be in 1..{g.shape[0]} (the gallery size), got {k}")
    scores, indices = [], []
    for _, sim in _chunk_similarities(q, g, chunk_size):
        # a stable sort instead of topk: topk leaves the order of equal scores unspecified
        s, i = torch.sort(sim, dim=1, descending=True, stable=True)
        scores.append(s[:, :k])
        indices.append(i[:, :k])
    if not scores:
        return q.new_zeros((0, k)), torch.zeros((0, k), dtype=torch.long, device=q.device)
    return torch.cat(scores), torch.cat(indices)


def apply_rerank(sim: torch.Tensor, topk_idx: torch.Tensor, topk_scores: torch.Tensor) -> torch.Tensor:
    """Lift each row's top-k entries above the rest, ordered by new (e.g. ITM) scores, ties by the old score.

    Args:
        sim: [q, G] first-stage scores (cosine similarities).
        topk_idx: [q, k] distinct gallery indices per row.
        topk_scores: [q, k] re-ranking scores for those entries, higher is better.

    Returns:
        [q, G] float32 copy in which the k entries topk_idx[r] take the values base + step * (k - j),
        j = 0..k-1 their place in the order (topk_scores descending, then sim descending, then gallery index
        ascending), with base = max(sim[r]) + 1 + |max(sim[r])|: strictly above every other entry of the row
        and never tied with each other, however close the re-ranking scores are. The rest is unchanged.
    """
    if sim.dim() != 2 or topk_idx.dim() != 2 or topk_idx.shape != topk_scores.shape:
        raise ValueError(
            f"apply_rerank: expected sim [q, G] and topk_idx/topk_scores [q, k], got {tuple(sim.shape)}, "
            f"{tuple(topk_idx.shape)}, {tuple(topk_scores.shape)}"
        )
    if topk_idx.shape[0] != sim.shape[0]:
        raise ValueError(f"apply_rerank: sim has {sim.shape[0]} rows but topk_idx has {topk_idx.shape[0]}")
    out = sim.float().clone()
    if topk_idx.numel() == 0:
        return out
    topk_idx = topk_idx.to(sim.device).long()
    bad_range = (topk_idx < 0) | (topk_idx >= sim.shape[1])
    sorted_idx = topk_idx.sort(dim=1).values
    dupes = (sorted_idx[:, 1:] == sorted_idx[:, :-1]).any(dim=1)
    n_bad_range, n_dupes = torch.stack([bad_range.any(dim=1).sum(), dupes.sum()]).tolist()
    if n_bad_range or n_dupes:
        raise ValueError(
            f"apply_rerank: {n_bad_range} rows have indices outside 0..{sim.shape[1] - 1} and {n_dupes} rows "
            f"repeat an index; topk_idx must hold distinct gallery indices per row"
        )
    new = topk_scores.to(device=sim.device, dtype=torch.float32)
    old = out.gather(1, topk_idx)
    # lexicographic order by stable sorts from the last key to the first
    order = torch.sort(topk_idx, dim=1, stable=True).indices
    order = order.gather(1, torch.sort(old.gather(1, order), dim=1, descending=True, stable=True).indices)
    order = order.gather(1, torch.sort(new.gather(1, order), dim=1, descending=True, stable=True).indices)
    k = topk_idx.shape[1]
    row_max = out.max(dim=1, keepdim=True).values
    base = row_max + 1.0 + row_max.abs()
    step = 1.0 + base.abs() * 2.0**-20  # several float32 ulps at the lifted magnitude, so no two places merge
    by_place = base + step * torch.arange(k, 0, -1, device=sim.device, dtype=torch.float32)
    lifted = torch.empty_like(new).scatter_(1, order, by_place)
    return out.scatter_(1, topk_idx, lifted)


def format_metrics_table(metrics: dict, title: str) -> str:
    """A fixed-width text table: a title line, then one header row and one value row of the metrics.

    Floats print with two decimals, everything else as is, in the dict's order.
    """
    headers = [str(k) for k in metrics]
    values = [f"{v:.2f}" if isinstance(v, float) else str(v) for v in metrics.values()]
    widths = [max(len(h), len(v)) for h, v in zip(headers, values)]
    rule = "+" + "+".join("-" * (w + 2) for w in widths) + "+"

    def row(cells: list[str]) -> str:
        return "|" + "|".join(f" {c:>{w}} " for c, w in zip(cells, widths)) + "|"

    return "\n".join([title, rule, row(headers), rule, row(values), rule])
