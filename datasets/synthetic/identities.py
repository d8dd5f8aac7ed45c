"""The bottom of the synthetic dataset: formats and styles, the attributes of a person, and who is drawn.

Every style draws people from the same factorised attributes (garment types and colours, hair, shoes, bag,
accessories). The attributes every caption mentions (upper and lower garment, plus shoes/hair for big sets) form a
key that is unique over all identities, so a perfect model can reach R@1 = 100% and no attribute set is shared
between splits.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

from datasets.readers import FORMATS as RETRIEVAL_FORMATS
from utils.config import CHOICES

# The retrieval formats the readers know (their order seeds the image noise), then the pretraining corpus.
FORMATS = (*RETRIEVAL_FORMATS, "pretrain")
# How people are drawn and described, one module of this package each. The one list of them is the config's
# (data.synthetic_style, which utils/config.py validates without importing the datasets layer); the writer's
# table of style modules must name exactly these. Append new styles: a style's place seeds its image noise.
STYLES: tuple[str, ...] = CHOICES["data.synthetic_style"]
# No recipe number is tuned on the held-out style (bench/bench_learning.py reports it apart).
HELD_OUT_STYLE = "cctv"
# Styles that draw pretraining corpora; fine-tuning is measured on the others (TARGET_STYLES).
PRETRAINING_STYLES = ("mixed",)
TARGET_STYLES = tuple(style for style in STYLES if style not in PRETRAINING_STYLES)
# The first style: its seeds and marker file predate the others, so its datasets keep their bytes.
ORIGINAL_STYLE = "classic"

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (205, 30, 35), "blue": (35, 70, 205), "green": (30, 150, 55), "yellow": (240, 215, 30),
    "black": (22, 22, 24), "white": (238, 238, 236), "gray": (125, 125, 128), "pink": (245, 135, 190),
    "purple": (120, 40, 165), "orange": (245, 125, 20), "brown": (115, 65, 30),
}
_SHOE_COLOURS = ("black", "white", "gray", "brown", "red", "blue")
HAIR_COLOURS = {"black": (20, 18, 18), "brown": (100, 60, 30), "blonde": (225, 195, 110), "gray": (165, 165, 165)}
SKIN_TONES = ((238, 204, 175), (214, 172, 135), (175, 125, 90), (125, 85, 60))
_UPPER_TYPES = ("t-shirt", "shirt", "jacket", "coat", "sweater", "dress")
_UPPER_WEIGHTS = (0.25, 0.15, 0.2, 0.13, 0.15, 0.12)
_LOWER_TYPES = ("pants", "shorts", "skirt")
_BAGS = (None, "backpack", "handbag", "shoulder bag")
VIEWS = ("front", "back", "left", "right")

# Per format: split shares by identity, images per identity (min, max), captions per image, file name.
LAYOUT = {
    "cuhkpedes": ({"train": 0.70, "val": 0.15, "test": 0.15}, (2, 4), 2, "reid_raw.json"),
    "icfg": ({"train": 0.70, "test": 0.30}, (3, 6), 1, "ICFG-PEDES.json"),
    "rstp": ({"train": 0.70, "val": 0.15, "test": 0.15}, (5, 5), 2, "data_captions.json"),
    "pretrain": ({"train": 1.0}, (1, 2), 1, "pretrain.json"),
}


@dataclass(frozen=True)
class Identity:
    """The attributes of one synthetic person (lower_* are None for a dress)."""

    gender: str
    hair_length: str
    hair_colour: str
    skin: int
    upper_type: str
    upper_colour: str
    pattern: str
    lower_type: str | None
    lower_colour: str | None
    shoes_colour: str
    bag: str | None
    bag_colour: str | None
    hat_colour: str | None
    glasses: bool
    umbrella_colour: str | None


def _sample_identity(rng: random.Random) -> Identity:
    gender = rng.choice(("man", "woman"))
    hair_length = "long" if rng.random() < (0.75 if gender == "woman" else 0.1) else "short"
    upper_type = rng.choices(_UPPER_TYPES, _UPPER_WEIGHTS)[0]
    while upper_type == "dress" and gender == "man":
        upper_type = rng.choices(_UPPER_TYPES, _UPPER_WEIGHTS)[0]
    lower_type = lower_colour = None
    if upper_type != "dress":
        lower_type = rng.choice(_LOWER_TYPES if gender == "woman" else _LOWER_TYPES[:2])
        lower_colour = rng.choice(tuple(COLOURS))
    bag = rng.choices(_BAGS, (0.4, 0.25, 0.15, 0.2))[0]
    pattern = rng.choices(("plain", "striped", "plaid"), (0.8, 0.13, 0.07))[0]
    return Identity(
        gender=gender,
        hair_length=hair_length,
        hair_colour=rng.choices(tuple(HAIR_COLOURS), (0.5, 0.3, 0.15, 0.05))[0],
        skin=rng.randrange(len(SKIN_TONES)),
        upper_type=upper_type,
        upper_colour=rng.choice(tuple(COLOURS)),
        pattern="plain" if upper_type == "dress" and pattern == "plaid" else pattern,
        lower_type=lower_type,
        lower_colour=lower_colour,
        shoes_colour=rng.choice(_SHOE_COLOURS),
        bag=bag,
        bag_colour=rng.choice(tuple(COLOURS)) if bag else None,
        hat_colour=rng.choice(tuple(COLOURS)) if rng.random() < 0.15 else None,
        glasses=rng.random() < 0.15,
        # an umbrella takes the hand that would hold a handbag
        umbrella_colour=rng.choice(tuple(COLOURS)) if rng.random() < 0.08 and bag != "handbag" else None,
    )


_KEY_CAPACITY = 5 * len(COLOURS) * 3 * len(COLOURS) + len(COLOURS)  # garment types x colours, plus dresses


def key_fields(num_ids: int) -> tuple[str, ...]:
    """The attributes every caption mentions; more of them as the set grows so keys stay unique and easy."""
    fields = ("upper_type", "upper_colour", "lower_type", "lower_colour")
    if num_ids > _KEY_CAPACITY // 2:
        fields += ("shoes_colour",)
    if num_ids > _KEY_CAPACITY * len(_SHOE_COLOURS) // 2:
        fields += ("hair_length", "hair_colour")
    if num_ids > _KEY_CAPACITY * len(_SHOE_COLOURS) * 2 * len(HAIR_COLOURS) // 2:
        raise ValueError(f"num_ids={num_ids} is too many distinct synthetic identities")
    return fields


def identity_key(identity: Identity, fields: Sequence[str]) -> tuple:
    return tuple(getattr(identity, f) for f in fields)


def split_sizes(fmt: str, num_ids: int) -> dict[str, int]:
    """Identities per split: the format's shares, every listed split non-empty, train takes the rest."""
    shares = LAYOUT[fmt][0]
    if num_ids < len(shares):
        raise ValueError(f"num_ids must be at least {len(shares)} for format '{fmt}', got {num_ids}")
    sizes = {s: max(1, round(num_ids * p)) for s, p in shares.items() if s != "train"}
    sizes["train"] = num_ids - sum(sizes.values())
    return {s: sizes[s] for s in shares}


def check_num_ids(fmt: str, num_ids: int) -> None:
    """ValueError saying why the writer cannot draw ``num_ids`` identities in format ``fmt`` (too few for its
    splits, or more than the attributes keep distinct); nothing when it can."""
    split_sizes(fmt, num_ids)
    key_fields(num_ids)


def sample_identities(fmt: str, num_ids: int, seed: int, style: str = "classic") -> list[tuple[str, int, Identity]]:
    """(split, raw id, identity) for each identity, raw ids 1..num_ids interleaved over the splits.

    Evaluation splits are drawn first and prefer identities whose (upper colour, lower colour) pair is new
    within the split, so garment colours alone almost always tell test people apart. Each style draws its own
    people (``seed_tag``).
    """
    rng = random.Random(f"synthetic:{seed_tag(style)}{fmt}:{seed}:identities")
    fields = key_fields(num_ids)
    used: set[tuple] = set()
    drawn: list[tuple[str, Identity]] = []
    for split, size in sorted(split_sizes(fmt, num_ids).items(), key=lambda kv: kv[0] == "train"):
        pairs: set[tuple] = set()
        for _ in range(size):
            for attempt in range(200):
                identity = _sample_identity(rng)
                key = identity_key(identity, fields)
                pair = (identity.upper_colour, identity.lower_colour)
                if key not in used and (split == "train" or pair not in pairs or attempt >= 40):
                    break
            else:
                raise RuntimeError("could not draw a new synthetic identity; lower num_ids")
            used.add(key)
            pairs.add(pair)
            drawn.append((split, identity))
    raw_ids = list(range(1, num_ids + 1))
    rng.shuffle(raw_ids)
    ordered = sorted(zip(raw_ids, drawn), key=lambda item: item[0])
    return [(split, raw_id, identity) for raw_id, (split, identity) in ordered]


def seed_tag(style: str) -> str:
    """What ``style`` adds to every seed string: nothing for the original style, so its datasets keep their bytes."""
    return "" if style == ORIGINAL_STYLE else f"{style}:"
