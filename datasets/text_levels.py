"""Text granularities for multi-level alignment and pretraining caption cleaning (docs/recipe.md).

Every function here accepts any string (empty, punctuation only, no commas) and returns a string or list; the
random choices come from the ``random.Random`` passed in, so a seeded caller gets the same text every time.
"""
from __future__ import annotations

import random
import re
from typing import Sequence

LEVEL_NAMES = ("word", "phrase", "sentence")
MIN_CLAUSE_CHARS = 5  # the authors keep clauses strictly longer than this


def sentence_level(caption: str, lowercase: bool = True) -> str:
    """The whole caption (lower-cased, as the authors' datasets do)."""
    caption = caption.strip()
    return caption.lower() if lowercase else caption


def _clause_candidates(caption: str) -> list[str]:
    """Per sentence: its longest comma piece and the other pieces re-joined; those longer than 5 chars."""
    candidates = []
    for sentence in caption.strip().strip(".[]").split("."):
        pieces = sentence.split(",")
        longest = max(range(len(pieces)), key=lambda i: len(pieces[i]))  # first index on ties
        rest = ",".join(p for i, p in enumerate(pieces) if i != longest).strip(",")
        for text in (pieces[longest], rest):
            if len(text) > MIN_CLAUSE_CHARS and text.strip():
                candidates.append(text.strip())
    return candidates


def phrase_level(caption: str, rng: random.Random) -> str:
    """One clause drawn from the caption's longest-piece/remainder split; the whole caption if none qualifies."""
    candidates = _clause_candidates(caption)
    return rng.choice(candidates) if candidates else caption.strip()


# A small lexicon for the attribute-phrase chunker. Person-retrieval captions describe clothing, carried items
# and hair with colour/shape adjectives, so "modifiers followed by a noun" recovers most attribute phrases.
_COLOURS = frozenset(
    """
    black white red blue green yellow grey gray brown pink purple orange beige khaki tan navy maroon silver gold
    golden blond blonde brunette violet cream burgundy olive teal turquoise lavender dark light pale bright
    multicolored multicoloured colorful colourful plain
    """.split()
)
_ADJECTIVES = frozenset(
    """
    long short small large big little tall striped plaid checkered checked patterned printed floral spotted
    dotted loose tight baggy skinny slim thin thick sleeveless denim leather jean cotton wool woolen knit knitted
    fur furry straight curly wavy shoulder messenger tennis running baseball high low flat casual formal
    button zip hooded open closed ripped torn graphic solid heavy warm winter summer rain sport sports athletic
    cropped fitted puffy puffer hiking ankle knee
    """.split()
)
_ADJECTIVE_SUFFIXES = ("colored", "coloured", "sleeved", "length", "ish", "striped", "heeled", "rimmed", "framed")
_NOUNS = frozenset(
    """
    jacket shirt tshirt t-shirt tee top blouse sweater sweatshirt hoodie cardigan coat vest suit uniform dress
    skirt pants trousers jeans shorts leggings tights stockings socks shoes sneakers trainers boots sandals
    slippers heels flats loafers backpack bag handbag purse tote satchel briefcase suitcase luggage wallet hat
    cap beanie helmet hood glasses sunglasses spectacles mask scarf tie belt gloves watch bracelet necklace
    earrings umbrella hair ponytail bun braid beard mustache headphones earphones phone bottle box book folder
    bicycle bike scooter cart stroller sleeves sleeve collar stripes logo pattern print design jumpsuit overalls
    romper outfit clothes clothing apron camera basket paper bags
    """.split()
)
_CONJUNCTIONS = frozenset({"and", "or", "&"})
_WORD = re.compile(r"[a-z0-9]+(?:[-'][a-z0-9]+)*|[^\sa-z0-9]")


def _is_modifier(word: str) -> bool:
    if word in _COLOURS or word in _ADJECTIVES or word.endswith(_ADJECTIVE_SUFFIXES):
        return True
    # Hyphenated colour compounds: "light-blue", "black-and-white".
    parts = word.split("-")
    return len(parts) > 1 and all(p in _COLOURS or p in _ADJECTIVES or p in _CONJUNCTIONS for p in parts)


def _is_noun(word: str) -> bool:
    word = word.rsplit("-", 1)[-1] if word not in _NOUNS else word  # "tank-top" -> "top"
    if word in _NOUNS:
        return True
    return (word.endswith("s") and word[:-1] in _NOUNS) or (word.endswith("es") and word[:-2] in _NOUNS)


def attribute_phrases(caption: str) -> list[str]:
    """Short attribute noun phrases of a caption, in order, without duplicates.

    A phrase is one or more colour/adjective words (two of them may be joined by "and"/"or", as in
    "black and white shoes") followed by one or two clothing/accessory/hair nouns, e.g. "a man in a red jacket
    carrying a black backpack" -> ["red jacket", "black backpack"]. Deterministic and lower-cased.
    """
    words = _WORD.findall(caption.lower())
    phrases: list[str] = []
    i = 0
    while i < len(words):
        if not _is_modifier(words[i]):
            i += 1
            continue
        j = i + 1
        while j < len(words):
            if _is_modifier(words[j]):
                j += 1
            elif words[j] in _CONJUNCTIONS and j + 1 < len(words) and _is_modifier(words[j + 1]):
                j += 2
            else:
                break
        k = j
        while k < len(words) and k - j < 2 and _is_noun(words[k]):
            k += 1
        if k > j:
            phrase = " ".join(words[i:k])
            if phrase not in phrases:
                phrases.append(phrase)
        i = max(k, i + 1)
    return phrases


def _sample_join(items: Sequence[str], rng: random.Random) -> str:
    """k ~ U{1..len(items)} items sampled without replacement, joined with ',' as the authors do."""
    k = rng.randint(1, len(items))
    return ",".join(rng.sample(list(items), k))


def word_level(caption: str, phrases: Sequence[str] | None, rng: random.Random) -> str:
    """A random subset of attribute phrases: the annotation's ``phrases`` when present, else the chunker's;
    falling back to one clause (the authors' rule for an empty ``att``) and finally to the caption."""
    usable = [p.strip() for p in (phrases or ()) if p and p.strip()]
    if not usable:
        usable = attribute_phrases(caption)
    if usable:
        return _sample_join(usable, rng)
    candidates = _clause_candidates(caption)
    return rng.choice(candidates) if candidates else caption.strip()


def make_levels(
    caption: str,
    phrases: Sequence[str] | None,
    levels: Sequence[str],
    rng: random.Random,
    lowercase: bool = True,
) -> list[str]:
    """One text per name in ``levels`` (each of "word", "phrase", "sentence"), in that order."""
    caption = sentence_level(caption, lowercase)
    if lowercase and phrases:
        phrases = [p.lower() for p in phrases]
    texts = []
    for level in levels:
        if level == "sentence":
            texts.append(caption)
        elif level == "phrase":
            texts.append(phrase_level(caption, rng))
        elif level == "word":
            texts.append(word_level(caption, phrases, rng))
        else:
            raise ValueError(f"text.levels: unknown level {level!r}; expected names from {LEVEL_NAMES}")
    return texts


_PRETRAIN_DELETE = re.compile(r"[,.'!?\"()*#:;~]")


def pre_caption(caption: str, max_words: int) -> str:
    """Pretraining caption cleaning (§2.2): lower-case, drop punctuation, '-' and '/' to spaces,
    '<person>' to 'person', collapse whitespace, keep the first ``max_words`` words."""
    text = _PRETRAIN_DELETE.sub("", caption.lower())
    text = text.replace("-", " ").replace("/", " ").replace("<person>", "person")
    return " ".join(text.split()[:max_words])
