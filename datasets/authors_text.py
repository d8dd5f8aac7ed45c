"""How the authors' loaders see a caption's words, for protocol ``authors`` (engine/evaluation.py).

Their RSTPReid loader drops every caption of more than 90 words, counting words with its own split; their
ICFG-PEDES loader cuts a caption of more than 90 ``processed_tokens`` (a field of the annotation file) before the
first place the 91st token occurs in it, as a substring. Both rules are reproduced character for character, quirks
included, because a single caption counted differently changes the gallery and the published numbers.
"""
from __future__ import annotations

from typing import Sequence

AUTHORS_MAX_WORDS = 90  # both loaders' limit


def authors_words(caption: str) -> list[str]:
    """The RSTPReid loader's words of a raw (unstripped) caption.

    The caption is split on single spaces only (so two spaces in a row, or a leading or trailing space, give an
    empty word that counts; tabs and newlines stay inside words); a piece holding '.' is split on '.' alone, else
    one holding ',' on ',' alone, else one holding '?' on '?', and the empty parts of that split are dropped.
    """
    words: list[str] = []
    for piece in caption.split(" "):
        for mark in ".,?":
            if mark in piece:
                words.extend(part for part in piece.split(mark) if part)
                break
        else:
            words.append(piece)
    return words


def authors_word_count(caption: str) -> int:
    """len(authors_words(caption)): the number the RSTPReid loader compares with AUTHORS_MAX_WORDS."""
    return len(authors_words(caption))


def authors_cut(caption: str, tokens: Sequence[str], max_words: int = AUTHORS_MAX_WORDS) -> str | None:
    """The ICFG-PEDES loader's cut: with more than ``max_words`` tokens, ``caption`` up to the first occurrence
    of token ``max_words`` (0-based) as a substring; None when the caption is not cut (short enough, or the
    token does not occur, where the authors' loader would stop with an error)."""
    if len(tokens) <= max_words:
        return None
    at = caption.find(tokens[max_words])
    return None if at < 0 else caption[:at]
