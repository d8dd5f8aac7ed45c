"""The BERT WordPiece tokenizer: loaded from a hub id / local folder, or learned from the train captions.

A learned vocabulary is stored in checkpoints as a token list (``tokenizer_vocab``) and rebuilt exactly with
``tokenizer_from_vocab``, so evaluating a checkpoint never depends on re-training the vocabulary.
"""
from __future__ import annotations

import heapq
import os
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Iterable, Sequence

from transformers import BertTokenizerFast

from utils.errors import UserError

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # ids 0..4 in a learned vocabulary
MIN_VOCAB = 1000


class TokenizerError(UserError, RuntimeError):
    """The configured tokenizer could not be obtained or is not a usable BERT vocabulary."""


def _looks_like_path(name: str) -> bool:
    # A hub id is "name" or "org/name"; anything else with separators is meant as a folder.
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def _download_hint(name: str) -> str:
    hub_id = "bert-base-uncased" if _looks_like_path(name) else name
    return (
        f"On a machine with internet run `hf download {hub_id} --local-dir DIR` (older huggingface_hub: "
        f"`huggingface-cli download {hub_id} --local-dir DIR`), or use any BERT folder holding vocab.txt, copy it "
        f"here and set text.tokenizer=DIR; text.tokenizer=train learns a vocabulary from the train captions instead."
    )


def check_tokenizer(tokenizer: BertTokenizerFast, source: str) -> BertTokenizerFast:
    """Raise TokenizerError unless ``tokenizer`` has >= 1000 tokens and [CLS], [SEP], [PAD], [MASK]."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in ("[CLS]", "[SEP]", "[PAD]", "[MASK]") if t not in vocab]
    if len(tokenizer) < MIN_VOCAB or missing:
        problem = f"{len(tokenizer)} tokens" + (f", missing {missing}" if missing else "")
        raise TokenizerError(
            f"text.tokenizer={source!r} gave a tokenizer with {problem}; expected a BERT vocabulary of at least "
            f"{MIN_VOCAB} tokens with [CLS], [SEP], [PAD] and [MASK]. Offline, transformers returns such a stub "
            f"for a hub id it cannot fetch. {_download_hint(source)}"
        )
    return tokenizer


_ASCII_PUNCT = re.escape("".join(chr(c) for c in range(33, 127) if not chr(c).isalnum()))
_ASCII_WORDS = re.compile(rf"[{_ASCII_PUNCT}]|[^\s{_ASCII_PUNCT}]+")


def _word_counts(captions: Iterable[str], lowercase: bool) -> Counter:
    """Word frequencies as BERT's normaliser and pre-tokeniser split them (whitespace, then punctuation).

    Printable ASCII captions take a fast pure-Python path (the library calls cost ~100 us per caption); any
    other caption goes through the library's own BertNormalizer and BertPreTokenizer.
    """
    from tokenizers import normalizers, pre_tokenizers

    normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lowercase
    )
    splitter = pre_tokenizers.BertPreTokenizer()
    counts: Counter = Counter()
    for caption in captions:
        if caption.isascii() and caption.isprintable():
            counts.update(_ASCII_WORDS.findall(caption.lower() if lowercase else caption))
        else:
            counts.update(word for word, _ in splitter.pre_tokenize_str(normalizer.normalize_str(caption)))
    return counts


def learn_wordpiece_vocab(
    captions: Iterable[str],
    vocab_size: int,
    lowercase: bool = True,
    min_frequency: int = 2,
    limit_alphabet: int = 1000,
) -> list[str]:
    """A WordPiece vocabulary (token list, id = position) learned by BPE merges over the caption words.

    The `tokenizers` library trains the same kind of vocabulary, but breaks count ties in hash-map order, so
    two runs (or two DDP ranks) get different vocabularies; here ties go to the lexicographically smallest
    pair, so every process learns the same list. Layout: SPECIAL_TOKENS, the characters, the '##'
    continuation characters, then merged pieces in merge order, up to ``vocab_size`` tokens; merging stops
    early when no pair occurs ``min_frequency`` times.
    """
    counts = _word_counts(captions, lowercase)
    char_counts: Counter = Counter()
    for word, count in counts.items():
        for char in word:
            char_counts[char] += count
    alphabet = {c for c, _ in sorted(char_counts.items(), key=lambda kv: (-kv[1], kv[0]))[:limit_alphabet]}
    words = [
        ([w[0]] + ["##" + c for c in w[1:]], counts[w]) for w in sorted(counts) if set(w) <= alphabet
    ]
    continuation = {s for symbols, _ in words for s in symbols[1:]}
    vocab = list(SPECIAL_TOKENS) + sorted(alphabet) + sorted(continuation)
    known = set(vocab)
    pair_counts: Counter = Counter()
    where: dict[tuple[str, str], set[int]] = defaultdict(set)
    for i, (symbols, count) in enumerate(words):
        for pair in zip(symbols, symbols[1:]):
            pair_counts[pair] += count
            where[pair].add(i)
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)
    while heap and len(vocab) < vocab_size:
        negative, pair = heapq.heappop(heap)
        current = pair_counts.get(pair, 0)
        if current != -negative:  # stale entry: requeue the pair with its present count
            if current > 0:
                heapq.heappush(heap, (-current, pair))
            continue
        if current < min_frequency:
            break
        merged = pair[0] + pair[1][2:]  # the right symbol is always a '##' continuation
        if merged not in known:
            vocab.append(merged)
            known.add(merged)
        for i in where.pop(pair):
            symbols, count = words[i]
            out: list[str] = []
            for symbol in symbols:
                if out and (out[-1], symbol) == pair:
                    out[-1] = merged
                else:
                    out.append(symbol)
            if len(out) == len(symbols):
                continue
            for old in zip(symbols, symbols[1:]):
                pair_counts[old] -= count
            for new in zip(out, out[1:]):
                pair_counts[new] += count
                where[new].add(i)
                heapq.heappush(heap, (-pair_counts[new], new))
            words[i] = (out, count)
        del pair_counts[pair]
    return vocab


def build_tokenizer(text_cfg: Any, train_captions: Sequence[str] | None = None) -> BertTokenizerFast:
    """The tokenizer named by ``text_cfg.tokenizer``: "train" (needs ``train_captions``), a folder, or a hub id."""
    name = str(text_cfg.tokenizer)
    if name == "train":
        if not train_captions:
            raise TokenizerError("text.tokenizer=train needs the train captions to learn a vocabulary from")
        tokens = learn_wordpiece_vocab(train_captions, text_cfg.tokenizer_vocab_size, text_cfg.lowercase)
        return tokenizer_from_vocab(tokens, lowercase=text_cfg.lowercase)
    path = Path(name).expanduser()
    if path.exists():
        if not ((path / "vocab.txt").is_file() or (path / "tokenizer.json").is_file()):
            raise TokenizerError(f"text.tokenizer={name!r}: folder has neither vocab.txt nor tokenizer.json")
        source = str(path)
    elif _looks_like_path(name):
        raise TokenizerError(f"text.tokenizer={name!r}: no such folder. {_download_hint(name)}")
    else:
        source = name
    try:
        tokenizer = BertTokenizerFast.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise TokenizerError(f"text.tokenizer={name!r} could not be loaded: {exc}. {_download_hint(name)}") from exc
    return check_tokenizer(tokenizer, name)


def tokenizer_vocab(tokenizer: BertTokenizerFast) -> list[str]:
    """All tokens ordered by id (id i is element i); raises if the ids are not 0..n-1."""
    vocab = tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.__getitem__)
    if [vocab[t] for t in tokens] != list(range(len(tokens))):
        raise TokenizerError("tokenizer ids are not contiguous 0..n-1; cannot store it as a token list")
    return tokens


def tokenizer_from_vocab(tokens: Sequence[str], lowercase: bool) -> BertTokenizerFast:
    """A BERT WordPiece tokenizer whose token i is ``tokens[i]`` (the inverse of ``tokenizer_vocab``)."""
    if len(set(tokens)) != len(tokens):
        raise TokenizerError("vocabulary has duplicate tokens; expected one token per id")
    missing = [t for t in SPECIAL_TOKENS if t not in tokens]
    if missing:
        raise TokenizerError(f"vocabulary lacks the special tokens {missing}")
    # ``vocab=`` is honoured by transformers v5 (``vocab_file=`` is silently ignored there).
    return BertTokenizerFast(vocab={t: i for i, t in enumerate(tokens)}, do_lower_case=lowercase)


def vocabulary_coverage(tokenizer: BertTokenizerFast, captions: Sequence[str]) -> str:
    """How ``tokenizer`` cuts the words of ``captions`` (word occurrences, as BERT pre-tokenises them): kept whole,
    split into pieces, or holding [UNK] (a character the vocabulary never saw). For a log line."""
    counts = _word_counts(captions, lowercase=bool(getattr(tokenizer, "do_lower_case", True)))
    total = sum(counts.values()) or 1
    split = unknown = 0
    for word, count in counts.items():
        pieces = tokenizer.tokenize(word)
        if tokenizer.unk_token in pieces:
            unknown += count
        elif len(pieces) > 1:
            split += count
    return (f"{100 * (total - split - unknown) / total:.1f}% of the {total} word occurrences kept whole, "
            f"{100 * split / total:.1f}% cut into pieces, {100 * unknown / total:.2f}% with [UNK]")


def caption_word_list(captions: Iterable[str], min_count: int = 1, max_words: int = 0) -> list[str]:
    """The lower-cased words (with a letter or digit) of ``captions``, sorted: what a model's training text held.

    Words are split as BERT's pre-tokeniser splits them. Kept: words seen at least ``min_count`` times; with
    ``max_words`` > 0, only the most frequent ``max_words`` of them (ties to the alphabetically first), so a
    multi-million-caption corpus, whose long tail is mostly typos, gives a bounded list.
    """
    counts = _word_counts(captions, lowercase=True)
    kept = [(word, n) for word, n in counts.items() if n >= min_count and any(c.isalnum() for c in word)]
    if max_words > 0 and len(kept) > max_words:
        kept = heapq.nsmallest(max_words, kept, key=lambda item: (-item[1], item[0]))
    return sorted(word for word, _ in kept)


def save_tokenizer(tokenizer: BertTokenizerFast, folder: str | os.PathLike[str]) -> Path:
    """Write the tokenizer files plus vocab.txt, so the folder also works as ``text.tokenizer=FOLDER``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(folder))
    (folder / "vocab.txt").write_text("".join(t + "\n" for t in tokenizer_vocab(tokenizer)), encoding="utf-8")
    return folder
