"""Caption helpers every style shares: articles, typos, and the words of a caption."""
from __future__ import annotations

import random
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


_KEYBOARD_NEIGHBOURS = {c: n for c, n in zip("abcdefghijklmnopqrstuvwxyz", (
    "sq", "vn", "xv", "sf", "wr", "dg", "fh", "gj", "uo", "hk", "jl", "k", "n", "bm", "ip", "o", "w", "et", "ad",
    "ry", "yi", "cb", "qe", "zc", "tu", "x"))}


def typo(word: str, rng: random.Random) -> str:
    """One annotator slip: a swapped, dropped, doubled or neighbouring letter."""
    i = rng.randrange(1, len(word) - 1)
    kind = rng.randrange(4)
    if kind == 0:
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]
    if kind == 1:
        return word[:i] + word[i + 1:]
    if kind == 2:
        return word[:i] + word[i] + word[i:]
    return word[:i] + rng.choice(_KEYBOARD_NEIGHBOURS.get(word[i], word[i])) + word[i + 1:]
