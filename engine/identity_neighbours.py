"""Which training identities look alike to the model now: the neighbours of ``sampler.neighbour_batches``.

With it, each P x K batch is one identity and the identities the model confuses most with it
(``sampler.neighbour_share`` of the other P - 1), so the negatives of every loss (CMPM's, ITC's and the ITM head's
drawn ones) are as hard as the top of a ranking of the whole training set instead of a random handful: an ITM head
that re-ranks a cosine top k learns on the kind of pairs it will re-rank. Refreshed at the start of every epoch
from the current weights.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

# Rows of the identity-by-identity similarity computed at once (bounds its memory at 11k+ identities).
SIMILARITY_ROWS = 4096


def per_identity_mean(features: torch.Tensor, owners: torch.Tensor, count: int) -> torch.Tensor:
    """features [N, D] (L2-normalised here), owners [N] in 0..count-1 -> [count, D], each row the normalised mean
    of its identity's features."""
    sums = torch.zeros(count, features.shape[1], device=features.device)
    sums.index_add_(0, owners.to(features.device), F.normalize(features.float(), dim=-1))
    return F.normalize(sums, dim=-1)


def nearest_identities(text_means: torch.Tensor, image_means: torch.Tensor, listed: int) -> np.ndarray:
    """text_means, image_means [P, D] (unit rows) -> [P, listed] int64, each identity's others, most alike first.

    Alike means the symmetric cross-modal cosine (a's captions against b's images and b's against a's): the
    confusions text-to-image retrieval makes, in both directions.
    """
    count = text_means.shape[0]
    listed = min(listed, count - 1)
    rows = []
    for begin in range(0, count, SIMILARITY_ROWS):
        stop = min(begin + SIMILARITY_ROWS, count)
        similarity = 0.5 * (text_means[begin:stop] @ image_means.T + image_means[begin:stop] @ text_means.T)
        similarity[torch.arange(stop - begin), torch.arange(begin, stop)] = float("-inf")  # never oneself
        rows.append(similarity.topk(listed, dim=1).indices.cpu())
    return torch.cat(rows).numpy()


def identity_neighbours(model: torch.nn.Module, records: Sequence[Any], identity_pids: Sequence[int], tokenizer: Any,
                        cfg: Any, device: torch.device, pids_per_batch: int) -> np.ndarray:
    """[identities, listed] int64 neighbour lists, in the order of ``identity_pids`` (the sampler's); listed =
    ``sampler.neighbours_listed`` x P (at most the other identities).

    Every training caption and image is encoded with the evaluation transform (each image once); a collective
    when distributed (the features are sharded and gathered, so every rank gets the same lists).
    """
    from datasets.transforms import build_test_transform
    from engine.encoding import encode_images, encode_texts

    began = time.perf_counter()
    slot = {int(pid): i for i, pid in enumerate(identity_pids)}
    first_of_image: dict[str, int] = {}
    for record in records:
        first_of_image.setdefault(record.image_path, slot[int(record.pid)])
    ev, was_training = cfg.eval, model.training
    model.eval()
    try:
        images = encode_images(model, list(first_of_image), build_test_transform(cfg.input), int(ev.batch_size),
                               device, bool(ev.amp), int(cfg.data.num_workers))
        texts = encode_texts(model, tokenizer, [r.caption for r in records], int(cfg.text.max_text_len),
                             int(ev.batch_size), device, bool(ev.amp))
    finally:
        model.train(was_training)
    count = len(identity_pids)
    image_means = per_identity_mean(images, torch.tensor(list(first_of_image.values())), count)
    text_means = per_identity_mean(texts, torch.tensor([slot[int(r.pid)] for r in records]), count)
    neighbours = nearest_identities(text_means, image_means, int(cfg.sampler.neighbours_listed) * pids_per_batch)
    logger.info("neighbour batches: the %d nearest of each of %d identities, from %d images and %d captions "
                "(%.1f s)", neighbours.shape[1], count, len(first_of_image), len(records),
                time.perf_counter() - began)
    return neighbours
