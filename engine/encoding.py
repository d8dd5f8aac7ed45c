"""The encoders every search and evaluation uses: batched, sharded image and caption features, ITM re-scoring.

Evaluation (engine.evaluation), the retrieval service (engine.retrieval) and the web page all encode through
these functions, so a feature means the same thing everywhere. Each rank encodes a contiguous shard of its
inputs and the shards are gathered back in order (no duplicated or padded rows); at world size 1 with no
process group nothing is gathered.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from datasets.build import worker_init
from datasets.train_data import EvalImageDataset
from datasets.workers import closing_workers, start_workers
from utils.amp import autocast
from utils.distributed import broadcast_object, gather_in_order, is_distributed, shard_counts, shard_range


# ------------------------------------------------------------------------------------------- encoding
def _image_loader(dataset: Dataset, batch_size: int | None, device: torch.device, num_workers: int) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      pin_memory=torch.device(device).type == "cuda", worker_init_fn=worker_init)


def _gather_rows(local: torch.Tensor, total: int, row_shape: tuple[int, ...]) -> torch.Tensor:
    """All ranks' contiguous shards of a [total, *row_shape] tensor, in order; the tensor itself at world size 1."""
    if local.numel() == 0:
        local = local.reshape((0,) + row_shape)
    return gather_in_order(local, shard_counts(total))


def _feature_dim(local_dim: int | None) -> int:
    """The feature width on every rank: rank 0 always holds a non-empty shard, the others may not."""
    return broadcast_object(local_dim) if is_distributed() else int(local_dim or 0)


def encode_images(model: torch.nn.Module, paths: Sequence[str], transform: Callable, batch_size: int,
                  device: torch.device | str, amp: bool, num_workers: int = 0) -> torch.Tensor:
    """Global image features [G, D] float32 on ``device``, in the order of ``paths``.

    Each rank encodes its ``shard_range`` of the paths through a DataLoader over EvalImageDataset; the shards
    are gathered back in order (no duplicated or padded rows). Call ``model.eval()`` first.
    """
    device = torch.device(device)
    start, stop = shard_range(len(paths))
    loader = _image_loader(EvalImageDataset(list(paths[start:stop]), transform), batch_size, device, num_workers)
    feats = []
    with torch.inference_mode(), autocast(device, amp), closing_workers(start_workers(loader)) as batches:
        for images, _ in batches:
            _, feature = model.encode_image(images.to(device, non_blocking=True), bmm=False)
            feats.append(feature.float())
    local = torch.cat(feats) if feats else torch.zeros((0, 0), device=device)
    dim = _feature_dim(local.shape[1] if feats else None)
    return _gather_rows(local, len(paths), (dim,))


def tokenize(tokenizer: Any, texts: Sequence[str], max_text_len: int, device: torch.device | str
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [B, T] and attention mask [B, T] (1 = token), padded to the longest, cut at ``max_text_len``."""
    batch = tokenizer(list(texts), padding="longest", truncation=True, max_length=max_text_len,
                      return_tensors="pt")
    return batch["input_ids"].to(device), batch["attention_mask"].to(device)


def encode_text_tokens(model: torch.nn.Module, tokenizer: Any, texts: Sequence[str], max_text_len: int,
                       device: torch.device | str, for_fusion: bool = False
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One batch of captions -> (tokens [B, T, D], mask [B, T], feature [B, D]) in the autocast dtype; tokens as
    IVT.encode_text returns them (``for_fusion``: those the fusion stack reads).

    Call inside ``torch.inference_mode()`` and the autocast context; used for features and re-ranking.
    """
    ids, mask = tokenize(tokenizer, texts, max_text_len, device)
    tokens, feature = model.encode_text(ids, mask, bmm=False, for_fusion=for_fusion)
    return tokens, mask, feature


def encode_texts(model: torch.nn.Module, tokenizer: Any, texts: Sequence[str], max_text_len: int, batch_size: int,
                 device: torch.device | str, amp: bool) -> torch.Tensor:
    """Global text features [Q, D] float32 on ``device``, in the order of ``texts`` (sharded like images)."""
    device = torch.device(device)
    start, stop = shard_range(len(texts))
    feats = []
    with torch.inference_mode(), autocast(device, amp):
        for begin in range(start, stop, batch_size):
            chunk = texts[begin:min(begin + batch_size, stop)]
            feats.append(encode_text_tokens(model, tokenizer, chunk, max_text_len, device)[2].float())
    local = torch.cat(feats) if feats else torch.zeros((0, 0), device=device)
    dim = _feature_dim(local.shape[1] if feats else None)
    return _gather_rows(local, len(texts), (dim,))


# ------------------------------------------------------------------------------------------ re-ranking
class _PairChunkImages(Dataset):
    """Item i: the stacked images [n_i, 3, H, W] of pair chunk i's unique gallery images (in order)."""

    def __init__(self, paths: Sequence[str], transform: Callable, chunks: list[list[int]]):
        self.images = EvalImageDataset(list(paths), transform)
        self.chunks = chunks

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.stack([self.images[j][0] for j in self.chunks[i]])


def _pair_chunks(topk_idx: torch.Tensor, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Split the (query row, gallery index) pairs of ``topk_idx`` [q, k] into batches sorted by gallery index.

    Sorting by image means a batch holds few distinct images, so each gallery image is encoded about once
    in total instead of once per query that retrieved it. Yields (flat pair positions [b], gallery indices [b]).
    """
    flat = topk_idx.reshape(-1).cpu()
    order = torch.sort(flat, stable=True).indices
    for begin in range(0, order.numel(), batch_size):
        positions = order[begin:begin + batch_size]
        yield positions, flat[positions]


ITM_SCORES = ("match", "margin")


def itm_score(logits: torch.Tensor, score: str = "match") -> torch.Tensor:
    """Re-ranking score [B] float32 from ITM logits [B, 2] (index 1 = match).

    match: the match logit, as RaSa and APTM rank; margin: match minus no-match logit.
    """
    if score not in ITM_SCORES:
        raise ValueError(f"score must be one of {ITM_SCORES}, got {score!r}")
    logits = logits.float()
    return logits[:, 1] if score == "match" else logits[:, 1] - logits[:, 0]


def rerank_scores(model: torch.nn.Module, tokenizer: Any, texts: Sequence[str], image_paths: Sequence[str],
                  topk_idx: torch.Tensor, transform: Callable, max_text_len: int, batch_size: int,
                  device: torch.device | str, amp: bool, num_workers: int = 0, score: str = "match") -> torch.Tensor:
    """ITM scores [Q, k] float32 (see ``itm_score``) of each query's top-k images.

    topk_idx: [Q, k] gallery indices per query. Text and image tokens are recomputed per batch of
    ``batch_size`` pairs instead of being stored for the whole gallery; the ITM head's projection runs in
    float32 under autocast (IVT.itm_logits). Queries are sharded across ranks and the scores gathered back
    in order.
    """
    device = torch.device(device)
    num_queries, k = topk_idx.shape
    start, stop = shard_range(num_queries)
    local_idx = topk_idx[start:stop].cpu()
    batches = list(_pair_chunks(local_idx, batch_size))
    unique_images = [torch.unique(gallery).tolist() for _, gallery in batches]
    loader = _image_loader(_PairChunkImages(image_paths, transform, unique_images), None, device, num_workers)
    scores = torch.zeros(local_idx.numel(), device=device)
    with torch.inference_mode(), autocast(device, amp), closing_workers(start_workers(loader)) as loaded:
        for (positions, gallery), images, image_ids in zip(batches, loaded, unique_images):
            image_tokens, image_feats = model.encode_image(images.to(device, non_blocking=True), bmm=False,
                                                           for_fusion=True)
            query_rows = positions // k + start
            unique_queries, query_inverse = torch.unique(query_rows, return_inverse=True)
            text_tokens, text_mask, text_feats = encode_text_tokens(
                model, tokenizer, [texts[q] for q in unique_queries.tolist()], max_text_len, device, for_fusion=True)
            text_rows = query_inverse.to(device)
            image_rows = torch.searchsorted(torch.tensor(image_ids), gallery).to(device)
            logits = model.itm_logits(text_tokens[text_rows], text_mask[text_rows], image_tokens[image_rows],
                                      features=(text_feats[text_rows], image_feats[image_rows]))
            scores[positions.to(device)] = itm_score(logits, score)
    local = scores.reshape(stop - start, k)
    return _gather_rows(local, num_queries, (k,))
