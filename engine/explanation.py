""""Why this person": one gallery image against one sentence, the score split over image regions and words.

models/explain.py computes the shares per token; this module tokenises the sentence, runs the model on the image
as the gallery saw it, groups word pieces back into the words of the sentence and keeps what a page or a picture
shows (used by the web page, retrieve.py's sheets and evaluate.py --save-examples).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from models.explain import explain_match


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

    def image_total(self) -> float:
        """The image side's shares summed (equal to ``score`` when ``exact``)."""
        return float(self.patch_map.double().sum()) + self.cls_share

    def text_total(self) -> float:
        """The text side's shares summed (equal to ``score`` when ``exact``)."""
        return sum(s for _, s in self.words) + self.special_share

    def top_words(self, n: int = 3) -> list[str]:
        """The ``n`` words with the largest positive shares, largest first."""
        ranked = sorted((w for w in self.words if w[1] > 0), key=lambda w: -w[1])
        return [w for w, _ in ranked[:n]]

    def summary(self) -> str:
        """One line: the score, how it splits on each side, and the words that match most."""
        how = "exactly" if self.exact else "by gradient x input (an attribution; the parts do not add up to it)"
        words = ", ".join(self.top_words()) or "none"
        return (f"score {self.score:.3f}, split {how}: image regions {float(self.patch_map.sum()):+.3f} and the "
                f"image's CLS token {self.cls_share:+.3f}; words {sum(s for _, s in self.words):+.3f} and "
                f"[CLS]/[SEP] {self.special_share:+.3f}. Words that match most: {words}")


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


def explain_with(model: Any, tokenizer: Any, cfg: Any, device: Any, text: str, image_path: str) -> Explanation:
    """The explanation of ``image_path``'s score for ``text`` (float32, no autocast, the test transform)."""
    from datasets.pixels import open_image
    from datasets.transforms import build_test_transform
    from engine.encoding import tokenize

    with open_image(image_path) as opened:
        pixels = build_test_transform(cfg.input)(opened.convert("RGB"))[None].to(device)
    ids, mask = tokenize(tokenizer, [text], cfg.text.max_text_len, device)
    was_training = model.training
    model.eval()
    try:
        match = explain_match(model, pixels, ids, mask)
    finally:
        model.train(was_training)
    words, special = _words(tokenizer, text, match.text, int(cfg.text.max_text_len))
    return Explanation(str(image_path), text, match.score, match.patch_map(), float(match.image[0]), words, special,
                       match.method, match.exact)
