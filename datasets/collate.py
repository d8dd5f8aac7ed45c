"""Batch collation: stacked views, one tokenizer call for all text levels, MLM masking of the captions, and
captions with two attribute words swapped (ITM and ITC negatives)."""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from transformers import BertTokenizerFast

from datasets.batch_augment import stack_images

IGNORE_INDEX = -100
AUGMENT_STREAM = 1  # appended to the item seeds for the device augmentation's noise generator
SWAP_STREAM = 2  # appended to an item's seed for its choice of the words to swap


@dataclass(frozen=True)
class MlmSettings:
    """Masked-language-model masking (docs/recipe.md, pretraining); fields mirror ``text.mlm_*`` in base.yaml."""

    mlm_prob: float = 0.25
    mlm_max_masks: int = 8
    mlm_whole_word: bool = True
    mlm_ngram_prob: float = 0.2
    mlm_mask_token_prob: float = 0.8
    mlm_random_token_prob: float = 0.1
    mlm_count_cls: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.mlm_prob <= 1.0 or self.mlm_max_masks < 1:
            raise ValueError(f"text.mlm_prob must be in [0, 1] and text.mlm_max_masks >= 1, got {self}")
        if self.mlm_mask_token_prob < 0 or self.mlm_random_token_prob < 0 or (
            self.mlm_mask_token_prob + self.mlm_random_token_prob > 1.0
        ):
            raise ValueError(
                "text.mlm_mask_token_prob and text.mlm_random_token_prob must be >= 0 and sum to at most 1, "
                f"got {self.mlm_mask_token_prob} and {self.mlm_random_token_prob}"
            )

    @classmethod
    def from_config(cls, text_cfg: Any) -> "MlmSettings":
        return cls(
            mlm_prob=float(text_cfg.mlm_prob),
            mlm_max_masks=int(text_cfg.mlm_max_masks),
            mlm_whole_word=bool(text_cfg.mlm_whole_word),
            mlm_ngram_prob=float(text_cfg.mlm_ngram_prob),
            mlm_mask_token_prob=float(text_cfg.mlm_mask_token_prob),
            mlm_random_token_prob=float(text_cfg.mlm_random_token_prob),
            mlm_count_cls=bool(text_cfg.mlm_count_cls),
        )


def _units(positions: list[int], words: list[int | None], whole_word: bool) -> list[list[int]]:
    """Maskable units in text order: the token positions of each word, or single tokens."""
    if not whole_word:
        return [[p] for p in positions]
    units: list[list[int]] = []
    last = object()
    for p in positions:
        if words[p] is None or words[p] != last:
            units.append([])
        units[-1].append(p)
        last = words[p]
    return units


def _choose_positions(units: list[list[int]], budget: int, settings: MlmSettings, gen: torch.Generator) -> list[int]:
    """Token positions to mask: whole units in random order (sometimes a 2-3 unit span) up to ``budget`` tokens."""
    n = len(units)
    order = torch.randperm(n, generator=gen).tolist()
    coins = torch.rand(n, generator=gen).tolist()
    spans = torch.randint(2, 4, (n,), generator=gen).tolist()
    taken = [False] * n
    chosen: list[int] = []
    for u, coin, span in zip(order, coins, spans):
        if len(chosen) >= budget:
            break
        if taken[u]:
            continue
        group = [u]
        if coin < settings.mlm_ngram_prob:
            group = [v for v in range(u, min(u + span, n)) if not taken[v]]
        size = sum(len(units[v]) for v in group)
        if len(chosen) + size > budget:  # the span does not fit: fall back to the single unit
            group, size = [u], len(units[u])
        if len(chosen) + size > budget:
            continue
        for v in group:
            taken[v] = True
            chosen.extend(units[v])
    if not chosen and units:
        # Every word is longer than the budget: mask the first one drawn, cut to the hard cap.
        chosen = units[order[0]][: settings.mlm_max_masks]
    return chosen


def mask_tokens(
    ids: torch.Tensor,
    attention_mask: torch.Tensor,
    word_ids: Sequence[Sequence[int | None]],
    settings: MlmSettings,
    mask_token_id: int,
    special_ids: Sequence[int],
    vocab_size: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT-style masking of token ids.

    ids, attention_mask: [B, T]; word_ids: per row, the word index of each token (None for special tokens and
    padding), as the fast tokenizer reports it. Per row, n = min(max_masks, max(1, round(prob * m))) of its m
    real non-special tokens are chosen as whole words (with probability ngram_prob a 2-3 word span), then 80/10/10
    (per settings) become [MASK] / a random non-special token / stay. With ``settings.mlm_count_cls`` the budget
    counts the row's leading [CLS] as well, n = min(max_masks, max(1, round(prob * (m + 1)))), as the authors'
    pretraining does (their captions carry no [SEP]; ours does, and it is not counted); [CLS] itself is never
    masked either way. Python's round (halves to even) is the authors' too. Returns (masked_ids [B, T], labels [B, T])
    with labels = original id at chosen positions and -100 elsewhere.
    """
    if ids.shape != attention_mask.shape or len(word_ids) != ids.shape[0]:
        raise ValueError(
            f"mask_tokens: ids {tuple(ids.shape)}, mask {tuple(attention_mask.shape)} and "
            f"{len(word_ids)} word_id rows disagree"
        )
    special = torch.tensor(sorted(set(special_ids)), dtype=ids.dtype)
    maskable = attention_mask.bool() & ~torch.isin(ids, special)
    chosen = torch.zeros_like(maskable)
    for row, allowed in enumerate(maskable.tolist()):
        positions = [p for p, ok in enumerate(allowed) if ok]
        if not positions:
            continue
        length = len(positions) + (1 if settings.mlm_count_cls else 0)
        budget = min(settings.mlm_max_masks, max(1, round(settings.mlm_prob * length)))
        units = _units(positions, list(word_ids[row]), settings.mlm_whole_word)
        chosen[row, _choose_positions(units, budget, settings, generator)] = True
    labels = torch.where(chosen, ids, torch.full_like(ids, IGNORE_INDEX))
    draw = torch.rand(ids.shape, generator=generator)
    to_mask = chosen & (draw < settings.mlm_mask_token_prob)
    to_random = chosen & ~to_mask & (draw < settings.mlm_mask_token_prob + settings.mlm_random_token_prob)
    candidates = torch.ones(vocab_size, dtype=torch.bool)
    candidates[special[special < vocab_size]] = False
    pool = candidates.nonzero().squeeze(1).to(ids.dtype)
    random_ids = pool[torch.randint(len(pool), ids.shape, generator=generator)]
    masked = torch.where(to_mask, torch.full_like(ids, mask_token_id), ids)
    masked = torch.where(to_random, random_ids, masked)
    return masked, labels


_WORD = re.compile(r"[A-Za-z]+")


def swap_two_words(caption: str, words: frozenset[str], rng: random.Random | None = None) -> str | None:
    """``caption`` with two different words of ``words`` exchanged, or None when it has no two different ones
    ("a pink shirt, green shorts" -> "a green shirt, pink shorts"). Whole words, case-insensitive; each word moves
    as written; two words with nothing but spaces or a hyphen between them are one colour and never a pair. Without
    ``rng`` the first such word and the next different one; with it, a pair drawn at random
    (the first word uniformly, then its partner among the different ones), so that over the epochs every part a
    caption names is asked about."""
    found = [m for m in _WORD.finditer(caption) if m.group(0).lower() in words]
    if not found:
        return None
    first = found[0] if rng is None else found[rng.randrange(len(found))]
    # not the other half of one compound colour ("navy blue", "mustard-yellow"): exchanged, it means the same
    others = [m for m in found if m.group(0).lower() != first.group(0).lower()
              and caption[min(m.end(), first.end()): max(m.start(), first.start())].strip(" -")]
    if not others:
        return None
    second = others[0] if rng is None else others[rng.randrange(len(others))]
    first, second = sorted((first, second), key=lambda m: m.start())
    return (caption[: first.start()] + second.group(0) + caption[first.end(): second.start()] + first.group(0)
            + caption[second.end():])


def seed_from_items(seeds: Sequence[int]) -> int:
    """A 63-bit generator seed that depends on every item seed (order included)."""
    return int(np.random.SeedSequence([int(s) for s in seeds]).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


class TrainCollator:
    """Items of TrainDataset -> a batch dict of tensors (B records, V views, L text levels, T tokens):

    images [V*B, 3, H, W] view-major (every record's view 0, then view 1, ...), image_pids [V*B];
    text_ids, text_mask [L*B, T] level-major, text_pids [L*B]; pids [B]; indices [B];
    caption_ids, caption_mask [B, T] (the sentence level); with MLM also mlm_ids, mlm_labels [B, T]; with
    ``swap_words`` also swap_rows [S] (the items whose caption has two of those words, S <= B), swap_ids,
    swap_mask [S, T] (those captions with two of the words exchanged, see swap_two_words): the rows come ready,
    so the training device never reads a mask back to find them.
    All texts go through one tokenizer call, so T is the longest text of the batch (capped at max_text_len).

    Items of the device augmentation path (``image_uint8`` instead of ``images``) give, instead of images:
    image_uint8 [B, Hmax, Wmax, 3] (each record's image once, zero-padded), image_sizes [B, 2], view_params
    [V*B, 8] view-major, and augment_seed (an int from the item seeds, for the erasing noise);
    datasets.batch_augment.augment_batch turns them into images on the training device.
    """

    def __init__(
        self,
        tokenizer: BertTokenizerFast,
        max_text_len: int,
        levels: Sequence[str],
        mlm: MlmSettings | None = None,
        swap_words: Sequence[str] = (),
    ):
        if not levels:
            raise ValueError("TrainCollator: text.levels must name at least one level")
        self.tokenizer = tokenizer
        self.max_text_len = max_text_len
        self.levels = tuple(levels)
        self.mlm = mlm
        self.swap_words = frozenset(word.lower() for word in swap_words)
        self._special_ids = list(tokenizer.all_special_ids)
        self._vocab_size = len(tokenizer)

    def __call__(self, items: Sequence[dict]) -> dict[str, torch.Tensor]:
        b, n_levels = len(items), len(self.levels)
        for item in items:
            if len(item["texts"]) != n_levels:
                raise ValueError(
                    f"TrainCollator: item {item['index']} has {len(item['texts'])} texts, expected {n_levels} "
                    f"for levels {self.levels}"
                )
        if "image_uint8" in items[0]:
            images, sizes = stack_images([item["image_uint8"] for item in items])
            params = torch.stack([item["view_params"] for item in items])  # [B, V, 8]
            n_views = params.shape[1]
            image_part = {"image_uint8": images, "image_sizes": sizes,
                          "view_params": params.transpose(0, 1).reshape(n_views * b, params.shape[2]),
                          # a stream apart from the MLM generator's, which starts from the item seeds alone
                          "augment_seed": seed_from_items([item["rng_seed"] for item in items] + [AUGMENT_STREAM])}
        else:
            views = torch.stack([item["images"] for item in items])  # [B, V, 3, H, W]
            n_views = views.shape[1]
            image_part = {"images": views.transpose(0, 1).reshape(n_views * b, *views.shape[2:])}
        pids = torch.tensor([int(item["pid"]) for item in items], dtype=torch.long)
        texts = [item["texts"][level] for level in range(n_levels) for item in items]
        if "sentence" in self.levels:
            first = self.levels.index("sentence") * b
        else:
            first = len(texts)
            texts += [item["caption"] for item in items]
        swapped: list[str | None] = []
        swaps_start = len(texts)  # the swapped captions follow every other text
        if self.swap_words:
            # each item's own stream (its seed changes every epoch), apart from the MLM generator's
            swapped = [swap_two_words(caption, self.swap_words, random.Random(seed_from_items([item["rng_seed"],
                                                                                               SWAP_STREAM])))
                       for caption, item in zip(texts[first: first + b], items)]
            texts += [other for other in swapped if other is not None]
        enc = self.tokenizer(
            texts, padding="longest", truncation=True, max_length=self.max_text_len, return_tensors="pt"
        )
        ids, mask = enc["input_ids"], enc["attention_mask"]
        batch = {
            **image_part,
            "image_pids": pids.repeat(n_views),
            "text_ids": ids[: n_levels * b],
            "text_mask": mask[: n_levels * b],
            "text_pids": pids.repeat(n_levels),
            "pids": pids,
            "indices": torch.tensor([int(item["index"]) for item in items], dtype=torch.long),
            # Copies, so that in-place edits of text_ids downstream cannot leak into the captions.
            "caption_ids": ids[first : first + b].clone(),
            "caption_mask": mask[first : first + b].clone(),
        }
        if self.swap_words:
            rows = [row for row, other in enumerate(swapped) if other is not None]
            batch["swap_rows"] = torch.tensor(rows, dtype=torch.long)
            batch["swap_ids"], batch["swap_mask"] = ids[swaps_start:], mask[swaps_start:]
        if self.mlm is not None:
            gen = torch.Generator().manual_seed(seed_from_items([item["rng_seed"] for item in items]))
            batch["mlm_ids"], batch["mlm_labels"] = mask_tokens(
                batch["caption_ids"],
                batch["caption_mask"],
                [enc.word_ids(first + row) for row in range(b)],
                self.mlm,
                mask_token_id=self.tokenizer.mask_token_id,
                special_ids=self._special_ids,
                vocab_size=self._vocab_size,
                generator=gen,
            )
        return batch
