"""The training step's losses: IVT fine-tuning (CMPM over MLA x BMM) and the ITC/ITM/MLM objectives.

``RetrievalObjective`` wraps an :class:`~models.ivt.IVT` so that ``objective(batch)`` returns a dict whose
``*_loss`` entries the engine sums (already weighted) and whose other entries it logs. It is the module that DDP
wraps; checkpoints store the inner model's state dict.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from models.config import ModelConfigError
from models.ivt import IVT
from models.losses import (HARD_NEGATIVE_WEIGHT_FLOOR, cmpm_loss, gather_with_grad, itc_loss, itm_loss,
                           itm_rank_loss, itm_targets, mlm_loss, sample_hard_negatives)

ITM_OBJECTIVES = ("match", "rank")


def itm_objective_of(loss_cfg: Mapping[str, Any]) -> str:
    """``loss.itm_objective``, checked (a ModelConfigError names the key and the choices)."""
    objective = str(loss_cfg.get("itm_objective", "match"))
    if objective not in ITM_OBJECTIVES:
        raise ModelConfigError(f"loss.itm_objective must be one of {' | '.join(ITM_OBJECTIVES)}, got {objective!r}")
    return objective


def itm_negatives_of(loss_cfg: Mapping[str, Any]) -> int:
    """``loss.itm_negatives``, checked (a ModelConfigError names the key and what it must be)."""
    negatives = int(loss_cfg.get("itm_negatives", 1))
    if negatives < 1:
        raise ModelConfigError(f"loss.itm_negatives must be at least 1 (ITM negatives per anchor), got {negatives}")
    return negatives


class RetrievalObjective(nn.Module):
    """Computes the weighted losses of the recipe for one collated batch (see datasets.collate.TrainCollator)."""

    def __init__(self, model: IVT, loss_cfg: Mapping[str, Any]):
        super().__init__()
        self.model = model
        self.weights = {name: float(loss_cfg[f"{name}_weight"]) for name in ("cmpm", "itc", "itm", "mlm")}
        self.itc_normalize = bool(loss_cfg["itc_normalize"])
        self.gather = bool(loss_cfg["gather_features"])
        self.negative_check = str(loss_cfg.get("itm_negative_check", "host"))
        self.negative_hardness = float(loss_cfg.get("itm_negative_hardness", 1.0))
        self.hardness_ramp_epochs = float(loss_cfg.get("itm_negative_hardness_ramp_epochs", 0.0))
        self.negative_top_k = int(loss_cfg.get("itm_negative_top_k", 0))
        self.negatives = itm_negatives_of(loss_cfg)
        self.negative_floor = float(loss_cfg.get("itm_negative_floor", HARD_NEGATIVE_WEIGHT_FLOOR))
        self.exclude_same_caption = bool(loss_cfg.get("itm_exclude_same_caption", False))
        self.itm_objective = itm_objective_of(loss_cfg)
        self.itc_swap_negatives = bool(loss_cfg.get("itc_swap_negatives", False))
        if loss_cfg.get("itm_swap_words") and self.weights["itm"] > 0 and self.itm_objective != "match":
            raise ModelConfigError("loss.itm_swap_words adds negatives without a positive of their own: it needs "
                                   "loss.itm_objective match, not rank")
        self.epochs_done = 0.0  # training progress in epochs (set_progress), for the hardness ramp
        needs_fusion = self.weights["itm"] > 0 or self.weights["mlm"] > 0
        if needs_fusion and not model.has_fusion:
            raise ModelConfigError("loss.itm_weight/loss.mlm_weight > 0 need a fusion stack: set model.fusion_layers > 0")
        if not any(self.weights.values()):
            raise ModelConfigError("every loss weight is 0: set loss.cmpm_weight or loss.itc_weight/itm_weight/mlm_weight")
        self._freeze_unused()

    def _freeze_unused(self) -> None:
        # Parameters no loss reaches would get no gradient; freezing them keeps DDP free of
        # find_unused_parameters and keeps weight decay from shrinking them for nothing.
        self.model.temperature.requires_grad_(self.weights["itc"] > 0)
        if self.model.has_fusion:
            self.model.itm_head.requires_grad_(self.weights["itm"] > 0)
            self.model.mlm_head.requires_grad_(self.weights["mlm"] > 0)
            self.model.fusion.requires_grad_(self.weights["itm"] > 0 or self.weights["mlm"] > 0)

    def set_progress(self, epochs_done: float) -> None:
        """Where training stands (epochs, fractional): the ITM hardness ramp reads it."""
        self.epochs_done = float(epochs_done)

    def hardness(self) -> float:
        """The ITM negatives' hardness now: ``loss.itm_negative_hardness``, reached linearly from 0 (uniform) over
        ``loss.itm_negative_hardness_ramp_epochs`` when that is > 0 (a curriculum: a fusion stack from random
        weights learns on uniform negatives and stays at chance on the hardest ones)."""
        if self.hardness_ramp_epochs <= 0:
            return self.negative_hardness
        return self.negative_hardness * min(1.0, self.epochs_done / self.hardness_ramp_epochs)

    def _maybe_gather(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(gather_with_grad(t) for t in tensors) if self.gather else tensors

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        model, w = self.model, self.weights
        out: dict[str, torch.Tensor] = {}
        images = batch["images"]  # [V*B,3,H,W], view-major
        pids = batch["pids"]  # [B]
        batch_size = pids.shape[0]
        image_tokens, image_feats = model.encode_image(images, for_fusion=True)

        if w["cmpm"] > 0:
            # MLA x BMM: every view and every text level of the batch in one CMPM, person ids as targets.
            _, text_feats = model.encode_text(batch["text_ids"], batch["text_mask"])
            v, t, vp, tp = self._maybe_gather(image_feats, text_feats, batch["image_pids"], batch["text_pids"])
            out["cmpm_loss"] = w["cmpm"] * cmpm_loss(v, t, vp, tp)

        if w["itc"] > 0 or w["itm"] > 0 or w["mlm"] > 0:
            # The ALBEF-style objectives pair view 0 of each image with its full caption, never token-dropped,
            # so that MLM labels stay aligned with the caption tokens.
            view0_tokens, view0_feats = image_tokens[:batch_size], image_feats[:batch_size]
            caption_ids, caption_mask = batch["caption_ids"], batch["caption_mask"]
            caption_tokens, caption_feats = model.encode_text(caption_ids, caption_mask, bmm=False, for_fusion=True)
            temperature = model.temperature
            v, t = view0_feats, caption_feats
            if self.itc_normalize:
                v, t = F.normalize(v, dim=-1), F.normalize(t, dim=-1)
            swapped = self._swapped(batch)
            if w["itc"] > 0:
                gv, gt, vp, tp = self._maybe_gather(v, t, pids, pids)
                # this rank's swapped captions only: their number differs between ranks
                negatives = swapped[3] if swapped is not None and self.itc_swap_negatives else None
                if negatives is not None and self.itc_normalize:
                    negatives = F.normalize(negatives, dim=-1)
                out["itc_loss"] = w["itc"] * itc_loss(gv, gt, vp, tp, temperature, negative_texts=negatives)
                out["temperature"] = temperature.detach()
            if w["itm"] > 0:
                out["itm_loss"] = w["itm"] * self._itm(view0_tokens, v, caption_tokens, t, caption_mask, pids,
                                                      temperature, caption_ids, swapped)
            if w["mlm"] > 0:
                masked_tokens, _ = model.encode_text(batch["mlm_ids"], caption_mask, bmm=False, for_fusion=True)
                labels = batch["mlm_labels"]
                positions = labels != -100
                logits = model.mlm_logits(masked_tokens, caption_mask, view0_tokens, positions=positions)
                out["mlm_loss"] = w["mlm"] * mlm_loss(logits, labels[positions])
        return out

    def _swapped(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...] | None:
        """(rows [S], tokens [S,T,D], mask [S,T], features [S,D]) of the batch's word-swapped captions that differ
        from their caption (datasets.collate.swap_two_words), encoded as the captions are; None without any."""
        if "swap_ids" not in batch or batch["swap_ids"].shape[0] == 0:  # a shape: no read of device values
            return None
        mask = batch["swap_mask"]
        tokens, feats = self.model.encode_text(batch["swap_ids"], mask, bmm=False, for_fusion=True)
        return batch["swap_rows"], tokens, mask, feats

    def _itm(self, image_tokens, image_feats, text_tokens, text_feats, text_mask, pids, temperature,
             caption_ids=None, swapped=None) -> torch.Tensor:
        """ITM over B positives and 2B hard negatives (a different person id), fused in one batched call;
        ``loss.itm_negatives`` n > 1 draws n different negatives per anchor and direction, each weighing 1/n.

        Negatives are drawn from the softmax of the ITC similarities (``image_feats``/``text_feats`` as ITC sees
        them), so the hardest non-matching pairs are the likeliest. ``loss.itm_negative_hardness`` scales those
        logits: 1 is the authors' sampling, 0 draws uniformly among the other identities (a fusion stack trained
        from random weights stays at chance on the hardest pairs, but learns to ground words on random ones);
        see ``hardness`` for its ramp. ``loss.itm_negative_top_k`` keeps each anchor's k most similar candidates,
        ``loss.itm_exclude_same_caption`` never draws a caption identical to the anchor's (caption_ids [B, T]).
        ``loss.itm_objective`` rank trains the same pairs with :func:`~models.losses.itm_rank_loss` instead.
        ``swapped`` (see _swapped) adds S negatives: image i with its own caption, two attribute words exchanged,
        which no other image of the batch can stand in for: they ask the head which part each word belongs to.
        """
        hardness = self.hardness()
        with torch.no_grad():
            sim_i2t = image_feats.float() @ text_feats.float().t() / temperature.float()
            if hardness != 1.0:
                sim_i2t = sim_i2t * hardness
            never = None
            if self.exclude_same_caption and caption_ids is not None:  # [B images, B texts]: image i's own
                # caption is text j, token for token
                never = (caption_ids[:, None, :] == caption_ids[None, :, :]).all(dim=-1)
        n = self.negatives
        neg_image_for_text, neg_text_for_image = sample_hard_negatives(
            sim_i2t, pids, pids, check=self.negative_check, floor=self.negative_floor, top_k=self.negative_top_k,
            never=never, count=None if n == 1 else n)
        if n > 1:  # [B, n] -> [nB], draw-major: entry d * B + b is anchor b's draw d
            neg_image_for_text = neg_image_for_text.t().reshape(-1)
            neg_text_for_image = neg_text_for_image.t().reshape(-1)

        def anchors(x: torch.Tensor) -> torch.Tensor:  # [B, ...] -> [nB, ...], each anchor beside its n draws
            return x if n == 1 else x.repeat(n, *([1] * (x.dim() - 1)))

        texts = [text_tokens, anchors(text_tokens), text_tokens[neg_text_for_image]]
        masks = [text_mask, anchors(text_mask), text_mask[neg_text_for_image]]
        images = [image_tokens, image_tokens[neg_image_for_text], anchors(image_tokens)]
        text_features = [text_feats, anchors(text_feats), text_feats[neg_text_for_image]]
        image_features = [image_feats, image_feats[neg_image_for_text], anchors(image_feats)]
        if swapped is not None:
            rows, swap_tokens, swap_mask, swap_features = swapped
            texts.append(swap_tokens)
            masks.append(swap_mask)
            images.append(image_tokens[rows])
            text_features.append(swap_features)
            image_features.append(image_feats[rows])
        logits = self.model.itm_logits(torch.cat(texts), torch.cat(masks), torch.cat(images),
                                       features=(torch.cat(text_features), torch.cat(image_features)))
        if self.itm_objective == "rank":
            return itm_rank_loss(logits, n)
        targets = itm_targets(pids.shape[0], logits.device, n)
        targets = torch.cat([targets, targets.new_zeros(logits.shape[0] - targets.shape[0])])
        if n == 1:
            return itm_loss(logits, targets)
        # each of an anchor's n draws weighs 1/n: the authors' loss (one draw) in expectation, with less variance
        weights = torch.ones(logits.shape[0], device=logits.device)
        weights[pids.shape[0]:pids.shape[0] * (1 + 2 * n)] = 1.0 / n
        return itm_loss(logits, targets, weights)
