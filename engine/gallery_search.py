"""Searching a gallery index: the exact backend (chunked brute force) and the faiss backend (an approximate index
whose candidates are re-scored exactly from the stored features), and the rules that pick a faiss index type.

Index type rules (``choose_factory``; ``search.faiss_factory`` overrides them); n images of width d, budget B
bytes (``search.memory_budget_gib``), m = 2 x ``search.pq_bytes`` 4-bit sub-quantizers (lowered to a divisor of d,
and until the n x m / 2 bytes of codes fit B):

1. n < ``search.faiss_min_images``: ``Flat`` (every inner product; equal to the exact backend).
2. n <= ``search.scan_max_images``: ``PQ<m>x4fs``, every code scanned per query with faiss's SIMD fast-scan
   (48 bytes a vector at d=768), then the best ``search.rescore_candidates`` re-scored exactly (a query over 1M
   codes at d=768: 5.3 ms with 1000 candidates on this project's 2-core CPU, docs/scale.md). No partition, so
   nothing is missed for lying in a list the query does not visit: a caption sits farther from its person's images
   than they sit from each other (the modality gap), and an index partitioned or linked on image features (IVF
   lists, HNSW graphs) must be searched far deeper than its defaults to find them.
3. otherwise ``IVF<L>_HNSW32,PQ<m>x4fs``: the same codes in L lists, ``search.nprobe`` of them scanned per query.

L = 4 sqrt(n) rounded to a power of two, at most ``search.ivf_max_lists``; a coarse quantizer of 1024 lists
or more is an HNSW graph (assignment in microseconds instead of L dot products). IVF indexes are opened
memory-mapped (faiss.IO_FLAG_MMAP).
"""
from __future__ import annotations

import logging
import math
import os
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.gallery_index import (ANN_FILE, Gallery, GalleryError, SearchSettings, sha256_file, shards_content_id,
                                  write_manifest_update)

logger = logging.getLogger(__name__)

ADD_CHUNK_ROWS = 65536  # vectors per faiss add call (bounds the float32 copy of a float16 store)
RESCORE_QUERY_BLOCK = 64  # queries re-scored together (bounds the [block, distinct candidates] score matrix)


def faiss_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("faiss") is not None


def _import_faiss():
    try:
        import faiss
    except ImportError:
        raise GalleryError("search.backend faiss needs the faiss package: pip install -r requirements-search.txt"
                           ) from None
    return faiss


def ivf_lists(count: int, settings: SearchSettings) -> int:
    """4 sqrt(count) rounded to a power of two, between 1 and ``search.ivf_max_lists`` (and <= count / 39,
    so that k-means has the 39 points per centroid faiss asks for)."""
    lists = 2 ** round(math.log2(max(1.0, 4 * math.sqrt(count))))
    return int(max(1, min(lists, settings.ivf_max_lists, count // 39 or 1)))


def code_subquantizers(count: int, dim: int, settings: SearchSettings) -> int:
    """4-bit sub-quantizers per vector: 2 x ``search.pq_bytes``, lowered to a divisor of ``dim`` (each covers
    whole dimensions) and until ``count`` codes of m / 2 bytes fit ``search.memory_budget_gib``."""
    budget = settings.memory_budget_gib * 2**30
    for m in sorted((m for m in range(2, dim + 1, 2) if dim % m == 0 and m <= 2 * settings.pq_bytes), reverse=True):
        if count * m / 2 <= budget:
            return m
    raise GalleryError(f"{count} vectors do not fit search.memory_budget_gib={settings.memory_budget_gib} even "
                       "with 1 byte each; raise the budget or set search.faiss_factory")


def choose_factory(count: int, dim: int, settings: SearchSettings) -> tuple[str, str]:
    """(faiss factory string, the rule that chose it) for ``count`` vectors of width ``dim``."""
    if settings.faiss_factory:
        return settings.faiss_factory, "search.faiss_factory"
    if count < settings.faiss_min_images:
        return "Flat", f"fewer than search.faiss_min_images={settings.faiss_min_images}"
    m = code_subquantizers(count, dim, settings)
    if count <= settings.scan_max_images:
        return f"PQ{m}x4fs", f"<= search.scan_max_images={settings.scan_max_images}: every {m // 2}-byte code scanned"
    lists = ivf_lists(count, settings)
    quantizer = f"IVF{lists}_HNSW32" if lists >= 1024 else f"IVF{lists}"
    return (f"{quantizer},PQ{m}x4fs",
            f"> search.scan_max_images={settings.scan_max_images}: {m // 2}-byte codes in lists")


def _gallery_rows(gallery: Gallery, rows: np.ndarray) -> np.ndarray:
    """Rows [n, D] as the float32 array faiss takes (torch's float16 conversion: see as_float32)."""
    return as_float32(gallery.rows(rows)).numpy()


def build_ann(gallery: Gallery, settings: SearchSettings) -> dict:
    """Train (on a uniform sample) and fill a faiss index over ``gallery``, write it beside the manifest
    atomically, record it there; returns its manifest entry. Row i of the gallery is faiss id i."""
    faiss = _import_faiss()
    count, dim = len(gallery), gallery.dim
    factory, rule = choose_factory(count, dim, settings)
    logger.info("building the faiss index %s over %d vectors (%s)", factory, count, rule)
    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    sample = 0
    if not index.is_trained:
        rng = np.random.default_rng(settings.seed)
        sample = min(count, settings.train_sample_images)
        rows = np.sort(rng.choice(count, sample, replace=False)) if sample < count else np.arange(count)
        faiss.seed = settings.seed
        _set_training_seed(index, faiss, settings.seed)
        on_gpus = _cluster_on_gpus(index, faiss)  # held until training ends: faiss keeps no reference of its own
        index.train(_gallery_rows(gallery, rows))
        if on_gpus is not None:
            faiss.extract_index_ivf(index).clustering_index = None
            del on_gpus
    for start in range(0, count, ADD_CHUNK_ROWS):
        index.add(_gallery_rows(gallery, np.arange(start, min(count, start + ADD_CHUNK_ROWS))))
    return _write_ann(gallery, index, {"factory": factory, "rule": rule, "trained_on": sample})


def _write_ann(gallery: Gallery, index: Any, entry: dict) -> dict:
    """Write ``index`` beside the manifest atomically and record it there as covering every row of ``gallery``."""
    faiss = _import_faiss()
    target = gallery.folder / ANN_FILE
    tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    faiss.write_index(index, str(tmp))
    os.replace(tmp, target)
    entry = {**entry, "file": ANN_FILE, "count": len(gallery), "bytes": target.stat().st_size,
             "sha256": sha256_file(target), "covers": gallery.content_id,
             "covers_shards": len(gallery.manifest.get("shards", []))}
    write_manifest_update(gallery.folder, {"ann": entry})
    gallery.manifest["ann"] = entry
    gallery.ann = None
    return entry


def extend_ann(gallery: Gallery, settings: SearchSettings) -> dict | None:
    """Add the rows a gallery gained at its end to its faiss index, without training it again; returns the new
    manifest entry, or None when the index cannot be extended (no index yet, rows changed or removed before the
    end, or the rules now pick another index type): then it is built anew.

    A nightly update appends shards of new images and keeps the old ones in order, so the old rows keep their
    faiss ids; the codebooks trained on a sample of the old gallery encode the new images (a rebuild, e.g.
    after the gallery doubled, trains on a sample of all)."""
    entry = gallery.manifest.get("ann")
    shards = gallery.manifest.get("shards", [])
    covered = (entry or {}).get("covers_shards")
    if not entry or covered is None or covered > len(shards):
        return None
    prefix = shards_content_id(shards[:covered])
    old_rows = sum(s["count"] for s in shards[:covered])
    factory = choose_factory(len(gallery), gallery.dim, settings)[0]
    if prefix != entry["covers"] or old_rows != entry["count"] or factory != entry["factory"]:
        return None
    faiss = _import_faiss()
    path = gallery.folder / entry["file"]
    try:
        index = faiss.read_index(str(path))
    except RuntimeError:
        return None
    if index.ntotal != old_rows:
        return None
    for start in range(old_rows, len(gallery), ADD_CHUNK_ROWS):
        index.add(_gallery_rows(gallery, np.arange(start, min(len(gallery), start + ADD_CHUNK_ROWS))))
    logger.info("added %d new images to the faiss index %s (trained on %d of the first %d)", len(gallery) - old_rows,
                entry["factory"], entry["trained_on"], entry.get("trained_of", old_rows))
    keep = {key: entry[key] for key in ("factory", "rule", "trained_on") if key in entry}
    return _write_ann(gallery, index, {**keep, "trained_of": entry.get("trained_of", old_rows)})


def _set_training_seed(index: Any, faiss: Any, seed: int) -> None:
    """k-means of the IVF lists and the product quantizer draw from ``seed`` (reproducible builds)."""
    try:
        ivf = faiss.extract_index_ivf(index)
        ivf.cp.seed = seed
    except RuntimeError:  # not an IVF index
        pass


def _cluster_on_gpus(index: Any, faiss: Any) -> Any:
    """With faiss's GPU build and a GPU, the k-means of IVF lists runs there (as autofaiss does): the one step of a
    build whose cost grows with lists x sample. Fast-scan codes have no GPU kernel, so search stays on the CPU."""
    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if gpus < 1 or not hasattr(faiss, "index_cpu_to_all_gpus"):
        return None
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:  # no lists to cluster
        return None
    on_gpus = faiss.index_cpu_to_all_gpus(faiss.IndexFlatL2(ivf.d))
    ivf.clustering_index = on_gpus
    logger.info("k-means of the %d IVF lists on %d GPU(s)", ivf.nlist, gpus)
    return on_gpus


def open_ann(gallery: Gallery) -> Any:
    """The gallery's faiss index (memory-mapped when it is an IVF), or None when it has none or a stale one."""
    entry = gallery.manifest.get("ann")
    if not entry:
        return None
    if entry.get("covers") != gallery.content_id:
        logger.warning("%s: the faiss index was built for other contents; searching exactly until it is rebuilt "
                       "(python -m engine.build_index ... rebuilds it)", gallery.folder)
        return None
    faiss = _import_faiss()
    path = gallery.folder / entry["file"]
    if not path.is_file() or path.stat().st_size != entry["bytes"]:
        raise GalleryError(f"{path}: missing or truncated faiss index (expected {entry['bytes']} bytes); rebuild "
                           "it with python -m engine.build_index")
    flags = faiss.IO_FLAG_MMAP if "IVF" in entry["factory"] else 0
    try:
        return faiss.read_index(str(path), flags)
    except RuntimeError as exc:
        raise GalleryError(f"{path}: not a readable faiss index ({str(exc).splitlines()[0]})") from None


def as_float32(block: np.ndarray) -> torch.Tensor:
    """A float32 tensor of a (read-only, memory-mapped) block: a view for float32, torch's vectorised conversion
    for float16 (several times faster than numpy's)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only memory map: torch only reads it
        return torch.from_numpy(block).float()


def exact_search(gallery: Gallery, queries: torch.Tensor, k: int, chunk_rows: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` cosine scores and row indices [Q, k'] (k' = min(k, G)) of queries [Q, D] (float32, normalised)
    over the whole gallery, ``chunk_rows`` gallery rows per matrix product: memory stays bounded at any size.
    With one chunk it is the plain ``queries @ features.T`` + top-k."""
    k = min(k, len(gallery))
    best_scores = best_idx = None
    for start, block in gallery.chunks(chunk_rows):
        scores = queries @ as_float32(block).t()  # [Q, rows]
        top_scores, top_idx = torch.topk(scores, min(k, scores.shape[1]), dim=1)
        top_idx = top_idx + start
        if best_scores is None:
            best_scores, best_idx = top_scores, top_idx
        else:
            merged_scores = torch.cat([best_scores, top_scores], dim=1)
            order = torch.topk(merged_scores, min(k, merged_scores.shape[1]), dim=1).indices
            best_scores = merged_scores.gather(1, order)
            best_idx = torch.cat([best_idx, top_idx], dim=1).gather(1, order)
    return best_scores, best_idx


def set_search_depth(ann: Any, factory: str, candidates: int, settings: SearchSettings) -> None:
    """nprobe / efSearch for ``candidates`` results per query: the configured values, raised in proportion when
    more than ``search.rescore_candidates`` candidates are asked for (large k)."""
    import faiss

    scale = max(1, math.ceil(candidates / settings.rescore_candidates))
    params = []
    if "IVF" in factory:
        ivf = faiss.extract_index_ivf(ann)
        nprobe = min(ivf.nlist, settings.nprobe * scale)
        params.append(f"nprobe={nprobe}")
        if "_HNSW" in factory:
            params.append(f"quantizer_efSearch={max(settings.ef_search, 2 * nprobe)}")
    elif "HNSW" in factory:
        params.append(f"efSearch={max(settings.ef_search, candidates)}")
    if params:
        faiss.ParameterSpace().set_index_parameters(ann, ",".join(params))


def rescore(gallery: Gallery, queries: torch.Tensor, candidates: np.ndarray, k: int
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact cosine of each query [Q, D] with its candidate rows [Q, C] (-1: none), the best ``k`` of them.

    Queries go RESCORE_QUERY_BLOCK at a time: each block's candidates are read once and scored as one matrix
    product [block, U] over their U distinct rows, which for all Q at once would grow as Q x Q x C."""
    if len(queries) > RESCORE_QUERY_BLOCK:
        parts = [rescore(gallery, queries[i:i + RESCORE_QUERY_BLOCK], candidates[i:i + RESCORE_QUERY_BLOCK], k)
                 for i in range(0, len(queries), RESCORE_QUERY_BLOCK)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    valid = candidates >= 0
    flat = np.unique(candidates[valid])
    rows = as_float32(gallery.rows(flat))  # [U, D]
    position = np.searchsorted(flat, np.where(valid, candidates, flat[0] if len(flat) else 0))
    scores = (queries @ rows.t()).gather(1, torch.from_numpy(position))  # [Q, U] -> [Q, C]
    scores = scores.masked_fill(~torch.from_numpy(valid), float("-inf"))
    top_scores, order = torch.topk(scores, min(k, scores.shape[1]), dim=1)
    return top_scores, torch.from_numpy(candidates).gather(1, order)


def ann_search(gallery: Gallery, ann: Any, queries: torch.Tensor, k: int, settings: SearchSettings
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` of the faiss candidates, re-scored exactly: every returned score is the true cosine."""
    candidates = min(len(gallery), max(settings.rescore_candidates, 4 * k))
    set_search_depth(ann, gallery.manifest["ann"]["factory"], candidates, settings)
    _, found = ann.search(np.ascontiguousarray(queries.numpy(), dtype=np.float32), candidates)
    found = found.astype(np.int64)
    if settings.expand_top > 0:
        set_search_depth(ann, gallery.manifest["ann"]["factory"], candidates,
                         replace(settings, nprobe=settings.expand_nprobe, ef_search=settings.expand_nprobe))
        found = expand_candidates(gallery, ann, queries, found, candidates, settings.expand_top)
    return rescore(gallery, queries, found, min(k, len(gallery)))


def expand_candidates(gallery: Gallery, ann: Any, queries: torch.Tensor, found: np.ndarray, candidates: int,
                      top: int) -> np.ndarray:
    """Candidate rows [Q, C'] : the first pass's ``found`` [Q, C] plus, for each query, the approximate neighbours
    of its ``top`` best images (by exact cosine), duplicates set to -1.

    A caption is not where the images are: its features sit farther from its person's pictures than those
    pictures sit from each other (the modality gap), so an index partitioned on image features misses some of
    them at any affordable depth. A stored image feature is an in-distribution query: the images of the same person
    lie around the first pass's best hits, and one more search from those finds them. The union is re-scored
    with the caption, so the ranking stays the exact cosine."""
    _, best = rescore(gallery, queries, found, top)  # [Q, top] gallery rows
    best = best.numpy()
    hops = _gallery_rows(gallery, np.where(best >= 0, best, 0).reshape(-1))  # [Q * top, D]
    _, near = ann.search(hops, max(1, candidates // top))
    near = np.where(np.repeat(best.reshape(-1, 1) >= 0, near.shape[1], axis=1), near, -1)
    merged = np.sort(np.concatenate([found, near.reshape(len(found), -1)], axis=1), axis=1)
    merged[:, 1:][merged[:, 1:] == merged[:, :-1]] = -1  # each row at most once
    return merged


def search(gallery: Gallery, queries: torch.Tensor, k: int, settings: SearchSettings
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores and row indices [Q, min(k, G)] of the best ``k`` gallery rows per query [Q, D], by the backend that
    ``search.backend`` and the index select (exact when the index has no faiss index or backend is exact)."""
    queries = queries.float().contiguous()
    if settings.backend != "exact" and gallery.manifest.get("ann"):
        if gallery.ann is None:
            gallery.ann = open_ann(gallery) or False
        if gallery.ann is not False:
            return ann_search(gallery, gallery.ann, queries, k, settings)
    elif settings.backend == "faiss" and gallery.folder is None:
        logger.debug("an in-memory gallery has no faiss index; searching exactly")
    return exact_search(gallery, queries, k, settings.exact_chunk_rows)


def wants_ann(count: int, settings: SearchSettings) -> bool:
    """Whether a build makes a faiss index: always for backend faiss, from faiss_min_images on for auto."""
    if settings.backend == "faiss":
        _import_faiss()
        return True
    return settings.backend == "auto" and count >= settings.faiss_min_images and faiss_available()


def describe_ann(folder: Path, entry: dict | None) -> str:
    if not entry:
        return "exact (no faiss index)"
    return f"faiss {entry['factory']} ({entry['bytes'] / 2**20:.1f} MiB, trained on {entry['trained_on']})"
