"""Caption helpers every style shares: articles, and the words of a caption."""
from __future__ import annotations

import re
from typing import Sequence

# Nouns that take no article (every style's plural garment, footwear and eyewear words).
PLURAL_WORDS = ("pants", "trousers", "slacks", "jeans", "shorts", "shoes", "sneakers", "trainers", "glasses",
                "chinos", "cut-offs", "joggers", "boots", "loafers", "sunglasses")


def article(phrase: str) -> str:
    """The noun phrase with its article: none for plurals, 'an' before a vowel sound."""
    if phrase.split()[-1] in PLURAL_WORDS:
        return phrase
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def tokens(caption: str) -> list[str]:
    """The lower-case words of one caption, as the CUHK-PEDES and ICFG-PEDES files list them."""
    return re.findall(r"[a-z0-9'-]+", caption.lower())


def caption_words(captions: Sequence[str]) -> set[str]:
    """The lower-case words of some captions (for comparing the styles' vocabularies)."""
    return {w for c in captions for w in tokens(c)}
