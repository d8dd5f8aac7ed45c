"""Training losses: CMPM, id-aware ITC, ITM with hard negatives, MLM, and cross-rank gathering.

Every function is pure (no module state, no global config). Person id defines "positive" everywhere:
two items with the same id are a positive pair, whatever their position in the batch.
Losses are computed in float32 even under autocast, because softmax over raw (unnormalised) CLS
features overflows or loses precision in bf16/fp16.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

__all__ = [
    "cmpm_loss",
    "itc_loss",
    "gather_with_grad",
    "sample_hard_negatives",
    "itm_targets",
    "itm_loss",
    "mlm_loss",
]


def _check_pairs(name: str, feats: torch.Tensor, ids: torch.Tensor, what: str) -> None:
    if feats.dim() != 2:
        raise ValueError(f"{name}: {what} features must be [n, D], got shape {tuple(feats.shape)}")
    if ids.dim() != 1 or ids.shape[0] != feats.shape[0]:
        raise ValueError(
            f"{name}: {what} ids must be [{feats.shape[0]}] to match the features, got shape {tuple(ids.shape)}"
        )


def _no_autocast(device: torch.device):
    return torch.autocast(device_type=device.type, enabled=False)


def cmpm_loss(
    image_feats: torch.Tensor,
    text_feats: torch.Tensor,
    image_pids: torch.Tensor,
    text_pids: torch.Tensor,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Cross-modal projection matching loss (IVT / Zhang & Lu 2018), as in the authors' code.

    Args:
        image_feats: [N, D] image embeddings, NOT normalised (the raw vector is projected on the unit text vector).
        text_feats: [M, D] text embeddings, NOT normalised.
        image_pids: [N] person ids of the images.
        text_pids: [M] person ids of the texts.
        eps: added to the targets inside the log, so non-matching pairs cost p * -log(eps).

    Returns:
        scalar float32: KL_i2t + KL_t2i, each the mean over its query rows of KL(p_i || q_i), where
        p_i = softmax_j(v_i . t_j / ||t_j||) (no temperature) and q_ij = 1[same pid] / sqrt(#positives in row i).
        With N = M and the same labels on both sides, q equals the authors' Y / ||Y_row||.
        A row without any positive has q = 0 everywhere (no NaN); it is then penalised at p * -log(eps).
    """
    _check_pairs("cmpm_loss", image_feats, image_pids, "image")
    _check_pairs("cmpm_loss", text_feats, text_pids, "text")
    if image_feats.shape[1] != text_feats.shape[1]:
        raise ValueError(
            f"cmpm_loss: image and text features differ in width: {image_feats.shape[1]} vs {text_feats.shape[1]}"
        )
    with _no_autocast(image_feats.device):
        v = image_feats.float()
        t = text_feats.float()
        same = (image_pids[:, None] == text_pids[None, :]).float()  # [N, M]

        def direction(query: torch.Tensor, key: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            logits = query @ F.normalize(key, dim=1).t()
            q = cmpm_targets(labels)
            # p from softmax and log p from log_softmax, as the authors (exp(log_softmax) differs in the last bits)
            kl = F.softmax(logits, dim=1) * (F.log_softmax(logits, dim=1) - torch.log(q + eps))
            return kl.sum(dim=1).mean()

        return direction(v, t, same) + direction(t, v, same.t())


def cmpm_targets(labels: torch.Tensor) -> torch.Tensor:
    """CMPM's target distribution: labels [N, M] float 0/1 -> q [N, M] = labels / ||labels row||_2.

    The L2 norm of the row (``norm``, not ``sum().sqrt()``, which differs by one ulp for some counts such as
    19, 34 or 37 positives) keeps q bit-equal to the authors' targets. A row without a positive would divide
    0 by 0; the clamp leaves it at 0 (a norm of a non-empty 0/1 row is at least 1, so it changes nothing else).
    """
    return labels / labels.norm(dim=1, keepdim=True).clamp(min=1.0)


def itc_loss(
    image_feats: torch.Tensor,
    text_feats: torch.Tensor,
    image_ids: torch.Tensor,
    text_ids: torch.Tensor,
    temperature: torch.Tensor,
    negative_texts: torch.Tensor | None = None,
) -> torch.Tensor:
    """Image-text contrastive loss with id-aware soft targets (ALBEF/IVT pretraining style).

    Args:
        image_feats: [N, D] image embeddings, used as given (the caller decides whether to normalise).
        text_feats: [M, D] text embeddings, used as given.
        image_ids: [N] ids (person id, or record index for one-hot targets).
        text_ids: [M] ids.
        temperature: scalar tensor (may be a learnable parameter; gradients flow through it).
        negative_texts: [S, D] or None: more text embeddings, a negative of every image, in the image-to-text
            direction only (they have no image of their own to be ranked against).

    Returns:
        scalar float32: 0.5 * (CE_i2t + CE_t2i), each a soft cross-entropy against the same-id matrix
        normalised to sum 1 per row. A row without any same-id partner contributes 0.
    """
    _check_pairs("itc_loss", image_feats, image_ids, "image")
    _check_pairs("itc_loss", text_feats, text_ids, "text")
    if temperature.numel() != 1:
        raise ValueError(f"itc_loss: temperature must be a scalar tensor, got shape {tuple(temperature.shape)}")
    with _no_autocast(image_feats.device):
        logits = image_feats.float() @ text_feats.float().t() / temperature.float().reshape(())  # [N, M]
        same = (image_ids[:, None] == text_ids[None, :]).float()

        def soft_ce(lg: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            target = labels / labels.sum(dim=1, keepdim=True).clamp(min=1.0)
            return -(target * F.log_softmax(lg, dim=1)).sum(dim=1).mean()

        i2t_logits, i2t_same = logits, same
        if negative_texts is not None and negative_texts.shape[0]:
            extra = image_feats.float() @ negative_texts.float().t() / temperature.float().reshape(())  # [N, S]
            i2t_logits, i2t_same = torch.cat([logits, extra], dim=1), torch.cat([same, torch.zeros_like(extra)], dim=1)
        return 0.5 * (soft_ce(i2t_logits, i2t_same) + soft_ce(logits.t(), same.t()))


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All-gather along dim 0, keeping the gradient of the local slice only.

    Args:
        x: [B, ...], the same shape on every rank (all_gather needs equal sizes).

    Returns:
        [world * B, ...] ordered by rank; rank r's rows are x itself on rank r (so gradients reach x),
        detached copies elsewhere. Identity without a process group or with world size 1.
    """
    world, rank = _world()
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    parts[rank] = x
    return torch.cat(parts, dim=0)


# Added to every softmax weight before the same-id entries are zeroed, as the authors do: it keeps a floor
# under the far negatives, so they are still drawn now and then when one candidate dominates the row.
HARD_NEGATIVE_WEIGHT_FLOOR = 1e-4


@torch.no_grad()
def sample_hard_negatives(
    sim_i2t: torch.Tensor,
    image_pids: torch.Tensor | None,
    text_pids: torch.Tensor | None,
    generator: torch.Generator | None = None,
    check: str = "host",
    floor: float = HARD_NEGATIVE_WEIGHT_FLOOR,
    top_k: int = 0,
    never: torch.Tensor | None = None,
    count: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one hard negative per anchor (or ``count`` different ones), never one that shares the anchor's person id.

    Args:
        sim_i2t: [B, B] image-to-text similarities, already divided by the temperature (row = image i,
            column = text j); the t2i weights use its transpose.
        image_pids: [B] person ids of the images, or None (with text_pids None) for "item i pairs only with
            item i": then only the diagonal is excluded.
        text_pids: [B] person ids of the texts, or None.
        generator: optional torch.Generator for reproducible draws (must live on sim_i2t's device).
        check: how a row without any allowed negative is caught. "host" reads one flag pair back (a host-device
            sync per call) and raises ValueError naming the counts; "device" queues an asynchronous assert
            (``torch._assert_async``: no sync; on CUDA a failure is a device-side assert that ends the process,
            on CPU a RuntimeError); the draws are the same either way.
        floor: added to every softmax weight (the authors 1e-4; APTM and MRA 1e-5): no allowed negative is
            impossible, however dissimilar.
        top_k: > 0 keeps only each anchor's ``top_k`` most similar allowed candidates (by ``sim_i2t``): the pairs a
            re-ranking of the cosine top k will meet; 0 keeps every allowed candidate.
        never: [B images, B texts] bool, pairs that are no true non-match although their ids differ (e.g. the
            same caption written for two persons); excluded like same-id pairs, except in a row where they would
            leave no candidate (that row keeps them rather than fail).
        count: None draws one negative per row (``torch.multinomial``, as the authors). n draws n per row from the
            same weights without replacement (Gumbel top-n); a row with m < n candidates cycles through its m
            draws to fill its n.

    Returns:
        neg_image_for_text: [B] long (count n: [B, n]), for each text j the index of an image with a different pid.
        neg_text_for_image: [B] long (count n: [B, n]), for each image i the index of a text with a different pid.

    Sampling weights follow the authors' ITM: per row w = softmax(sim) + 1e-4, the softmax taken over the whole
    row (same-id entries included), then the entries sharing the anchor's pid set to 0, then one multinomial
    draw (which renormalises). This is NOT the same distribution as a softmax over the allowed entries only:
    the same-id entries still take their share of the softmax mass, so the floor weighs more when the anchor's
    own pair dominates the row, and every allowed entry keeps a probability of at least
    1e-4 / (1 + 1e-4 * B) whatever its similarity.

    Raises:
        ValueError: when some row has no allowed negative (every item in the batch shares its pid), with
            check="host"; see ``check`` for "device".
    """
    if sim_i2t.dim() != 2 or sim_i2t.shape[0] != sim_i2t.shape[1]:
        raise ValueError(f"sample_hard_negatives: sim_i2t must be [B, B], got shape {tuple(sim_i2t.shape)}")
    b = sim_i2t.shape[0]
    if (image_pids is None) != (text_pids is None):
        raise ValueError("sample_hard_negatives: give both image_pids and text_pids, or neither")
    if image_pids is None:
        same_i2t = torch.eye(b, dtype=torch.bool, device=sim_i2t.device)
    else:
        if image_pids.shape != (b,) or text_pids.shape != (b,):
            raise ValueError(
                f"sample_hard_negatives: pids must be [{b}], got image {tuple(image_pids.shape)}, "
                f"text {tuple(text_pids.shape)}"
            )
        same_i2t = image_pids[:, None] == text_pids[None, :]  # [B images, B texts]
    _check_every_row_has_a_negative(same_i2t, check)
    w_t2i, w_i2t = _negative_weights(sim_i2t.float(), same_i2t, never, floor, top_k)
    if count is not None:
        return _draw_without_replacement(w_t2i, count, generator), _draw_without_replacement(w_i2t, count, generator)
    neg_image_for_text = torch.multinomial(w_t2i, 1, generator=generator).squeeze(1)
    neg_text_for_image = torch.multinomial(w_i2t, 1, generator=generator).squeeze(1)
    return neg_image_for_text, neg_text_for_image


def _check_every_row_has_a_negative(same_i2t: torch.Tensor, check: str) -> None:
    """sample_hard_negatives' check (see its ``check``) that every image row and text column of same_i2t [B, B]
    holds an entry of another person."""
    b = same_i2t.shape[0]
    if check == "device":
        no_negative = same_i2t.all(dim=1).any() | same_i2t.all(dim=0).any()
        torch._assert_async(~no_negative, "sample_hard_negatives: some image or text row has no negative with a "
                            "different person id in the batch; the sampler must put at least two identities in each batch")
        n_bad_images = n_bad_texts = 0
    elif check == "host":
        # one sync for the whole batch; the alternative is multinomial failing (or a device assert on CUDA)
        n_bad_images, n_bad_texts = torch.stack([same_i2t.all(dim=1).sum(), same_i2t.all(dim=0).sum()]).tolist()
    else:
        raise ValueError(f"sample_hard_negatives: check must be 'host' or 'device', got {check!r}")
    if n_bad_images or n_bad_texts:
        raise ValueError(
            f"sample_hard_negatives: {n_bad_images} of {b} image rows and {n_bad_texts} of {b} text rows have no "
            f"negative with a different person id in the batch; the sampler must put at least two identities in "
            f"each batch"
        )


def _draw_without_replacement(weights: torch.Tensor, count: int, generator: torch.Generator | None) -> torch.Tensor:
    """[B, count] long: per row of weights [B, C] (>= 0, a positive entry in every row), ``count`` different
    columns drawn in proportion to the weights without replacement: the ``count`` largest log-weights plus Gumbel
    noise are such a draw (the Gumbel top-k trick). A row with m < ``count`` positive entries cycles through its m
    draws, so that no zero-weight column is ever returned."""
    if count < 1:
        raise ValueError(f"sample_hard_negatives: count must be at least 1, got {count}")
    uniform = torch.rand(weights.shape, generator=generator, device=weights.device).clamp_(min=1e-20)
    keys = weights.log() - (-uniform.log()).log()  # log w + Gumbel(0, 1); -inf where w is 0
    drawn = keys.topk(min(count, weights.shape[1]), dim=1)  # sorted: a row's candidates before its -inf entries
    # no branch on the values read back: the draw queues on the device without a host sync
    available = torch.isfinite(drawn.values).sum(dim=1, keepdim=True).clamp(min=1)  # [B, 1]
    cycled = torch.arange(count, device=weights.device)[None, :] % available  # draw j of a row with m: its j mod m
    return drawn.indices.gather(1, cycled)


def _negative_weights(sim: torch.Tensor, same_i2t: torch.Tensor, never: torch.Tensor | None, floor: float,
                      top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The sampling weights ([texts, images], [images, texts]) of sample_hard_negatives; sim [B images, B texts]."""
    banned_i2t, banned_t2i = _banned_pairs(same_i2t, never)
    w_t2i = (sim.t().softmax(dim=1) + floor).masked_fill(banned_t2i, 0.0)
    w_i2t = (sim.softmax(dim=1) + floor).masked_fill(banned_i2t, 0.0)
    if top_k > 0:
        w_t2i = _keep_top_k(w_t2i, sim.t(), banned_t2i, top_k)
        w_i2t = _keep_top_k(w_i2t, sim, banned_i2t, top_k)
    return w_t2i, w_i2t


def _banned_pairs(same_i2t: torch.Tensor, never: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """([images, texts], [texts, images]) bool: pairs never drawn. ``never`` [B, B] joins the same-id pairs in
    every row (of either direction) where it leaves at least one candidate."""
    if never is None:
        return same_i2t, same_i2t.t()
    both = same_i2t | never.to(same_i2t.device)
    rows = both.all(dim=1, keepdim=True)  # images left without a candidate keep the pairs of ``never``
    cols = both.all(dim=0, keepdim=True)  # texts likewise
    return torch.where(rows, same_i2t, both), torch.where(cols, same_i2t, both).t()


def _keep_top_k(weights: torch.Tensor, sim: torch.Tensor, banned: torch.Tensor, k: int) -> torch.Tensor:
    """weights [B, B] with every entry outside each row's k most similar allowed ones (by ``sim``) set to 0."""
    ranked = sim.masked_fill(banned, float("-inf"))
    kept = torch.zeros_like(banned).scatter_(1, ranked.topk(min(k, sim.shape[1]), dim=1).indices, True)
    return weights.masked_fill(~kept, 0.0)


def itm_targets(batch_size: int, device: torch.device | str, negatives: int = 1) -> torch.Tensor:
    """ITM labels [(1 + 2n)B] long: 1 for the B positive pairs, then 0 for the 2nB negatives (text -> negative
    image, then negative text -> image; n = ``negatives`` per anchor, draw-major)."""
    return torch.cat(
        [
            torch.ones(batch_size, dtype=torch.long, device=device),
            torch.zeros(2 * negatives * batch_size, dtype=torch.long, device=device),
        ]
    )


def itm_loss(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of the 2-way ITM head: logits [n, 2], targets [n] long -> scalar float32; with weights [n],
    the weighted mean (sum of weight x cross-entropy over the sum of the weights)."""
    if logits.dim() != 2 or logits.shape[1] != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(
            f"itm_loss: expected logits [n, 2] and targets [n], got {tuple(logits.shape)} and {tuple(targets.shape)}"
        )
    if weights is not None and weights.shape != targets.shape:
        raise ValueError(f"itm_loss: expected weights {tuple(targets.shape)}, got {tuple(weights.shape)}")
    with _no_autocast(logits.device):
        if weights is None:
            return F.cross_entropy(logits.float(), targets)
        per_pair = F.cross_entropy(logits.float(), targets, reduction="none")
        return (weights.float() * per_pair).sum() / weights.float().sum()


def itm_rank_loss(logits: torch.Tensor, negatives: int = 1) -> torch.Tensor:
    """Pairwise ranking loss of the 2-way ITM head: logits [(1 + 2n)B, 2] in :func:`itm_targets`' order (n =
    ``negatives`` per anchor) -> scalar float32.

    Each positive's match margin (logit 1 - logit 0) should exceed its negatives' (the anchor text with each
    negative image, the anchor image with each negative text): the mean of softplus(negative - positive) over each
    direction, averaged. Re-ranking only compares pairs of one query, so this asks the head for the ordering alone:
    an offset common to the pairs compared cancels, and the margin is no calibrated probability.
    """
    rows = 1 + 2 * negatives
    if logits.dim() != 2 or logits.shape[1] != 2 or logits.shape[0] % rows:
        raise ValueError(f"itm_rank_loss: expected logits [{rows}B, 2], got {tuple(logits.shape)}")
    with _no_autocast(logits.device):
        margin = logits[:, 1].float() - logits[:, 0].float()  # [(1 + 2n)B]
        positive, negative_image, negative_text = margin.view(rows, -1).split([1, negatives, negatives])
        return 0.5 * (F.softplus(negative_image - positive).mean() + F.softplus(negative_text - positive).mean())


def mlm_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Masked-language-model cross-entropy over the positions whose label is not ignore_index.

    Args:
        logits: [n, V] or [B, T, V] vocabulary logits.
        labels: [n] or [B, T] target token ids, ignore_index where nothing was masked.

    Returns:
        scalar float32: mean cross-entropy over the labelled positions; 0 (still attached to the graph, so
        backward works on every rank) when no position is labelled.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"mlm_loss: logits {tuple(logits.shape)} must be labels {tuple(labels.shape)} plus a vocabulary dim"
        )
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_labels = labels.reshape(-1)
    with _no_autocast(logits.device):
        total = F.cross_entropy(flat_logits.float(), flat_labels, ignore_index=ignore_index, reduction="sum")
        count = (flat_labels != ignore_index).sum().clamp(min=1)
        return total / count
