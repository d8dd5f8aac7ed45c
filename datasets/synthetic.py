"""A deterministic synthetic person-retrieval dataset, written in the real datasets' on-disk formats.

Each identity is a factorised set of clearly visible attributes (garment types and colours, hair, shoes, bag,
accessories); every image of it varies scale, position, view, limbs, background, lighting, blur and sometimes
occlusion, and every caption is written from the attributes in CUHK-PEDES style. The attributes every caption
mentions (upper and lower garment, plus shoes/hair for big sets) form a key that is unique over all
identities, so a perfect model can reach R@1 = 100% and no attribute set is shared between splits.

    python -m datasets.synthetic --format cuhkpedes --out data/synth_cuhk --num-ids 200 --seed 0

The readers load the result like the real files (``SYNTHETIC.json`` marks it so no count warning fires).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from datasets.readers import FORMATS as RETRIEVAL_FORMATS

logger = logging.getLogger(__name__)

# The retrieval formats the readers know (their order seeds the image noise), then the pretraining corpus.
FORMATS = (*RETRIEVAL_FORMATS, "pretrain")
# How people are drawn and described: classic (this module, the README's figures), street and cctv
# (datasets/synthetic_styles.py). cctv is the held-out style: no recipe number is tuned on it.
STYLES = ("classic", "street", "cctv")
HELD_OUT_STYLE = "cctv"
IMAGE_HEIGHT, IMAGE_WIDTH = 128, 64
_SUPERSAMPLE = 2  # drawn at twice the size, then box-reduced, for clean edges
_JPEG_QUALITY = 90

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (205, 30, 35), "blue": (35, 70, 205), "green": (30, 150, 55), "yellow": (240, 215, 30),
    "black": (22, 22, 24), "white": (238, 238, 236), "gray": (125, 125, 128), "pink": (245, 135, 190),
    "purple": (120, 40, 165), "orange": (245, 125, 20), "brown": (115, 65, 30),
}
_SHOE_COLOURS = ("black", "white", "gray", "brown", "red", "blue")
_HAIR_COLOURS = {"black": (20, 18, 18), "brown": (100, 60, 30), "blonde": (225, 195, 110), "gray": (165, 165, 165)}
_SKIN_TONES = ((238, 204, 175), (214, 172, 135), (175, 125, 90), (125, 85, 60))
_UPPER_TYPES = ("t-shirt", "shirt", "jacket", "coat", "sweater", "dress")
_UPPER_WEIGHTS = (0.25, 0.15, 0.2, 0.13, 0.15, 0.12)
_LOWER_TYPES = ("pants", "shorts", "skirt")
_BAGS = (None, "backpack", "handbag", "shoulder bag")
_VIEWS = ("front", "back", "left", "right")

# Per format: split shares by identity, images per identity (min, max), captions per image, file name.
_LAYOUT = {
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


# ----------------------------------------------------------------------------------------------- identities

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
        hair_colour=rng.choices(tuple(_HAIR_COLOURS), (0.5, 0.3, 0.15, 0.05))[0],
        skin=rng.randrange(len(_SKIN_TONES)),
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
    if num_ids > _KEY_CAPACITY * len(_SHOE_COLOURS) * 2 * len(_HAIR_COLOURS) // 2:
        raise ValueError(f"num_ids={num_ids} is too many distinct synthetic identities")
    return fields


def identity_key(identity: Identity, fields: Sequence[str]) -> tuple:
    return tuple(getattr(identity, f) for f in fields)


def split_sizes(fmt: str, num_ids: int) -> dict[str, int]:
    """Identities per split: the format's shares, every listed split non-empty, train takes the rest."""
    shares = _LAYOUT[fmt][0]
    if num_ids < len(shares):
        raise ValueError(f"num_ids must be at least {len(shares)} for format '{fmt}', got {num_ids}")
    sizes = {s: max(1, round(num_ids * p)) for s, p in shares.items() if s != "train"}
    sizes["train"] = num_ids - sum(sizes.values())
    return {s: sizes[s] for s in shares}


def sample_identities(fmt: str, num_ids: int, seed: int, style: str = "classic") -> list[tuple[str, int, Identity]]:
    """(split, raw id, identity) for each identity, raw ids 1..num_ids interleaved over the splits.

    Evaluation splits are drawn first and prefer identities whose (upper colour, lower colour) pair is new
    within the split, so garment colours alone almost always tell test people apart. Each style draws its own
    people (the classic style keeps its original seed string, so its datasets stay byte for byte the same).
    """
    tag = "" if style == "classic" else f"{style}:"
    rng = random.Random(f"synthetic:{tag}{fmt}:{seed}:identities")
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


# ----------------------------------------------------------------------------------------------- drawing

def _muted(rng: random.Random, low: int = 60, high: int = 205) -> tuple[int, int, int]:
    """A low-saturation colour, so backgrounds never compete with garment colours."""
    grey = rng.randint(low, high)
    return tuple(max(0, min(255, grey + rng.randint(-14, 14))) for _ in range(3))  # type: ignore[return-value]


def _shade(colour: tuple[int, int, int], factor: float) -> tuple[int, int, int]:
    return tuple(max(0, min(255, int(c * factor))) for c in colour)  # type: ignore[return-value]


def _contrast(colour: str) -> tuple[str, tuple[int, int, int]]:
    """Name and RGB of the second colour of a pattern: white on dark garments, black on light ones."""
    name = "black" if colour in ("white", "yellow", "pink", "orange") else "white"
    return name, COLOURS[name]


def _jitter(colour: tuple[int, int, int], rng: random.Random, amount: int = 12) -> tuple[int, int, int]:
    return tuple(max(0, min(255, c + rng.randint(-amount, amount))) for c in colour)  # type: ignore[return-value]


class _Pen:
    """Draws in person units (height 1, x from the body axis, y down from the top of the head)."""

    def __init__(self, draw: ImageDraw.ImageDraw, cx: float, top: float, height: float, mirror: bool,
                 build: float = 1.0) -> None:
        self.draw, self.cx, self.top, self.h, self.sign = draw, cx, top, height, (-1.0 if mirror else 1.0)
        self.build = build  # horizontal stretch of the body (other styles draw broader or slimmer people)

    def xy(self, x: float, y: float) -> tuple[float, float]:
        return self.cx + self.sign * x * self.h * self.build, self.top + y * self.h

    def poly(self, points: Sequence[tuple[float, float]], fill: tuple[int, int, int]) -> None:
        self.draw.polygon([self.xy(x, y) for x, y in points], fill=fill)

    def ellipse(self, x: float, y: float, rx: float, ry: float, fill: tuple[int, int, int]) -> None:
        (x0, y0), (x1, y1) = self.xy(x - rx, y - ry), self.xy(x + rx, y + ry)
        self.draw.ellipse((min(x0, x1), y0, max(x0, x1), y1), fill=fill)

    def rect(self, x0: float, y0: float, x1: float, y1: float, fill: tuple[int, int, int]) -> None:
        self.poly(((x0, y0), (x1, y0), (x1, y1), (x0, y1)), fill)

    def limb(self, start: tuple[float, float], end: tuple[float, float], w0: float, w1: float,
             fill: tuple[int, int, int]) -> None:
        """A tapered quad from start (width w0) to end (width w1), with a round cap at the end."""
        dx, dy = end[0] - start[0], end[1] - start[1]
        norm = math.hypot(dx, dy) or 1.0
        px, py = -dy / norm, dx / norm
        self.poly(((start[0] + px * w0 / 2, start[1] + py * w0 / 2), (end[0] + px * w1 / 2, end[1] + py * w1 / 2),
                   (end[0] - px * w1 / 2, end[1] - py * w1 / 2), (start[0] - px * w0 / 2, start[1] - py * w0 / 2)),
                  fill)
        self.ellipse(end[0], end[1], w1 / 2, w1 / 2, fill)


def _point_along(start: tuple[float, float], end: tuple[float, float], t: float) -> tuple[float, float]:
    return start[0] + (end[0] - start[0]) * t, start[1] + (end[1] - start[1]) * t


def _background(draw: ImageDraw.ImageDraw, width: int, height: int, rng: random.Random) -> None:
    wall, ground = _muted(rng), _muted(rng)
    horizon = int(height * rng.uniform(0.55, 0.85))
    draw.rectangle((0, 0, width, horizon), fill=wall)
    draw.rectangle((0, horizon, width, height), fill=ground)
    for _ in range(rng.randint(0, 4)):  # facades, doors, windows
        x0, y0 = rng.uniform(-0.2, 1.0) * width, rng.uniform(0, 0.7) * horizon
        draw.rectangle((x0, y0, x0 + rng.uniform(0.1, 0.5) * width, y0 + rng.uniform(0.1, 0.5) * horizon),
                       fill=_muted(rng))
    if rng.random() < 0.6:  # paving lines
        step = rng.randint(8, 20) * _SUPERSAMPLE
        for y in range(horizon + step, height, step):
            draw.line((0, y, width, y), fill=_shade(ground, 0.8), width=_SUPERSAMPLE)


def _draw_person(pen: _Pen, who: Identity, view: str, rng: random.Random,
                 palette: dict[str, tuple[int, int, int]] = COLOURS) -> None:
    """The whole figure in painter's order; ``view`` is front, back or side (mirroring handles left/right).

    ``palette`` maps colour names to the RGB drawn (other styles draw the same names in their own shades).
    """
    COLOURS = palette  # noqa: N806 -- the named colours below are drawn in this style's shades
    side, back = view == "side", view == "back"
    skin = _jitter(_SKIN_TONES[who.skin], rng, 6)
    hair = _jitter(_HAIR_COLOURS[who.hair_colour], rng, 8)
    upper = _jitter(COLOURS[who.upper_colour], rng)
    lower = _jitter(COLOURS[who.lower_colour], rng) if who.lower_colour else skin
    shoes = _jitter(COLOURS[who.shoes_colour], rng)
    wide = 0.6 if side else 1.0
    shoulder_w, hem_w = 0.25 * wide, {"coat": 0.27, "jacket": 0.235, "dress": 0.34}.get(who.upper_type, 0.21) * wide
    hem_y = {"coat": 0.66, "dress": 0.70}.get(who.upper_type, 0.49)

    # hair falling behind the shoulders is seen around the neck from the front
    if who.hair_length == "long" and not back:
        pen.poly(((-0.066, 0.06), (0.066, 0.06), (0.072 * wide, 0.27), (-0.072 * wide - (0.03 if side else 0), 0.27)),
                 hair)

    # legs: long garments cover them, shorts the top, otherwise skin; a stride in side view
    stride = rng.uniform(0.0, 0.13) if side else 0.0
    spread = rng.uniform(-0.01, 0.035)
    for sx, fx in ((-1, -stride), (1, stride)):
        hip = (sx * 0.06 * wide, 0.48)
        foot = (fx + (0 if side else sx * (0.055 + spread)), 0.94)
        pen.limb(hip, foot, 0.1, 0.072, skin)
        # garments a little wider than the legs, so the lower colour covers many pixels even at 64 x 32
        if who.lower_type == "pants":
            pen.limb(hip, _point_along(hip, foot, 0.96), 0.12, 0.09, lower)
        elif who.lower_type == "shorts":
            pen.limb(hip, _point_along(hip, foot, 0.38), 0.125, 0.115, lower)
        toe = 0.02 if side else 0.0
        pen.ellipse(foot[0] + toe, foot[1] + 0.012, 0.045 if side else 0.04, 0.022, shoes)
    if who.lower_type in ("pants", "shorts"):
        pen.rect(-0.115 * wide, 0.46, 0.115 * wide, 0.56, lower)
    elif who.lower_type == "skirt":
        pen.poly(((-0.11 * wide, 0.46), (0.11 * wide, 0.46), (0.175 * wide, 0.69), (-0.175 * wide, 0.69)), lower)

    # upper garment (a dress narrows at the waist, then flares)
    if who.upper_type == "dress":
        pen.poly(((-shoulder_w / 2, 0.15), (shoulder_w / 2, 0.15), (0.09 * wide, 0.36), (hem_w / 2, hem_y),
                  (-hem_w / 2, hem_y), (-0.09 * wide, 0.36)), upper)
    else:
        pen.poly(((-shoulder_w / 2, 0.15), (shoulder_w / 2, 0.15), (hem_w / 2, hem_y), (-hem_w / 2, hem_y)), upper)
    _draw_pattern(pen, who, shoulder_w, hem_w, hem_y, rng)
    dark = _shade(upper, 0.55) if who.upper_colour != "black" else (70, 70, 72)
    if not back and not side:
        if who.upper_type in ("jacket", "coat"):
            pen.rect(-0.007, 0.17, 0.007, hem_y, dark)
        if who.upper_type == "shirt":
            for y in (0.2, 0.26, 0.32, 0.38, 0.44):
                pen.ellipse(0, y, 0.008, 0.008, dark)
        if who.upper_type in ("shirt", "jacket", "coat"):
            pen.poly(((-0.045, 0.145), (0.0, 0.2), (0.045, 0.145), (0.0, 0.165)), dark)
    if who.upper_type == "sweater":
        pen.poly(((-hem_w / 2, hem_y - 0.03), (hem_w / 2, hem_y - 0.03), (hem_w / 2, hem_y), (-hem_w / 2, hem_y)),
                 dark)

    _draw_bag(pen, who, view, behind=True, palette=palette)
    _draw_arms(pen, who, view, upper, skin, dark, rng, palette=palette)
    _draw_bag(pen, who, view, behind=False, palette=palette)
    _draw_head(pen, who, view, skin, hair, palette=palette)


def _draw_pattern(pen: _Pen, who: Identity, shoulder_w: float, hem_w: float, hem_y: float,
                  rng: random.Random) -> None:
    if who.pattern == "plain":
        return
    colour = _contrast(who.upper_colour)[1]

    def half_width(y: float) -> float:
        return (shoulder_w + (hem_w - shoulder_w) * (y - 0.15) / (hem_y - 0.15)) / 2

    step = 0.045 if who.pattern == "striped" else 0.06
    band = 0.02 if who.pattern == "striped" else 0.009
    y = 0.17 + rng.uniform(0, step / 2)
    while y + band < hem_y:
        pen.poly(((-half_width(y), y), (half_width(y), y), (half_width(y + band), y + band),
                  (-half_width(y + band), y + band)), colour)
        y += step
    if who.pattern == "plaid":
        for x in (-0.5, -0.17, 0.17, 0.5):
            pen.rect(x * hem_w * 0.8 - 0.0045, 0.15, x * hem_w * 0.8 + 0.0045, hem_y, colour)


def _draw_arms(pen: _Pen, who: Identity, view: str, upper: tuple[int, int, int], skin: tuple[int, int, int],
               dark: tuple[int, int, int], rng: random.Random,
               palette: dict[str, tuple[int, int, int]] = COLOURS) -> None:
    COLOURS = palette  # noqa: N806
    side = view == "side"
    sleeve = {"t-shirt": 0.32, "dress": 0.0}.get(who.upper_type, 0.9)
    for number, sx in enumerate((-1, 1)):
        if side and number == 0:
            continue  # the far arm hides behind the body
        shoulder = (0.0 if side else sx * 0.11, 0.17)
        if who.umbrella_colour and number == 1:
            elbow, hand = (shoulder[0] + 0.03, 0.30), (0.075, 0.30)
            pen.limb(shoulder, elbow, 0.058, 0.055, upper if sleeve > 0.5 else skin)
            pen.limb(elbow, hand, 0.055, 0.05, upper if sleeve > 0.7 else skin)
            pen.ellipse(hand[0], hand[1], 0.028, 0.028, skin)
            continue
        angle = math.radians(rng.uniform(-25, 25) if side else rng.uniform(2, 20))
        hand = (shoulder[0] + sx * 0.34 * math.sin(angle), shoulder[1] + 0.34 * math.cos(angle))
        pen.limb(shoulder, hand, 0.058, 0.05, skin)
        if sleeve > 0:
            pen.limb(shoulder, _point_along(shoulder, hand, sleeve), 0.066, 0.058, upper)
            if who.upper_type == "sweater":
                cuff = _point_along(shoulder, hand, sleeve)
                pen.ellipse(cuff[0], cuff[1], 0.03, 0.03, dark)
        pen.ellipse(hand[0], hand[1], 0.028, 0.028, skin)
        if who.bag == "handbag" and number == 1:
            bag = _jitter(COLOURS[who.bag_colour], rng)  # type: ignore[index]
            pen.rect(hand[0] - 0.045, hand[1] + 0.015, hand[0] + 0.045, hand[1] + 0.09, bag)


def _draw_bag(pen: _Pen, who: Identity, view: str, behind: bool,
              palette: dict[str, tuple[int, int, int]] = COLOURS) -> None:
    """Backpack and shoulder bag; ``behind`` is the pass before the arms (straps, the pack seen from behind)."""
    COLOURS = palette  # noqa: N806
    if who.bag not in ("backpack", "shoulder bag"):
        return
    bag = COLOURS[who.bag_colour]  # type: ignore[index]
    if who.bag == "backpack" and behind:
        if view == "back":
            # narrower than the back, so the garment stays visible around it
            pen.rect(-0.075, 0.19, 0.075, 0.4, bag)
            pen.rect(-0.055, 0.32, 0.055, 0.38, _shade(bag, 0.75))
        elif view == "side":
            pen.rect(-0.2, 0.18, -0.085, 0.42, bag)
            pen.limb((-0.09, 0.16), (0.03, 0.3), 0.02, 0.02, bag)
        else:
            for sx in (-1, 1):
                pen.limb((sx * 0.07, 0.155), (sx * 0.078, 0.36), 0.024, 0.024, bag)
    if who.bag == "shoulder bag":
        if behind:
            pen.limb((-0.09, 0.155), (0.11, 0.46), 0.018, 0.018, bag)
        else:
            x = 0.06 if view == "side" else 0.095
            pen.rect(x, 0.43, x + 0.1, 0.53, bag)


def _draw_head(pen: _Pen, who: Identity, view: str, skin: tuple[int, int, int],
               hair: tuple[int, int, int], palette: dict[str, tuple[int, int, int]] = COLOURS) -> None:
    COLOURS = palette  # noqa: N806
    side, back = view == "side", view == "back"
    face_x = 0.012 if side else 0.0
    pen.rect(-0.022, 0.11, 0.022, 0.16, skin)
    pen.ellipse(0.0, 0.055, 0.062, 0.06, hair)
    if not back:
        pen.ellipse(face_x, 0.08, 0.05, 0.055, skin)
        eye = (0.03,) if side else (-0.02, 0.02)
        for x in eye:
            pen.ellipse(x, 0.072, 0.007, 0.006, (40, 30, 30))
    if who.hair_length == "long" and back:
        pen.poly(((-0.066, 0.06), (0.066, 0.06), (0.075, 0.28), (-0.075, 0.28)), hair)
    if who.glasses and not back:
        xs = (0.028,) if side else (-0.02, 0.02)
        for x in xs:
            pen.rect(x - 0.018, 0.062, x + 0.018, 0.082, (20, 20, 22))
    if who.hat_colour:
        hat = COLOURS[who.hat_colour]
        pen.ellipse(0.0, 0.025, 0.066, 0.035, hat)
        pen.rect(-0.08 + (0.02 if side else 0), 0.03, 0.08 + (0.03 if side else 0), 0.045, hat)
    if who.umbrella_colour:
        canopy = COLOURS[who.umbrella_colour]
        pen.rect(0.072, -0.02, 0.08, 0.3, (50, 50, 50))
        (x0, y0), (x1, y1) = pen.xy(0.076 - 0.27, -0.3), pen.xy(0.076 + 0.27, 0.2)
        pen.draw.pieslice((min(x0, x1), y0, max(x0, x1), y1), 180, 360, fill=canopy)


def render_image(who: Identity, rng: random.Random, noise_rng: np.random.Generator) -> Image.Image:
    """One 128 x 64 RGB picture of ``who`` with a random view, framing, background and photometric noise."""
    width, height = IMAGE_WIDTH * _SUPERSAMPLE, IMAGE_HEIGHT * _SUPERSAMPLE
    canvas = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(canvas)
    _background(draw, width, height, rng)
    view = rng.choice(_VIEWS)
    scale = rng.uniform(0.68, 0.76) if who.umbrella_colour else rng.uniform(0.8, 0.95)
    person_h = scale * height
    head_room = 0.3 * person_h if who.umbrella_colour else 0.0
    top = head_room + rng.uniform(0.01, 0.99) * (height - person_h - head_room - 0.02 * height)
    cx = width / 2 + rng.uniform(-0.09, 0.09) * width
    pen = _Pen(draw, cx, top, person_h, mirror=view == "left")
    _draw_person(pen, who, "side" if view in ("left", "right") else view, rng)
    if rng.random() < 0.12:  # occluder: a pole, or something low in front of the legs
        if rng.random() < 0.5:
            x0 = rng.uniform(0, 0.9) * width
            draw.rectangle((x0, 0, x0 + rng.uniform(0.06, 0.12) * width, height), fill=_muted(rng, 40, 120))
        else:
            y0 = height * rng.uniform(0.75, 0.88)
            x0 = rng.choice((-0.1, 0.5)) * width
            draw.rectangle((x0, y0, x0 + 0.6 * width, height), fill=_muted(rng))
    image = canvas.reduce(_SUPERSAMPLE)
    if rng.random() < 0.35:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.8)))
    pixels = np.asarray(image, dtype=np.float32)
    contrast, brightness = rng.uniform(0.8, 1.15), rng.uniform(0.82, 1.15)
    pixels = (pixels - pixels.mean()) * contrast + pixels.mean()
    pixels = pixels * brightness + noise_rng.normal(0.0, rng.uniform(0.0, 4.0), pixels.shape)
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))


# ----------------------------------------------------------------------------------------------- captions

_UPPER_WORDS = {
    "t-shirt": ("t-shirt", "tee shirt", "short-sleeved shirt", "short sleeve top", "t shirt"),
    "shirt": ("shirt", "long-sleeved shirt", "button-up shirt", "collared shirt"),
    "jacket": ("jacket", "zip-up jacket", "short jacket"),
    "coat": ("coat", "long coat", "overcoat", "knee-length coat"),
    "sweater": ("sweater", "jumper", "pullover", "knit sweater"),
    "dress": ("dress", "sleeveless dress", "knee-length dress"),
}
_LOWER_WORDS = {
    "pants": ("pants", "trousers", "long pants", "slacks"),
    "shorts": ("shorts", "short pants"),
    "skirt": ("skirt", "short skirt"),
}
_PLURAL_WORDS = ("pants", "trousers", "slacks", "jeans", "shorts", "shoes", "sneakers", "trainers", "glasses")


def _a(phrase: str) -> str:
    """The noun phrase with its article: none for plurals, 'an' before a vowel sound."""
    if phrase.split()[-1] in _PLURAL_WORDS:
        return phrase
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


class _Writer:
    """Writes one caption for one identity; fields in ``always`` are mentioned in every caption."""

    def __init__(self, who: Identity, rng: random.Random, always: Sequence[str]) -> None:
        self.who, self.rng, self.always = who, rng, set(always)
        if who.gender == "man":
            self.subject_words = ("the man", "a man", "this man", "the guy", "a young man")
            self.pronoun, self.possessive = "he", "his"
        else:
            self.subject_words = ("the woman", "a woman", "this lady", "a young woman", "the lady")
            self.pronoun, self.possessive = "she", "her"
        if rng.random() < 0.3:
            self.subject_words = ("the person", "a pedestrian", "this person", "the pedestrian")
            self.pronoun, self.possessive = "the person", "their"

    def upper(self) -> str:
        who, rng = self.who, self.rng
        word = rng.choice(_UPPER_WORDS[who.upper_type])
        if who.pattern == "striped" and rng.random() < 0.8:
            second = _contrast(who.upper_colour)[0]
            if rng.random() < 0.5:
                return _a(f"{who.upper_colour} and {second} striped {word}")
            return f"{_a(f'{who.upper_colour} {word}')} with {second} stripes"
        if who.pattern == "plaid" and rng.random() < 0.8:
            return _a(f"{who.upper_colour} {rng.choice(('plaid', 'checkered'))} {word}")
        return _a(f"{who.upper_colour} {word}")

    def lower(self) -> str:
        who = self.who
        words = _LOWER_WORDS[who.lower_type]  # type: ignore[index]
        if who.lower_type == "pants" and who.lower_colour in ("blue", "black", "gray"):
            words += ("jeans",)
        phrase = f"{who.lower_colour} {self.rng.choice(words)}"
        if phrase.split()[-1] in _PLURAL_WORDS and self.rng.random() < 0.15:
            return "a pair of " + phrase
        return _a(phrase)

    def shoes(self) -> str:
        return f"{self.who.shoes_colour} {self.rng.choice(('shoes', 'sneakers', 'trainers', 'shoes'))}"

    def hair(self) -> str:
        who, rng = self.who, self.rng
        if who.hair_length == "long":
            return rng.choice((f"long {who.hair_colour} hair", f"shoulder-length {who.hair_colour} hair"))
        return rng.choice((f"short {who.hair_colour} hair", f"{who.hair_colour} short hair"))

    def mentions(self) -> list[str]:
        """The optional attributes this caption names, each kept with its own probability, in random order."""
        who, rng = self.who, self.rng
        # Kept moderate: each extra colour word is one more binding a small text encoder must learn.
        options = [("hair", 0.35), ("shoes", 0.35)]
        options += [(name, p) for name, p, present in (
            ("bag", 0.6, who.bag), ("hat", 0.5, who.hat_colour), ("glasses", 0.4, who.glasses),
            ("umbrella", 0.6, who.umbrella_colour)) if present]
        forced = {"hair" if "hair" in f else "shoes" for f in self.always if f.startswith(("hair", "shoes"))}
        kept = [name for name, p in options if rng.random() < p or name in forced]
        rng.shuffle(kept)
        return kept

    def verb_phrase(self, name: str) -> str:
        who, rng, poss = self.who, self.rng, self.possessive
        if name == "hair":
            return f"has {self.hair()}"
        if name == "shoes":
            return rng.choice((f"is wearing {self.shoes()}", f"has {self.shoes()} on"))
        if name == "bag":
            colour = who.bag_colour
            return rng.choice({
                "backpack": (f"is carrying {_a(f'{colour} backpack')}", f"wears {_a(f'{colour} backpack')}",
                             f"has {_a(f'{colour} backpack')} on {poss} back"),
                "handbag": (f"is carrying {_a(f'{colour} handbag')} in {poss} hand",
                            f"holds {_a(f'{colour} purse')}", f"carries {_a(f'{colour} handbag')}"),
                "shoulder bag": (f"has {_a(f'{colour} shoulder bag')}", f"is carrying {_a(f'{colour} shoulder bag')}",
                                 f"carries {_a(f'{colour} bag')} over {poss} shoulder"),
            }[who.bag])  # type: ignore[index]
        if name == "hat":
            return rng.choice((f"is wearing {_a(f'{who.hat_colour} hat')}",
                               f"has {_a(f'{who.hat_colour} cap')} on {poss} head"))
        if name == "glasses":
            return rng.choice(("is wearing glasses", "wears dark glasses"))
        return rng.choice((f"is holding {_a(f'{who.umbrella_colour} umbrella')}",
                           f"holds {_a(f'{who.umbrella_colour} umbrella')} over {poss} head"))

    def caption(self) -> str:
        who, rng = self.who, self.rng
        garments = [self.upper()] if who.lower_type is None else [self.upper(), self.lower()]
        if len(garments) == 2 and rng.random() < 0.2:
            garments.reverse()
        mentioned = self.mentions()
        if "shoes" in mentioned and rng.random() < 0.6:  # annotators often close the garment list with shoes
            mentioned.remove("shoes")
            garments.append(self.shoes())
        subject = rng.choice(self.subject_words)
        if "hair" in mentioned and rng.random() < 0.5:
            mentioned.remove("hair")
            subject += " with " + self.hair()
        listed = self._join(garments)
        first = rng.choice((
            f"{subject} is wearing {listed}.",
            f"{subject} wears {listed}.",
            f"{subject} is dressed in {listed}.",
            f"wearing {listed}, {subject} is walking{rng.choice(('', ' down the street', ' on the sidewalk'))}.",
            f"{subject} is walking, wearing {listed}.",
            f"{subject} has on {listed}.",
        ))
        sentences = [first[0].upper() + first[1:]]
        extras = [self.verb_phrase(name) for name in mentioned]
        while extras:
            take = extras[:2] if len(extras) > 1 and rng.random() < 0.45 else extras[:1]
            extras = extras[len(take):]
            body = take[0] if len(take) == 1 else f"{take[0]}{rng.choice((', and ', ' and ', ', '))}{take[1]}"
            sentences.append(f"{self.pronoun[0].upper()}{self.pronoun[1:]} {body}.")
        return " ".join(sentences)

    def _join(self, items: list[str]) -> str:
        if len(items) == 1:
            return items[0]
        if len(items) == 2:
            return f"{items[0]}{self.rng.choice((' and ', ', ', ', and '))}{items[1]}"
        return ", ".join(items[:-1]) + self.rng.choice((" and ", ", and ", ", ")) + items[-1]


def write_caption(who: Identity, rng: random.Random, always: Sequence[str] = ()) -> str:
    """A CUHK-PEDES-style caption of ``who``; it always names upper and lower garments and ``always`` fields."""
    return _Writer(who, rng, always).caption()


def _tokens(caption: str) -> list[str]:
    return re.findall(r"[a-z0-9'-]+", caption.lower())


# ----------------------------------------------------------------------------------------------- writers

def _image_name(fmt: str, split: str, raw_id: int, k: int) -> str:
    """Relative paths shaped like each dataset's own."""
    if fmt == "cuhkpedes":
        return f"SYNTH/{raw_id:05d}_{k:02d}.jpg"
    if fmt == "icfg":
        return f"{split}/{raw_id:04d}/{raw_id:04d}_{k:03d}.jpg"
    if fmt == "rstp":
        return f"{raw_id:04d}_c{k % 15 + 1}_{k:04d}.jpg"
    return f"imgs/{raw_id:06d}_{k}.jpg"


def make_synthetic(fmt: str, out_dir: str | Path, num_ids: int = 100, seed: int = 0, style: str = "classic") -> Path:
    """Write the synthetic dataset for ``fmt`` into ``out_dir`` and return ``out_dir``.

    cuhkpedes -> reid_raw.json, icfg -> ICFG-PEDES.json, rstp -> data_captions.json (images under imgs/);
    pretrain -> pretrain.json ({"image", "caption"} list, image paths relative to ``out_dir``). Always writes
    SYNTHETIC.json with the format, seed, num_ids and counts. The same arguments give the same bytes.
    ``style`` picks how people are drawn and described (``STYLES``; datasets/synthetic_styles.py).
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown synthetic format '{fmt}': expected one of {FORMATS}")
    if style not in STYLES:
        raise ValueError(f"unknown synthetic style '{style}': expected one of {STYLES}")
    if style != "classic":
        from datasets.synthetic_styles import make_styled  # the sibling imports this module

        return make_styled(fmt, out_dir, num_ids=num_ids, seed=seed, style=style)
    out = Path(out_dir)
    _, (low, high), per_image, annotation_name = _LAYOUT[fmt]
    always = key_fields(num_ids)
    image_root = out if fmt == "pretrain" else out / "imgs"
    entries: list[dict] = []
    counts: dict[str, dict[str, int]] = {}
    for split, raw_id, who in sample_identities(fmt, num_ids, seed):
        rng = random.Random(f"synthetic:{fmt}:{seed}:{raw_id}")
        stats = counts.setdefault(split, {"ids": 0, "images": 0, "captions": 0})
        stats["ids"] += 1
        for k in range(rng.randint(low, high)):
            name = _image_name(fmt, split, raw_id, k)
            path = image_root / name
            path.parent.mkdir(parents=True, exist_ok=True)
            noise = np.random.default_rng([seed, raw_id, k, FORMATS.index(fmt)])
            render_image(who, rng, noise).save(path, "JPEG", quality=_JPEG_QUALITY)
            captions: list[str] = []
            while len(captions) < per_image:
                caption = write_caption(who, rng, always)
                if caption not in captions or len(captions) >= 8:
                    captions.append(caption)
            stats["images"] += 1
            stats["captions"] += len(captions)
            entries.append(_entry(fmt, split, raw_id, name, captions))
    out.mkdir(parents=True, exist_ok=True)
    with open(out / annotation_name, "w", encoding="utf-8") as handle:
        json.dump(entries, handle, indent=1)
    marker = {"format": fmt, "seed": seed, "num_ids": num_ids, "annotation": annotation_name,
              "image_size": [IMAGE_HEIGHT, IMAGE_WIDTH], "key_fields": list(always), "counts": counts}
    with open(out / "SYNTHETIC.json", "w", encoding="utf-8") as handle:
        json.dump(marker, handle, indent=1)
    logger.info("synthetic %s (%d ids, seed %d) written to %s: %s", fmt, num_ids, seed, out, counts)
    return out


def _entry(fmt: str, split: str, raw_id: int, name: str, captions: list[str]) -> dict:
    if fmt == "pretrain":
        return {"image": name, "caption": captions[0]}
    if fmt == "rstp":
        return {"id": raw_id, "img_path": name, "captions": captions, "split": split}
    return {"split": split, "captions": captions, "file_path": name,
            "processed_tokens": [_tokens(c) for c in captions], "id": raw_id}


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--out", required=True, help="output folder (the dataset root)")
    parser.add_argument("--num-ids", type=int, default=100, help="identities over all splits")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--style", default="classic", choices=STYLES,
                        help="how people are drawn and captioned (cctv is the held-out style)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out = make_synthetic(args.format, args.out, args.num_ids, args.seed, style=args.style)
    if args.format == "pretrain":
        print(json.dumps([{"annotation": str(out / "pretrain.json"), "image_root": str(out)}]))
    return out


if __name__ == "__main__":
    main()
