""""Why this person": one gallery image against one sentence, the score split over image regions and words.

models/explain.py computes the shares per token; this module tokenises the sentence, runs the model on the image
as the gallery saw it, groups word pieces back into the words of the sentence and keeps what a page or a picture
shows (used by the web page, retrieve.py's sheets and evaluate.py --save-examples).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from models.explain import GalleryBaseline, explain_against_gallery, explain_match, gallery_of

# Words that carry no description of a person: never listed as a reason for a match, whatever their share.
FUNCTION_WORDS = frozenset("""
a an the this that these those and or but with without of in on at to from by for over under into onto near
is are was were be been being has have had having does do did wears wearing worn wore carries carrying holds
holding dressed who which while also too very just some any one he she they his her their its him them it
person pedestrian people someone looks look appears seems walking standing
""".split())

# The eleven basic colour terms of English (Berlin & Kay): a description's colour words are swapped for each of the
# others to make its foils (colour_foils); "grey" is read as "gray" and never a foil of it.
COLOURS = ("black", "white", "red", "green", "yellow", "blue", "brown", "purple", "pink", "orange", "gray")


@dataclass
class Explanation:
    """score: the cosine the ranking uses; patch_map: [rows, cols] float shares of the image patches;
    cls_share: the image CLS token's share; words: (word, share) in sentence order; special_share: the text's
    [CLS]/[SEP] tokens' share; method and exact as models.explain.MatchExplanation."""

    image_path: str
    text: str
    score: float
    patch_map: torch.Tensor
    cls_share: float
    words: list[tuple[str, float]]
    special_share: float
    method: str
    exact: bool
    baseline_score: Optional[float] = None  # the baseline's score when contrastive (the shares add up to the gap)
    baseline: str = ""  # what the baseline is, for the page ("the gallery's average picture")
    image_method: str = ""  # how the image shares were found when not as the words' (models.explain)
    foils: int = 0  # how many descriptions in other colours the image map was contrasted with (colour_foils)

    def image_total(self) -> float:
        """The image side's shares summed (equal to ``score`` when ``exact``)."""
        return float(self.patch_map.double().sum()) + self.cls_share

    def text_total(self) -> float:
        """The text side's shares summed (equal to ``score`` when ``exact``)."""
        return sum(s for _, s in self.words) + self.special_share

    def top_words(self, n: int = 3) -> list[str]:
        """The ``n`` descriptive words with the largest positive shares, largest first (FUNCTION_WORDS never)."""
        ranked = sorted((w for w in self.words if w[1] > 0 and w[0].lower() not in FUNCTION_WORDS),
                        key=lambda w: -w[1])
        return [w for w, _ in ranked[:n]]

    def summary(self) -> str:
        """One line: the score, how it splits on each side, and the words that match most."""
        how = "exactly" if self.exact else "by gradient x input (an attribution; the parts do not add up to it)"
        words = ", ".join(self.top_words()) or "none"
        what = f"score {self.score:.3f}"
        if self.baseline_score is not None:
            what = (f"score {self.score:.3f} against {self.baseline_score:.3f} for {self.baseline}: the gap "
                    f"{self.score - self.baseline_score:+.3f}")
        text = (f"words {sum(s for _, s in self.words):+.3f} and [CLS]/[SEP] {self.special_share:+.3f}. Words that "
                f"match most: {words}")
        if self.image_method:
            return (f"{what}, split {how} over the words: {text}. Image regions {float(self.patch_map.sum()):+.3f} "
                    f"and the image's CLS token {self.cls_share:+.3f} by {self.image_method}")
        return (f"{what}, split {how}: image regions {float(self.patch_map.sum()):+.3f} and the "
                f"image's CLS token {self.cls_share:+.3f}; {text}")


def colour_foils(text: str) -> list[str]:
    """``text`` with each of its colour words (COLOURS) in turn replaced by each other colour: the descriptions it
    is contrasted with ("a red coat" -> "a black coat", "a white coat", ...); [] without a colour word."""
    import re

    pieces = re.split(r"(\w+)", text)
    foils = []
    for i, piece in enumerate(pieces):
        colour = "gray" if piece.lower() == "grey" else piece.lower()
        if colour in COLOURS:
            foils += ["".join(pieces[:i] + [other] + pieces[i + 1:]) for other in COLOURS if other != colour]
    return foils


def _words(tokenizer: Any, text: str, shares: torch.Tensor, max_text_len: int
           ) -> tuple[list[tuple[str, float]], float]:
    """Group token shares [T] into the words of ``text`` (a word = the pieces of one pre-tokenised word)."""
    encoded = tokenizer([text], truncation=True, max_length=max_text_len, return_offsets_mapping=True)
    word_ids = encoded.word_ids(0)
    offsets = encoded["offset_mapping"][0]
    words: dict[int, list] = {}
    special = 0.0
    for position, word in enumerate(word_ids):
        share = float(shares[position]) if position < shares.numel() else 0.0
        if word is None:
            special += share
            continue
        start, end = offsets[position]
        entry = words.setdefault(word, [start, end, 0.0])
        entry[1] = end
        entry[2] += share
    return [(text[start:end], share) for start, end, share in words.values()], special


def pixels_of(cfg: Any, paths: Sequence[str], device: Any) -> torch.Tensor:
    """The images at ``paths`` as the gallery saw them: [B, 3, H, W] (the test transform)."""
    from datasets.pixels import open_image
    from datasets.transforms import build_test_transform

    transform = build_test_transform(cfg.input)
    loaded = []
    for path in paths:
        with open_image(path) as opened:
            loaded.append(transform(opened.convert("RGB")))
    return torch.stack(loaded).to(device)


def gallery_baseline(model: Any, cfg: Any, device: Any, paths: Sequence[str], limit: int = 128,
                     batch_size: int = 32) -> Optional[GalleryBaseline]:
    """The contrastive baseline of a gallery (models.explain.GalleryBaseline over at most ``limit`` of its images,
    spread evenly), or None for a model whose explanations are not contrastive (CLS pooling)."""
    if model.config.feature_pool != "mean" or not paths:
        return None
    step = max(1, len(paths) // limit)
    chosen = list(paths)[::step][:limit]
    was_training = model.training
    model.eval()
    tokens, inputs = [], []
    try:
        with torch.no_grad():
            for i in range(0, len(chosen), batch_size):
                pixels = pixels_of(cfg, chosen[i:i + batch_size], device)
                part = gallery_of(model, pixels)
                tokens.append(part.tokens * pixels.shape[0])
                inputs.append(part.inputs * pixels.shape[0])
    finally:
        model.train(was_training)
    return GalleryBaseline(torch.stack(tokens).sum(0) / len(chosen), torch.stack(inputs).sum(0) / len(chosen))


def explain_with(model: Any, tokenizer: Any, cfg: Any, device: Any, text: str, image_path: str,
                 baseline: Optional[Any] = None, baseline_name: str = "the gallery's average picture"
                 ) -> Explanation:
    """The explanation of ``image_path``'s score for ``text`` (float32, no autocast, the test transform); with
    ``baseline`` why it scores above that baseline: a GalleryBaseline (gallery_baseline: the image regions by
    integrated gradients against ``text``'s colour foils, models.explain.explain_against_gallery), or one image
    feature [D] or token map [N, D] (models.explain.explain_match)."""
    import torch.nn.functional as F

    from engine.encoding import tokenize

    pixels = pixels_of(cfg, [image_path], device)
    ids, mask = tokenize(tokenizer, [text], cfg.text.max_text_len, device)
    was_training = model.training
    model.eval()
    try:
        foils = []
        if isinstance(baseline, GalleryBaseline):
            foils = colour_foils(text)
            foil = None
            if foils:
                with torch.no_grad():
                    _, features = model.encode_text(*tokenize(tokenizer, foils, cfg.text.max_text_len, device),
                                                    bmm=False)
                foil = F.normalize(features.float(), dim=1).mean(0)
            match = explain_against_gallery(model, pixels, ids, mask, baseline, foil, int(cfg.eval.explain_steps))
        else:
            match = explain_match(model, pixels, ids, mask, baseline)
    finally:
        model.train(was_training)
    words, special = _words(tokenizer, text, match.text, int(cfg.text.max_text_len))
    return Explanation(str(image_path), text, match.score, match.patch_map(), float(match.image[0]), words, special,
                       match.method, match.exact, match.baseline_score,
                       baseline_name if match.baseline_score is not None else "", match.image_method, len(foils))
