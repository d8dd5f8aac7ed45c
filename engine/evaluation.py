"""Text-to-image retrieval evaluation: the protocol, batched sharded encoding, optional ITM re-ranking, reports.

Protocol ``standard`` (``eval.protocol``): every caption of the split is a query, every unique image (by
``image_id``) is a gallery entry, a gallery entry matches a query when they share the person id, and AP is
the standard average precision over queries that have a positive. Protocol ``authors`` reproduces the
authors' evaluation code so that their published numbers can be compared: the gallery is every second record
of the annotation in file order (every record on ICFG-PEDES), AP is the trapezoidal variant, a query without
a positive counts as zero, RSTPReid captions of more than 90 words are dropped before anything else and
ICFG-PEDES captions of more than 90 words are cut, both counting words as the authors' loaders do; a caption is
not truncated at ``text.max_text_len`` (their inference never truncates: only the position table,
``model.max_text_positions``, bounds it) and a whitespace-only caption stays a query (their loaders keep it; the
standard protocol leaves it out).
Features are encoded once (batched, autocast on CUDA, each rank a contiguous shard, gathered back in order),
ranked by cosine similarity, and, when the model has a fusion stack and ``eval.rerank_top_k > 0``, each
query's top-k images are re-scored by the ITM head. Image-to-text metrics (images as queries, captions as
gallery) are reported too.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from datasets.authors_text import AUTHORS_MAX_WORDS as AUTHORS_LIMIT
from datasets.authors_text import authors_word_count
from datasets.pixels import set_max_image_pixels
from datasets.records import MissingImagesError, Record
from datasets.transforms import build_test_transform
from engine.calibration import (CARRIED_KEYS, blend_grid, calibrate_no_match, choose_blend_weight,
                                itm_pair_accuracy)
from engine.encoding import encode_images, encode_texts, rerank_scores
from utils.checkpoint import atomic_write
from utils.environment import environment_record
from utils.errors import UserError
from utils.distributed import get_world_size, is_main_process
from utils.metrics import apply_rerank, format_metrics_table, retrieval_metrics, selection_value, topk_indices
from utils.task_plan import TaskPlan
from utils.visualize import save_query_examples, write_examples_index

logger = logging.getLogger(__name__)

EXAMPLE_TOP_K = 10  # gallery images shown per example query


class EvaluationError(UserError, ValueError):
    """A split or setting that cannot be evaluated; the message says which and why."""


# ------------------------------------------------------------------------------------------- protocol
PROTOCOLS = ("standard", "authors")
# The authors' evaluation, per dataset format: which records give gallery entries (every n-th in file order)
# and the caption length (their word count) beyond which a record is dropped from the split. Both are part of
# the definition of protocol "authors", not settings: changing them would no longer reproduce their numbers.
AUTHORS_GALLERY_EVERY = {"cuhkpedes": 2, "rstp": 2, "icfg": 1}
AUTHORS_MAX_WORDS = {"rstp": AUTHORS_LIMIT}  # longer captions are dropped
AUTHORS_CUT_WORDS = {"icfg": AUTHORS_LIMIT}  # longer captions are cut (Record.authors_caption)


@dataclass
class EvalSets:
    """Queries (one per caption) and gallery of one split under one protocol.

    texts: [Q] captions; query_pids: [Q] long; query_image_ids: [Q] long, the ``image_id`` of each caption's
    own image; image_paths: [G]; gallery_pids: [G] long; gallery_image_ids: [G] long. Protocol ``standard``:
    one gallery entry per unique image, in order of first appearance; ``authors``: see build_eval_protocol
    (an image may then appear twice or not at all). dropped_captions: records left out of the queries.
    """

    texts: list[str]
    query_pids: torch.Tensor
    query_image_ids: torch.Tensor
    image_paths: list[str]
    gallery_pids: torch.Tensor
    gallery_image_ids: torch.Tensor
    protocol: str = "standard"
    dropped_captions: int = 0
    cut_captions: int = 0
    blank_captions: int = 0  # whitespace-only captions: queries under ``authors``, left out under ``standard``

    @property
    def num_queries(self) -> int:
        return len(self.texts)

    @property
    def num_gallery(self) -> int:
        return len(self.image_paths)


def _authors_words(record: Record) -> int:
    """The record's word count as the authors' loader counts it (computed from the caption when the reader
    could not keep the raw one, e.g. records built in code)."""
    if record.authors_word_count is not None:
        return record.authors_word_count
    return authors_word_count(record.caption)


def _authors_records(records: Sequence[Record], data_format: str) -> tuple[list[Record], int, int]:
    """Protocol ``authors``' view of a split: (records, captions dropped, captions cut)."""
    max_words = AUTHORS_MAX_WORDS.get(data_format)
    kept = [r for r in records if max_words is None or _authors_words(r) <= max_words]
    if not kept:
        raise EvaluationError(f"every caption of the split has more than {max_words} words, which "
                              "eval.protocol=authors drops")
    cut = 0
    if data_format in AUTHORS_CUT_WORDS:
        cut = sum(r.authors_caption is not None for r in kept)
        kept = [r if r.authors_caption is None else replace(r, caption=r.authors_caption) for r in kept]
    return kept, len(records) - len(kept), cut


def build_eval_protocol(records: Sequence[Record], protocol: str = "standard",
                        data_format: str | None = None) -> EvalSets:
    """Queries and gallery of ``records`` (one split, in annotation file order) under ``protocol``.

    standard: queries = every record's caption; gallery = each ``image_id`` once, in order of first appearance.
    authors: records whose caption has more than AUTHORS_MAX_WORDS[data_format] words are dropped first and
    captions of AUTHORS_CUT_WORDS formats cut as the authors' loader cuts them; queries = the remaining records; gallery = the image of every AUTHORS_GALLERY_EVERY[data_format]-th
    remaining record, starting with the first (their ``[::2]``: exactly the unique images when every image
    has two adjacent captions).

    Raises EvaluationError for an empty split, an unknown protocol or format, or when two records of one
    ``image_id`` disagree on the path or pid.
    """
    if protocol not in PROTOCOLS:
        raise EvaluationError(f"eval.protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    blank = sum(not r.caption.strip() for r in records)
    if protocol == "standard":
        records = [r for r in records if r.caption.strip()]
    if not records:
        raise EvaluationError("the evaluation split has no records")
    dropped = cut = 0
    if protocol == "authors":
        if data_format not in AUTHORS_GALLERY_EVERY:
            raise EvaluationError(f"eval.protocol=authors is defined for the formats the authors evaluate "
                                  f"({', '.join(AUTHORS_GALLERY_EVERY)}), not {data_format!r}; use eval.protocol=standard")
        records, dropped, cut = _authors_records(records, data_format)
    texts, query_pids, query_image_ids = [], [], []
    first_seen: dict[int, int] = {}  # image_id -> index of the record that introduced it
    for index, record in enumerate(records):
        texts.append(record.caption)
        query_pids.append(record.pid)
        query_image_ids.append(record.image_id)
        known = first_seen.get(record.image_id)
        if known is None:
            first_seen[record.image_id] = index
        elif (records[known].image_path, records[known].pid) != (record.image_path, record.pid):
            raise EvaluationError(
                f"record {index}: image_id {record.image_id} is ({record.image_path!r}, pid {record.pid}) but "
                f"record {known} gave it ({records[known].image_path!r}, pid {records[known].pid}); "
                "expected one path and one pid per image_id"
            )
    if protocol == "authors":
        gallery = list(records[::AUTHORS_GALLERY_EVERY[data_format]])
    else:
        gallery = [records[i] for i in first_seen.values()]
    return EvalSets(
        texts=texts,
        query_pids=torch.tensor(query_pids, dtype=torch.long),
        query_image_ids=torch.tensor(query_image_ids, dtype=torch.long),
        image_paths=[r.image_path for r in gallery],
        gallery_pids=torch.tensor([r.pid for r in gallery], dtype=torch.long),
        gallery_image_ids=torch.tensor([r.image_id for r in gallery], dtype=torch.long),
        protocol=protocol,
        dropped_captions=dropped,
        cut_captions=cut,
        blank_captions=blank,
    )


def protocol_of(cfg: Any) -> tuple[str, str]:
    """(eval.protocol, the format of the evaluated dataset) of a config: data.format, or data.eval_format
    when pretraining evaluates zero-shot on another dataset."""
    return str(cfg.eval.protocol), TaskPlan.from_config(cfg).eval_format


def query_token_limit(cfg: Any, protocol: str) -> int:
    """The most token ids a query caption keeps: ``text.max_text_len``, except under protocol ``authors``.

    The authors' inference pads to the longest caption and never truncates (a caption of 120 word pieces keeps
    its 122 ids), so there only the position table bounds it: ``model.max_text_positions`` (512 in their BERT,
    whose code fails beyond it; a longer caption is cut there and counted in the log).
    """
    return int(cfg.model.max_text_positions if protocol == "authors" else cfg.text.max_text_len)


def metric_options(protocol: str) -> dict[str, str]:
    """The retrieval_metrics options that define ``protocol``'s numbers."""
    if protocol == "authors":
        return {"ap_formula": "trapezoidal", "without_positive": "zero"}
    return {"ap_formula": "standard", "without_positive": "exclude"}


def describe_protocol(sets: EvalSets, data_format: str) -> dict:
    """What the metrics of ``sets`` mean, for metrics_<split>.json."""
    if sets.protocol == "authors":
        gallery = {1: "every record's image", 2: "the image of every second record in file order"}[
            AUTHORS_GALLERY_EVERY[data_format]]
        max_words = AUTHORS_MAX_WORDS.get(data_format)
        cut_words = AUTHORS_CUT_WORDS.get(data_format)
    else:
        gallery, max_words, cut_words = "every unique image", None, None
    return {"name": sets.protocol, "gallery": gallery, **metric_options(sets.protocol),
            "max_caption_words": max_words, "captions_dropped": sets.dropped_captions,
            "cut_caption_words": cut_words, "captions_cut": sets.cut_captions}


def check_images_exist(paths: Sequence[str], limit: int = 5) -> None:
    """MissingImagesError naming the count and the first ``limit`` paths when some files do not exist."""
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        shown = ", ".join(missing[:limit]) + (", ..." if len(missing) > limit else "")
        raise MissingImagesError(f"{len(missing)} of {len(paths)} gallery images do not exist: {shown}")


def chance_r1(query_pids: torch.Tensor, gallery_pids: torch.Tensor) -> float:
    """Expected R@1 (percent) of a random ranking: the mean over queries of positives / gallery size."""
    gallery_pids = gallery_pids.to(query_pids.device)
    _, inverse, counts = torch.unique(torch.cat([query_pids, gallery_pids]), return_inverse=True,
                                      return_counts=True)
    per_pid = torch.bincount(inverse[query_pids.numel():], minlength=counts.numel())
    positives = per_pid[inverse[: query_pids.numel()]].double()
    return float(positives.mean() / gallery_pids.numel() * 100.0)


# ----------------------------------------------------------------------------------------- evaluation
EXAMPLE_PICKS = ("spread", "worst")


def example_rows(first_hit_rank: torch.Tensor, n: int, pick: str = "spread") -> torch.Tensor:
    """Indices of ``n`` example queries.

    first_hit_rank: [Q] 0-based rank of each query's first true match, -1 without one. spread: evenly over
    the split (different persons rather than the first few); worst: the queries whose first true match ranks
    lowest, worst first (ties by query index; queries without any true match come last).
    """
    if pick not in EXAMPLE_PICKS:
        raise EvaluationError(f"eval.examples_pick must be one of {', '.join(EXAMPLE_PICKS)}, got {pick!r}")
    num_queries = first_hit_rank.numel()
    n = min(n, num_queries)
    if n <= 0:
        return torch.zeros(0, dtype=torch.long)
    if pick == "spread":
        return torch.linspace(0, num_queries - 1, n).round().long().unique()
    key = first_hit_rank.cpu().long()
    order = torch.sort(torch.where(key < 0, -1, key), descending=True, stable=True).indices
    return order[:n]


# The "no good match" threshold (the web page): this share of the correctly answered queries scores below it.
MATCH_THRESHOLD_QUANTILE = 0.05


def match_threshold(text_feats: torch.Tensor, image_feats: torch.Tensor, query_pids: torch.Tensor,
                    gallery_pids: torch.Tensor, chunk_size: int) -> dict:
    """The cosine score below which a best match is unlikely to be the right person, measured on a split.

    text_feats [Q, D], image_feats [G, D], pids [Q] / [G]. The value is the MATCH_THRESHOLD_QUANTILE quantile of
    the best score of the queries whose best match is their person: 95% of the correctly answered queries score
    above it, so a best score below it says the gallery holds nothing like the description. None without a
    correctly answered query.
    """
    scores, indices = topk_indices(text_feats, image_feats, 1, chunk_size=chunk_size)
    right = gallery_pids.to(indices.device)[indices[:, 0]] == query_pids.to(indices.device)
    value = float(torch.quantile(scores[right, 0].float(), MATCH_THRESHOLD_QUANTILE)) if right.any() else None
    return {"value": value, "quantile": MATCH_THRESHOLD_QUANTILE, "queries_answered_right": int(right.sum()),
            "rule": f"{MATCH_THRESHOLD_QUANTILE:.0%} quantile of the best cosine score over the split's queries "
                    "whose best match is the right person"}


def _examples(text_feats: torch.Tensor, image_feats: torch.Tensor, query_pids: torch.Tensor,
              gallery_pids: torch.Tensor, per_query: dict, n: int, pick: str,
              rerank: tuple[torch.Tensor, torch.Tensor] | None) -> dict:
    """The final top-10 (re-ranked when ``rerank`` = (topk_idx [Q,k], itm scores [Q,k])) of ``n`` queries.

    per_query: retrieval_metrics' per-query "first_hit_rank" and "ap" of that final ranking. Scores are the
    cosine similarities of the shown images, whatever ranked them. For a query whose top 10 holds no true
    match, "first_match" gives the gallery index, 1-based rank and cosine of the first one (None otherwise).
    """
    rows = example_rows(per_query["first_hit_rank"], n, pick).to(text_feats.device)
    q = torch.nn.functional.normalize(text_feats[rows].float(), dim=1)
    g = torch.nn.functional.normalize(image_feats.float(), dim=1)
    cosine = q @ g.t()
    ranking = cosine if rerank is None else apply_rerank(cosine, rerank[0][rows], rerank[1][rows])
    order = torch.sort(ranking, dim=1, descending=True, stable=True).indices
    k = min(EXAMPLE_TOP_K, image_feats.shape[0])
    is_match = gallery_pids.to(order.device)[order] == query_pids.to(order.device)[rows][:, None]
    first_hit_rank, first_matches = [], []
    for r in range(rows.numel()):
        place = int(is_match[r].int().argmax()) if bool(is_match[r].any()) else -1
        first_hit_rank.append(place + 1 if place >= 0 else None)
        if place < k:  # a hit in the top k, or no true match at all: nothing more to show
            first_matches.append(None)
        else:
            index = int(order[r, place])
            first_matches.append({"index": index, "rank": place + 1, "score": float(cosine[r, index])})
    return {
        "pick": pick,
        "ranked_by": "cosine" if rerank is None else "itm_rerank",
        "query_indices": rows.tolist(),
        "indices": order[:, :k].tolist(),
        "scores": cosine.gather(1, order[:, :k]).tolist(),
        "first_hit_rank": first_hit_rank,
        "ap": per_query["ap"][rows.cpu()].tolist(),
        "first_match": first_matches,
    }


def _blend(sets: EvalSets, text_feats: torch.Tensor, image_feats: torch.Tensor, top_idx: torch.Tensor,
           top_cosine: torch.Tensor, itm: torch.Tensor, ev: Any, options: dict, carried: dict | None,
           results: dict) -> None:
    """The cosine + w * ITM blend (engine.calibration): "t2i_blend" at the weight of ``eval.rerank_blend_weight``,
    else the one carried with the model, else the one chosen on this split (the best of the grid where it beats the
    cosine order beyond chance, ``eval.rerank_blend_alpha``); "rerank_blend" records the weight, where it came
    from, the grid and, when chosen here, the evidence; "itm_pair_accuracy" what the head is worth in the top k."""
    device = text_feats.device
    query_pids, gallery_pids = sets.query_pids.to(device), sets.gallery_pids.to(device)
    grid = blend_grid(text_feats, image_feats, query_pids, gallery_pids, top_idx, itm,
                      sorted({0.0, *map(float, ev.rerank_blend_weights)}), int(ev.chunk_size), options)
    chosen: dict = {}
    if ev.rerank_blend_weight is not None:
        weight, source = float(ev.rerank_blend_weight), "eval.rerank_blend_weight"
    elif carried and carried.get("rerank_blend_weight") is not None:
        weight, source = float(carried["rerank_blend_weight"]), f"carried with the model (chosen on {carried.get('split')})"
    else:
        alpha = float(ev.rerank_blend_alpha)
        weight, evidence = choose_blend_weight(grid, str(ev.selection_metric), alpha)
        source, chosen = f"chosen on {results['split']}", {"alpha": alpha, "evidence": evidence}
        if evidence is not None:
            logger.info("blend on %s: the best weight of the grid ranks %d queries better and %d worse than the "
                        "cosine order (sign test p %.3g, needed <= %.3g): weight %g", results["split"],
                        evidence["better"], evidence["worse"], evidence["p_value"], evidence["threshold"], weight)
    if weight not in grid:
        grid.update(blend_grid(text_feats, image_feats, query_pids, gallery_pids, top_idx, itm, [weight],
                               int(ev.chunk_size), options))
    for metrics in grid.values():
        metrics.pop("per_query")
    results["t2i_blend"] = grid[weight]
    results["rerank_blend"] = {"weight": weight, "source": source, "selection_metric": str(ev.selection_metric),
                               "grid": {str(w): {m: grid[w][m] for m in ("R1", "mAP")} for w in sorted(grid)},
                               **chosen}
    results["itm_pair_accuracy"] = itm_pair_accuracy(gallery_pids[top_idx.to(device)], query_pids,
                                                     top_cosine, itm)
    acc = results["itm_pair_accuracy"]
    if acc.get("pairs"):
        logger.info("ITM head inside the cosine top %d on %s: orders %.1f%% of (right, wrong) image pairs right "
                    "(cosine %.1f%%; %d pairs, %d queries); blend weight %g (%s)", top_idx.shape[1],
                    results["split"], acc["itm"], acc["cosine"], acc["pairs"], acc["queries"], weight, source)


def _rerank(model: torch.nn.Module, tokenizer: Any, sets: EvalSets, text_feats: torch.Tensor,
            image_feats: torch.Tensor, cfg: Any, transform: Callable, device: torch.device, per_query: bool,
            options: dict, results: dict, carried: dict | None = None
            ) -> tuple[tuple[torch.Tensor, torch.Tensor], Any]:
    """ITM re-ranking of each query's top ``eval.rerank_top_k``: adds "t2i_rerank" (the ITM order, replacing
    the cosine inside the top k), the blend (see _blend), "rerank_top_k" and "rerank_seconds" to ``results``;
    returns ((top-k indices [Q,k], ITM scores [Q,k]), per-query ranks of the replacement or None)."""
    ev, chunk = cfg.eval, int(cfg.eval.chunk_size)
    began = time.perf_counter()
    k = min(int(ev.rerank_top_k), sets.num_gallery)
    top_cosine, top_idx = topk_indices(text_feats, image_feats, k, chunk_size=chunk)
    itm = rerank_scores(model, tokenizer, sets.texts, sets.image_paths, top_idx, transform,
                        query_token_limit(cfg, sets.protocol),
                        int(ev.rerank_batch_size), device, bool(ev.amp), int(cfg.data.num_workers))
    _blend(sets, text_feats, image_feats, top_idx, top_cosine, itm, ev, options, carried, results)
    results["t2i_rerank"] = retrieval_metrics(
        text_feats, image_feats, sets.query_pids.to(device), sets.gallery_pids.to(device), chunk_size=chunk,
        per_query=per_query,
        score_fn=lambda sim, rows: apply_rerank(sim, top_idx[rows.start:rows.stop], itm[rows.start:rows.stop]),
        **options)
    results["rerank_top_k"] = k
    results["rerank_seconds"] = time.perf_counter() - began
    return (top_idx, itm), results["t2i_rerank"].pop("per_query", None)


def log_caption_lengths(sets: EvalSets, tokenizer: Any, cfg: Any) -> int:
    """Log what the protocol does with blank and long captions; returns the query token limit."""
    limit = query_token_limit(cfg, sets.protocol)
    if sets.blank_captions:
        logger.info("protocol %s: %d whitespace-only caption(s) %s", sets.protocol, sets.blank_captions,
                    "kept as queries, as the authors" if sets.protocol == "authors" else "left out of the queries")
    if sets.protocol == "authors":
        lengths = [len(ids) for ids in tokenizer(sets.texts)["input_ids"]]
        longer = sum(n > cfg.text.max_text_len for n in lengths)
        logger.info("protocol %s: captions are not truncated at text.max_text_len=%d (%d are longer; the longest "
                    "has %d ids)%s", sets.protocol, cfg.text.max_text_len, longer, max(lengths),
                    "" if max(lengths) <= limit else f"; {sum(n > limit for n in lengths)} exceed "
                    f"model.max_text_positions={limit} and are cut there")
    return limit


def evaluate_model(model: torch.nn.Module, records: Sequence[Record], tokenizer: Any, cfg: Any,
                   device: torch.device | str, split_name: str, calibration: dict | None = None,
                   keep_features: bool = False) -> dict:
    """Evaluate ``model`` on one split's records; every rank calls it and gets the same results.

    Returns {"split", "protocol" (see describe_protocol), "t2i", "i2t", "t2i_rerank" and "t2i_blend" (only when
    re-ranking), "chance_R1", "counts", "no_match", "calibration", "encode_seconds", "rerank_seconds" (when
    re-ranking), "examples" (when eval.save_examples > 0)}; metric dicts are those of ``retrieval_metrics``
    (percentages). ``calibration``: the one carried with the model (a checkpoint's "calibration", measured on
    val): its "no good match" threshold and blend weight are applied and measured here instead of chosen here;
    results["calibration"] is what this evaluation used or chose (what a checkpoint carries). Logs one table
    per direction. ``keep_features``: also results["features"], see :func:`feature_record`.
    """
    device = torch.device(device)
    protocol, data_format = protocol_of(cfg)
    sets = build_eval_protocol(records, protocol, data_format)
    options = metric_options(protocol)
    ev = cfg.eval
    rerank_k = int(ev.rerank_top_k)
    if rerank_k > 0 and not getattr(model, "has_fusion", False):
        raise EvaluationError(f"eval.rerank_top_k={rerank_k} needs a model with a fusion stack (model.fusion_layers > 0); "
                         "set eval.rerank_top_k=0")
    check_images_exist(sets.image_paths)
    set_max_image_pixels(cfg.data.max_image_pixels)
    transform = build_test_transform(cfg.input)
    amp = bool(ev.amp)
    num_workers = int(cfg.data.num_workers)
    was_training = model.training
    model.eval()

    logger.info("evaluating on %s (protocol %s): %d captions, %d gallery images, %d rank(s)", split_name, protocol,
                sets.num_queries, sets.num_gallery, get_world_size())
    if sets.dropped_captions:
        logger.info("protocol %s: %d captions of more than %d words dropped, as the authors", protocol,
                    sets.dropped_captions, AUTHORS_MAX_WORDS[data_format])
    if sets.cut_captions:
        logger.info("protocol %s: %d captions of more than %d words cut, as the authors", protocol,
                    sets.cut_captions, AUTHORS_CUT_WORDS[data_format])
    token_limit = log_caption_lengths(sets, tokenizer, cfg)
    began = time.perf_counter()
    image_feats = encode_images(model, sets.image_paths, transform, ev.batch_size, device, amp, num_workers)
    text_feats = encode_texts(model, tokenizer, sets.texts, token_limit, ev.batch_size, device, amp)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    results: dict[str, Any] = {"split": split_name, "protocol": describe_protocol(sets, data_format),
                               "encode_seconds": time.perf_counter() - began}
    if keep_features:
        results["features"] = feature_record(sets, text_feats, image_feats)

    query_pids = sets.query_pids.to(device)
    gallery_pids = sets.gallery_pids.to(device)
    chunk = int(ev.chunk_size)
    want_examples = int(ev.save_examples) > 0
    results["t2i"] = retrieval_metrics(text_feats, image_feats, query_pids, gallery_pids, chunk_size=chunk,
                                       per_query=want_examples, **options)
    per_query = results["t2i"].pop("per_query", None)
    results["i2t"] = retrieval_metrics(image_feats, text_feats, gallery_pids, query_pids, chunk_size=chunk, **options)
    results["chance_R1"] = chance_r1(query_pids, gallery_pids)
    results["match_threshold"] = match_threshold(text_feats, image_feats, query_pids, gallery_pids, chunk)
    results["no_match"] = calibrate_no_match(
        lambda texts: encode_texts(model, tokenizer, texts, token_limit, ev.batch_size, device, amp),
        sets.texts, text_feats, image_feats, query_pids, gallery_pids, chunk, ev,
        (calibration or {}).get("no_match"))
    results["counts"] = {"queries": sets.num_queries, "gallery_images": sets.num_gallery,
                         "identities": int(torch.unique(sets.query_pids).numel())}

    rerank = None
    if rerank_k > 0:
        rerank, per_query = _rerank(model, tokenizer, sets, text_feats, image_feats, cfg, transform, device,
                                    want_examples, options, results, calibration)
    results["calibration"] = calibration_record(results, calibration)
    if want_examples:
        results["examples"] = _examples(text_feats, image_feats, query_pids, gallery_pids, per_query,
                                        int(ev.save_examples), str(ev.examples_pick), rerank)
    model.train(was_training)
    log_results(results)
    return results


def feature_record(sets: EvalSets, text_feats: torch.Tensor, image_feats: torch.Tensor) -> dict:
    """The features one evaluation computed, with what each row is: evaluate.py --save-features writes it.

    texts [Q] (the query captions as encoded), text_features [Q, D], query_pids [Q], query_image_ids [Q];
    image_paths [G], image_features [G, D], gallery_pids [G], gallery_image_ids [G]; the features float32 on the
    CPU as engine.encoding returns them (before L2 normalisation), rows in the protocol's order.
    """
    return {"protocol": sets.protocol, "texts": list(sets.texts), "text_features": text_feats.detach().float().cpu(),
            "query_pids": sets.query_pids.cpu(), "query_image_ids": sets.query_image_ids.cpu(),
            "image_paths": list(sets.image_paths), "image_features": image_feats.detach().float().cpu(),
            "gallery_pids": sets.gallery_pids.cpu(), "gallery_image_ids": sets.gallery_image_ids.cpu()}


def calibration_record(results: dict, carried: dict | None) -> dict:
    """What a checkpoint carries from this evaluation: the "no good match" rule and the blend weight, and the
    split they were chosen on (the carried record unchanged when the evaluation applied one)."""
    if carried:
        return carried
    rule = {k: results["no_match"].get(k) for k in CARRIED_KEYS}
    weight = results.get("rerank_blend", {}).get("weight")
    return {"split": results["split"], "no_match": rule, "rerank_blend_weight": weight}


def log_results(results: dict) -> None:
    """The metric tables of ``evaluate_model``'s results, one per direction, in the log."""
    counts = results["counts"]
    split = results["split"]
    sizes = f"{counts['queries']} captions, {counts['gallery_images']} images"
    protocol = results.get("protocol", {}).get("name", "standard")
    if protocol != "standard":
        sizes += f"; protocol {protocol}"
    shown = ("R1", "R5", "R10", "mAP", "mINP")
    tables = [("t2i", f"text-to-image on {split} ({sizes}; chance R@1 {results['chance_R1']:.3f}%)")]
    if "t2i_rerank" in results:
        tables.append(("t2i_rerank", f"text-to-image on {split}, ITM re-ranking of the top {results['rerank_top_k']}"))
    if "t2i_blend" in results:
        tables.append(("t2i_blend", f"text-to-image on {split}, cosine + {results['rerank_blend']['weight']:g} x ITM "
                                    f"in the top {results['rerank_top_k']}"))
    tables.append(("i2t", f"image-to-text on {split} ({sizes})"))
    for key, title in tables:
        logger.info("\n%s", format_metrics_table({m: results[key][m] for m in shown}, title))
    no_match = results.get("no_match", {})
    rates = no_match.get("short_queries", {})
    if no_match.get("thresholds") and rates.get("right_top1_flagged") is not None:
        below = " or ".join(f"{k} below {v['values'][0]:.3f} ({v['words'][0]:g} words) to {v['values'][1]:.3f} "
                            f"({v['words'][1]:g} words)" for k, v in no_match["thresholds"].items())
        logger.info("no good match (%s) on %s, %s as short queries: %.1f%% of right best answers flagged, "
                    "%s%% of queries about an absent person not flagged", below, split,
                    no_match.get("short_queries_from", "first clauses"), rates["right_top1_flagged"],
                    "-" if rates.get("absent_not_flagged") is None else f"{rates['absent_not_flagged']:.1f}")
        held_out = no_match.get("held_out")
        if held_out and held_out.get("splits_kept"):
            spans = {kind: held_out[kind]["right_top1_flagged"] for kind in ("short_queries", "full_captions")}
            where = results.get("calibration", {}).get("split") or "the calibration split"
            fitted, asked = no_match.get("fitted_quantile"), no_match.get("quantile")
            aim = ("" if fitted is None or fitted == asked else
                   f"; fitted at {100 * fitted:.1f}% of {where}'s right answers for {100 * asked:g}% of new people's")
            logger.info("no good match on new people: refitted on %d people of %s and read on the rest (%d splits), "
                        "right best answers flagged %s of short queries, %s of whole captions (10th to 90th "
                        "percentile)%s", held_out["people_fitted"], where, held_out["splits_kept"],
                        *("-" if span is None else f"{span[0]:.1f}-{span[-1]:.1f}%" for span in spans.values()), aim)


def _json_ready(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_metrics_json(path: str | Path, results: dict, checkpoint: str | Path | None, config: Any) -> None:
    """Write ``results`` with the checkpoint path, the config digest and the environment (library versions, git
    commit, device, world size) to ``path`` atomically (rank 0 only).

    Other ranks return at once; it holds no collective, so rank 0 may call it alone (callers barrier after).
    """
    if not is_main_process():
        return
    payload = {"checkpoint": None if checkpoint is None else str(checkpoint),
               "config_digest": config.digest(), "environment": environment_record(), **_json_ready(results)}
    text = json.dumps(payload, indent=2)
    atomic_write(path, lambda handle: handle.write(text.encode()))


def save_examples(out_dir: str | Path, results: dict, records: Sequence[Record], cfg: Any,
                  explain: Callable[[str, str], Any] | None = None) -> list[Path]:
    """PNGs of ``results["examples"]`` and an index.html listing them with their query text and metrics.

    See utils.visualize.save_query_examples; rank 0 only, no collective. ``cfg`` gives the protocol that
    ``results`` were computed under (the example indices refer to its queries and gallery). ``explain``
    (caption, image path) -> engine.explanation.Explanation adds each image's "why it matches" heatmap.
    """
    written: list[Path] = []
    examples = results.get("examples")
    if not (is_main_process() and examples and examples["query_indices"]):
        return written
    protocol, data_format = protocol_of(cfg)
    sets = build_eval_protocol(records, protocol, data_format)
    rows = examples["query_indices"]
    queries = [(sets.texts[i], int(sets.query_pids[i])) for i in rows]
    gallery = list(zip(sets.image_paths, sets.gallery_pids.tolist()))
    first_matches = [None if m is None else (m["index"], m["rank"], m["score"]) for m in examples["first_match"]]
    written = save_query_examples(out_dir, queries, gallery, torch.tensor(examples["indices"]),
                                  torch.tensor(examples["scores"]), len(rows), query_ids=rows,
                                  first_matches=first_matches, explain=explain)
    final = results["t2i_rerank"] if "t2i_rerank" in results else results["t2i"]
    ranked_by = (f"ITM re-ranking of the cosine top {results['rerank_top_k']}" if "t2i_rerank" in results
                 else "cosine similarity")
    picked = ("the queries whose first true match ranks lowest, worst first" if examples["pick"] == "worst"
              else "queries spread evenly over the split")
    summary = [("split", f"{results['split']} ({results['counts']['queries']} captions, "
                         f"{results['counts']['gallery_images']} gallery images, protocol {protocol})"),
               ("ranked by", ranked_by), ("queries shown", picked)]
    summary += [(name, f"{final[name]:.2f}%") for name in ("R1", "R5", "R10", "mAP") if name in final]
    entries = []
    for i, (path, row, (text, pid)) in enumerate(zip(written, rows, queries)):
        rank, ap, match = examples["first_hit_rank"][i], examples["ap"][i], examples["first_match"][i]
        hits = sum(gallery[j][1] == pid for j in examples["indices"][i])
        details = [("person", str(pid)),
                   ("first true match", "none in the gallery" if rank is None else f"rank {rank}"),
                   ("true matches in the top 10", str(hits)), ("AP", f"{100 * ap:.1f}%")]
        if match is not None:
            details.append(("shown on the right", f"the first true match, {Path(gallery[match['index']][0]).name}"))
        entries.append({"picture": path.name, "heading": f"query {row}", "text": text, "details": details})
    written.append(write_examples_index(Path(out_dir) / "index.html",
                                        f"Retrieval examples: {results['split']}", summary, entries))
    return written


# ----------------------------------------------------------------------------------- inside training
def evaluate_split(model: torch.nn.Module, splits: Any, split_name: str, tokenizer: Any, cfg: Any,
                   device: torch.device, output_dir: Path | None, checkpoint: str | None = None,
                   calibration: dict | None = None) -> dict | None:
    """Evaluate one split of ``splits`` (None when it is empty); writes metrics_<split>.json into ``output_dir``.
    ``calibration``: see evaluate_model."""
    records = getattr(splits, split_name, None) if splits is not None else None
    if not records:
        return None
    # Evaluation must not move the training RNG streams, or resumed runs would diverge from uninterrupted ones.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        results = evaluate_model(model, records, tokenizer, cfg, device, split_name, calibration)
    if output_dir is not None and is_main_process():
        write_metrics_json(output_dir / f"metrics_{split_name}.json", results, checkpoint, cfg)
    return results


def _served(results: dict) -> str:
    """The key of the ranking the model serves: the blend when re-ranking ran, else the cosine's."""
    return next(k for k in ("t2i_blend", "t2i_rerank", "t2i") if k in results)


def selection_score(results: dict, metric: str) -> float:
    """The model-selection number of ``eval.selection_metric`` of the ranking the model serves (_served)."""
    return selection_value(results[_served(results)], metric)


def selection_ranking(results: dict) -> str:
    """Which ranking selection_score read, in words: the epoch a run keeps, and so its test figures, depend on it
    (the same training kept another epoch, and another test R@1, when its blend's weight was 0.125 instead of 0)."""
    key = _served(results)
    if key == "t2i_blend":
        weight = results["rerank_blend"]["weight"]
        return f"cosine + {weight:g} x ITM" if weight else "the cosine order (blend weight 0)"
    return "ITM re-ranking" if key == "t2i_rerank" else "the cosine order"
