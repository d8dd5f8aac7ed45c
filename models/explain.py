"""Why an image matches a sentence: the ranking score split over the image's tokens and the sentence's tokens.

The ranking score is the cosine of the two global features, s = <t, v> / (|t| |v|).

``model.feature_pool: mean`` (the global feature is the mean of the output tokens): with v = (1/N) sum_i v_i,
s = sum_i <t, v_i> / (N |t| |v|), so c_i = <t, v_i> / (N |t| |v|) is image token i's share and the shares add up
to s exactly (up to float rounding). The same holds for the words, with the roles of the modalities swapped.

``model.feature_pool: cls`` (the IVT recipe: the global feature is the output CLS token): the score is not a
sum over tokens, so the shares are gradient x input (Simonyan et al. 2014; Shrikumar et al. 2017) on the
tokens that enter the first transformer block: c_i = <ds/dx_i, x_i>. They point at the regions and words the
score is most sensitive to, weighted by their size; they do not add up to s (``exact`` is False).

Contrastive (``baseline``): why this image scores above a baseline image, s - <t, g> / |t|. The baseline is a
token map b [N, D] (``baseline_tokens``: the mean over some images, e.g. the gallery, of each one's tokens
divided by its feature's norm; g = mean_i b_i is then the mean of their unit features) or one feature g [D]
(taken as the same b_i = g at every position). With mean pooling it splits exactly: image token i's share is
<t, v_i / |v| - b_i> / (N |t|), each region measured against what the baseline images show at that place (so a
patch like every other picture's there gets about 0, not a share of the whole score), and word j's share is
<t_j, v / |v| - g> / (M |t|): the words whose direction this image has and the baseline lacks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F


@dataclass
class MatchExplanation:
    """score: the cosine of the two features; image: [N] shares of the image tokens (token 0 is CLS, then the
    patch grid row-major); text: [T] shares of the text tokens (padding 0); grid: the patch grid (rows, cols);
    method: "exact mean-pool decomposition" or "gradient x input"; exact: whether the shares add up to score."""

    score: float
    image: torch.Tensor
    text: torch.Tensor
    grid: tuple[int, int]
    method: str
    exact: bool
    baseline_score: Optional[float] = None  # <t, b> / |t| when contrastive: the shares add up to score - this
    image_method: str = ""  # how the image shares were found when not by ``method`` (explain_against_gallery)

    def patch_map(self) -> torch.Tensor:
        """The patch tokens' shares as a [rows, cols] map (the CLS token's share left out)."""
        return self.image[1:].reshape(self.grid)


def _mean_pool_shares(tokens: torch.Tensor, mask: Optional[torch.Tensor], other: torch.Tensor) -> torch.Tensor:
    """tokens [N, D] of one side, mask [N] or None, other's unit feature [D] -> shares [N] of <other, mean>/|mean|."""
    weights = torch.ones(tokens.shape[0], dtype=tokens.dtype, device=tokens.device) if mask is None \
        else mask.to(tokens.dtype)
    pooled = (tokens * weights[:, None]).sum(0) / weights.sum().clamp(min=1.0)
    return weights * (tokens @ other) / (weights.sum().clamp(min=1.0) * pooled.norm())


def explain_match(model: torch.nn.Module, image: torch.Tensor, ids: torch.Tensor,
                  mask: Optional[torch.Tensor], baseline: Optional[torch.Tensor] = None) -> MatchExplanation:
    """One image [1, 3, H, W] and one tokenised caption (ids [1, T], mask [1, T]) -> their MatchExplanation.

    baseline: [D] an image feature to explain against (normalised here), or None for the plain split of the
    score; only the mean-pool decomposition is contrastive (gradient x input ignores it: its gradient is the same).
    Runs in float32 with the model in eval mode (no token dropping); the caller picks the device.
    """
    if model.config.feature_pool != "mean":
        return _gradient_x_input(model, image, ids, mask)
    with torch.no_grad():
        image_tokens, image_feature = model.encode_image(image, bmm=False)
        text_tokens, text_feature, text_mask = model.encode_text_with_mask(ids, mask, bmm=False)
        t_unit, v_unit = F.normalize(text_feature.float(), dim=1)[0], F.normalize(image_feature.float(), dim=1)[0]
        image_shares = _mean_pool_shares(image_tokens[0].float(), None, t_unit)
        row_mask = None if text_mask is None else text_mask[0]
        score, against, method = float(t_unit @ v_unit), None, "exact mean-pool decomposition"
        if baseline is None:
            text_shares = _mean_pool_shares(text_tokens[0].float(), row_mask, v_unit)
        else:
            tokens = image_tokens[0].float()
            b = baseline.float().to(tokens.device)
            b = b.expand_as(tokens) if b.dim() == 1 else b  # [N, D]
            if b.shape != tokens.shape:
                raise ValueError(f"explain_match: baseline must be [{tokens.shape[1]}] or {tuple(tokens.shape)}, "
                                 f"got {tuple(baseline.shape)}")
            g = b.mean(0)
            against = float(t_unit @ g)
            image_shares = (tokens / tokens.mean(0).norm() - b) @ t_unit / tokens.shape[0]
            # <t, v/|v| - g> = s - <t, g>: the text side's decomposition with (v/|v| - g) as the other direction
            text_shares = _mean_pool_shares(text_tokens[0].float(), row_mask, v_unit - g)
            method = "exact contrastive mean-pool decomposition"
    return MatchExplanation(score, image_shares.cpu(), text_shares.cpu(), tuple(model.encoder.grid), method, True,
                            against)


@dataclass
class GalleryBaseline:
    """What some images (a gallery) look like on average, to explain a match against: tokens [N, D] (baseline_tokens:
    each image's output tokens over its feature's norm, averaged) and inputs [N, D] (entering_tokens, averaged)."""

    tokens: torch.Tensor
    inputs: torch.Tensor


def explain_against_gallery(model: torch.nn.Module, image: torch.Tensor, ids: torch.Tensor,
                            mask: Optional[torch.Tensor], baseline: GalleryBaseline,
                            foils: Optional[torch.Tensor] = None, steps: int = 16) -> MatchExplanation:
    """Why an image [1, 3, H, W] scores above a gallery's average for a caption (ids, mask [1, T]), for a
    mean-pooling model. Words and score: explain_match against ``baseline.tokens`` (exact). Image regions:
    integrated gradients over the input patches from the gallery's mean input (``baseline.inputs``), of the
    score along the caption's unit feature t, or, with ``foils`` [D] (the mean unit feature of the same caption
    with its colour words changed), along t - foils: why this person fits these colours better than the others.

    The output tokens that explain_match splits over have been mixed by attention, so a patch's output token
    reports what the whole picture shows as much as what lies under it; the gradients on the input patches
    keep each share on the patch it came from. Measured with the pointing game (bench/bench_pointing.py).
    """
    match = explain_match(model, image, ids, mask, baseline.tokens)
    with torch.no_grad():
        _, text_feature = model.encode_text(ids, mask, bmm=False)
    direction = F.normalize(text_feature.float(), dim=1)[0]
    if foils is not None:
        direction = direction - foils.float().to(direction.device)
    match.image = integrated_gradients(model, image, direction, baseline.inputs, steps)
    match.image_method = ("integrated gradients over the input patches from the gallery's average picture, of the "
                          "score " + ("less its mean over the same words in other colours" if foils is not None
                                      else "for the description"))
    return match


@torch.no_grad()
def entering_tokens(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The image tokens entering the first transformer block (patch embeddings + positions; CLS first) of
    images [B, 3, H, W]: [B, N, D] float32."""
    seen: list[torch.Tensor] = []
    handle = model.encoder.blocks[0].register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    try:
        model.encode_image(images, bmm=False)
    finally:
        handle.remove()
    return seen[0].float()


def integrated_gradients(model: torch.nn.Module, image: torch.Tensor, direction: torch.Tensor,
                         start: torch.Tensor, steps: int = 16) -> torch.Tensor:
    """Integrated gradients (Sundararajan et al. 2017) of F(x) = <direction, v(x) / |v(x)|> over the image tokens
    entering the first block, on the straight path from ``start`` [N, D] (e.g. the gallery's mean entering tokens)
    to this image's [1, 3, H, W]: [N] shares, token i's the input difference x_i - start_i times the mean gradient
    at ``steps`` midpoints of the path; they add up to F(x) - F(start) up to the Riemann sum's error. Each share
    belongs to one input patch, not to an output token that attention has mixed with the others."""
    x = entering_tokens(model, image)[0]  # [N, D]
    start = start.float().to(x.device)
    alphas = (torch.arange(steps, dtype=x.dtype, device=x.device) + 0.5) / steps  # [S]
    path = (start + alphas[:, None, None] * (x - start)).requires_grad_(True)  # [S, N, D]

    def replace(_module, args):
        return (path.to(args[0].dtype), *args[1:])

    handle = model.encoder.blocks[0].register_forward_pre_hook(replace)
    try:
        with torch.enable_grad():
            _, feature = model.encode_image(image.expand(steps, -1, -1, -1), bmm=False)
            (F.normalize(feature.float(), dim=1) @ direction.float().to(x.device)).sum().backward()
    finally:
        handle.remove()
        model.zero_grad(set_to_none=True)
    return ((x - start) * path.grad.mean(0)).sum(-1).detach().cpu()


@torch.no_grad()
def baseline_tokens(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The contrastive baseline of some images [B, 3, H, W]: the mean over them of each one's image tokens divided
    by the norm of its (mean-pooled) feature, [N, D] float32; its token mean is the mean of their unit features."""
    return gallery_of(model, images).tokens


@torch.no_grad()
def gallery_of(model: torch.nn.Module, images: torch.Tensor) -> GalleryBaseline:
    """The GalleryBaseline of some images [B, 3, H, W] from one forward pass: their baseline_tokens and the mean
    of the tokens entering the first block (entering_tokens), each [N, D] float32."""
    seen: list[torch.Tensor] = []
    handle = model.encoder.blocks[0].register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    try:
        tokens, _ = model.encode_image(images, bmm=False)
    finally:
        handle.remove()
    tokens = tokens.float()
    return GalleryBaseline((tokens / tokens.mean(1, keepdim=True).norm(dim=2, keepdim=True)).mean(0),
                           seen[0].float().mean(0))


def _gradient_x_input(model: torch.nn.Module, image: torch.Tensor, ids: torch.Tensor,
                      mask: Optional[torch.Tensor]) -> MatchExplanation:
    """Gradient x input on the tokens entering the first block, for both modalities (see the module doc)."""
    entering: list[torch.Tensor] = []

    def keep(_module, args):
        x = args[0].detach().requires_grad_(True)  # a leaf of its own, whether or not the weights need grads
        entering.append(x)
        return (x, *args[1:])

    handle = model.encoder.blocks[0].register_forward_pre_hook(keep)
    try:
        with torch.enable_grad():
            _, image_feature = model.encode_image(image, bmm=False)
            _, text_feature = model.encode_text(ids, mask, bmm=False)
            score = (F.normalize(image_feature.float(), dim=1) * F.normalize(text_feature.float(), dim=1)).sum()
            score.backward()
            score = score.detach()
    finally:
        handle.remove()
        model.zero_grad(set_to_none=True)
    image_in, text_in = entering
    image_shares = (image_in.grad * image_in).sum(-1)[0].detach()
    text_shares = (text_in.grad * text_in).sum(-1)[0, : ids.shape[1]].detach()  # blocks may see padded text
    if mask is not None:
        text_shares = text_shares * mask[0].to(text_shares.dtype)
    return MatchExplanation(score.item(), image_shares.float().cpu(), text_shares.float().cpu(),
                            tuple(model.encoder.grid), "gradient x input", False)
