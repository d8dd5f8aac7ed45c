"""Drawing primitives every style shares: colour helpers, a pen in person units, the figure itself, encoding.

A style module draws its own background, framing, light and camera on top of ``draw_person``.
"""
from __future__ import annotations

import io
import math
import random
from typing import Callable, NamedTuple, Sequence

from PIL import Image, ImageDraw

from datasets.synthetic.identities import COLOURS, HAIR_COLOURS, SKIN_TONES, VIEWS, Identity

RGB = tuple[int, int, int]


class Picture(NamedTuple):
    """One encoded picture a style drew: the file's bytes, its suffix (".jpg", ".png") and the view drawn."""

    data: bytes
    suffix: str
    view: str
    parts: bytes | None = None  # a PNG part map (PARTS indices, the picture's size), for styles that draw one


def encode(image: Image.Image, fmt: str, quality: int) -> bytes:
    """``image`` as the bytes of a JPEG (at ``quality``) or PNG file."""
    buffer = io.BytesIO()
    image.save(buffer, fmt, quality=quality) if fmt == "JPEG" else image.save(buffer, fmt, optimize=False)
    return buffer.getvalue()


def crop_canvas(heights: tuple[int, int], aspects: tuple[float, float],
                background: Callable[[int, int, random.Random], Image.Image],
                rng: random.Random) -> tuple[tuple[int, int], Image.Image, str]:
    """The start of a picture of varied size: (width, height) of the output, a height in ``heights`` (px) and a
    height/width ratio in ``aspects``; an RGBA canvas twice that size with ``background`` drawn; the view to draw."""
    (low, high), (thin, wide) = heights, aspects
    out_h = rng.randint(low, high)
    out_w = int(round(out_h / rng.uniform(thin, wide)))
    canvas = background(out_w * 2, out_h * 2, rng).convert("RGBA")
    return (out_w, out_h), canvas, rng.choice(VIEWS)


def mix(colour: RGB, towards: RGB, amount: float) -> RGB:
    return tuple(int(round(c + (t - c) * amount)) for c, t in zip(colour, towards))  # type: ignore[return-value]


def muted(rng: random.Random, low: int = 60, high: int = 205) -> tuple[int, int, int]:
    """A low-saturation colour, so backgrounds never compete with garment colours."""
    grey = rng.randint(low, high)
    return tuple(max(0, min(255, grey + rng.randint(-14, 14))) for _ in range(3))  # type: ignore[return-value]


def shade(colour: tuple[int, int, int], factor: float) -> tuple[int, int, int]:
    return tuple(max(0, min(255, int(c * factor))) for c in colour)  # type: ignore[return-value]


def contrast(colour: str) -> tuple[str, tuple[int, int, int]]:
    """Name and RGB of the second colour of a pattern: white on dark garments, black on light ones."""
    name = "black" if colour in ("white", "yellow", "pink", "orange") else "white"
    return name, COLOURS[name]


def jitter(colour: tuple[int, int, int], rng: random.Random, amount: int = 12) -> tuple[int, int, int]:
    return tuple(max(0, min(255, c + rng.randint(-amount, amount))) for c in colour)  # type: ignore[return-value]


# The part of the figure each shape belongs to, as drawn into a part map beside the picture (0: not the person).
PARTS = ("background", "body", "hair", "upper", "lower", "shoes", "bag", "hat", "glasses", "umbrella")


class Pen:
    """Draws in person units (height 1, x from the body axis, y down from the top of the head).

    ``labels``: a second drawing (mode "L") of the same size, or None. When given, every shape is drawn there too,
    filled with the index in PARTS of ``pen.part``, in the same painter's order: the finished map says which part
    each visible pixel shows. It reads no random number and leaves the picture as it would be without it.
    """

    def __init__(self, draw: ImageDraw.ImageDraw, cx: float, top: float, height: float, mirror: bool,
                 build: float = 1.0, labels: ImageDraw.ImageDraw | None = None) -> None:
        self.draw, self.cx, self.top, self.h, self.sign = draw, cx, top, height, (-1.0 if mirror else 1.0)
        self.build = build  # horizontal stretch of the body (other styles draw broader or slimmer people)
        self.labels, self.part = labels, "body"

    def xy(self, x: float, y: float) -> tuple[float, float]:
        return self.cx + self.sign * x * self.h * self.build, self.top + y * self.h

    def poly(self, points: Sequence[tuple[float, float]], fill: tuple[int, int, int]) -> None:
        self.draw.polygon([self.xy(x, y) for x, y in points], fill=fill)
        if self.labels is not None:
            self.labels.polygon([self.xy(x, y) for x, y in points], fill=PARTS.index(self.part))

    def ellipse(self, x: float, y: float, rx: float, ry: float, fill: tuple[int, int, int]) -> None:
        (x0, y0), (x1, y1) = self.xy(x - rx, y - ry), self.xy(x + rx, y + ry)
        self.draw.ellipse((min(x0, x1), y0, max(x0, x1), y1), fill=fill)
        if self.labels is not None:
            self.labels.ellipse((min(x0, x1), y0, max(x0, x1), y1), fill=PARTS.index(self.part))

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


def point_along(start: tuple[float, float], end: tuple[float, float], t: float) -> tuple[float, float]:
    return start[0] + (end[0] - start[0]) * t, start[1] + (end[1] - start[1]) * t



def draw_person(pen: Pen, who: Identity, view: str, rng: random.Random,
                palette: dict[str, tuple[int, int, int]] = COLOURS) -> None:
    """The whole figure in painter's order; ``view`` is front, back or side (mirroring handles left/right).

    ``palette`` maps colour names to the RGB drawn (other styles draw the same names in their own shades).
    """
    COLOURS = palette  # noqa: N806 -- the named colours below are drawn in this style's shades
    side, back = view == "side", view == "back"
    skin = jitter(SKIN_TONES[who.skin], rng, 6)
    hair = jitter(HAIR_COLOURS[who.hair_colour], rng, 8)
    upper = jitter(COLOURS[who.upper_colour], rng)
    lower = jitter(COLOURS[who.lower_colour], rng) if who.lower_colour else skin
    shoes = jitter(COLOURS[who.shoes_colour], rng)
    wide = 0.6 if side else 1.0
    shoulder_w, hem_w = 0.25 * wide, {"coat": 0.27, "jacket": 0.235, "dress": 0.34}.get(who.upper_type, 0.21) * wide
    hem_y = {"coat": 0.66, "dress": 0.70}.get(who.upper_type, 0.49)

    # hair falling behind the shoulders is seen around the neck from the front
    if who.hair_length == "long" and not back:
        pen.part = "hair"
        pen.poly(((-0.066, 0.06), (0.066, 0.06), (0.072 * wide, 0.27), (-0.072 * wide - (0.03 if side else 0), 0.27)),
                 hair)

    # legs: long garments cover them, shorts the top, otherwise skin; a stride in side view
    stride = rng.uniform(0.0, 0.13) if side else 0.0
    spread = rng.uniform(-0.01, 0.035)
    for sx, fx in ((-1, -stride), (1, stride)):
        hip = (sx * 0.06 * wide, 0.48)
        foot = (fx + (0 if side else sx * (0.055 + spread)), 0.94)
        pen.part = "body"
        pen.limb(hip, foot, 0.1, 0.072, skin)
        pen.part = "lower"
        # garments a little wider than the legs, so the lower colour covers many pixels even at 64 x 32
        if who.lower_type == "pants":
            pen.limb(hip, point_along(hip, foot, 0.96), 0.12, 0.09, lower)
        elif who.lower_type == "shorts":
            pen.limb(hip, point_along(hip, foot, 0.38), 0.125, 0.115, lower)
        toe = 0.02 if side else 0.0
        pen.part = "shoes"
        pen.ellipse(foot[0] + toe, foot[1] + 0.012, 0.045 if side else 0.04, 0.022, shoes)
    pen.part = "lower"
    if who.lower_type in ("pants", "shorts"):
        pen.rect(-0.115 * wide, 0.46, 0.115 * wide, 0.56, lower)
    elif who.lower_type == "skirt":
        pen.poly(((-0.11 * wide, 0.46), (0.11 * wide, 0.46), (0.175 * wide, 0.69), (-0.175 * wide, 0.69)), lower)

    # upper garment (a dress narrows at the waist, then flares)
    pen.part = "upper"
    if who.upper_type == "dress":
        pen.poly(((-shoulder_w / 2, 0.15), (shoulder_w / 2, 0.15), (0.09 * wide, 0.36), (hem_w / 2, hem_y),
                  (-hem_w / 2, hem_y), (-0.09 * wide, 0.36)), upper)
    else:
        pen.poly(((-shoulder_w / 2, 0.15), (shoulder_w / 2, 0.15), (hem_w / 2, hem_y), (-hem_w / 2, hem_y)), upper)
    _draw_pattern(pen, who, shoulder_w, hem_w, hem_y, rng)
    dark = shade(upper, 0.55) if who.upper_colour != "black" else (70, 70, 72)
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

    pen.part = "bag"
    _draw_bag(pen, who, view, behind=True, palette=palette)
    _draw_arms(pen, who, view, upper, skin, dark, rng, palette=palette)
    pen.part = "bag"
    _draw_bag(pen, who, view, behind=False, palette=palette)
    _draw_head(pen, who, view, skin, hair, palette=palette)


def _draw_pattern(pen: Pen, who: Identity, shoulder_w: float, hem_w: float, hem_y: float,
                  rng: random.Random) -> None:
    if who.pattern == "plain":
        return
    colour = contrast(who.upper_colour)[1]

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


def _draw_arms(pen: Pen, who: Identity, view: str, upper: tuple[int, int, int], skin: tuple[int, int, int],
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
            pen.part = "upper" if sleeve > 0.5 else "body"
            pen.limb(shoulder, elbow, 0.058, 0.055, upper if sleeve > 0.5 else skin)
            pen.part = "upper" if sleeve > 0.7 else "body"
            pen.limb(elbow, hand, 0.055, 0.05, upper if sleeve > 0.7 else skin)
            pen.part = "body"
            pen.ellipse(hand[0], hand[1], 0.028, 0.028, skin)
            continue
        angle = math.radians(rng.uniform(-25, 25) if side else rng.uniform(2, 20))
        hand = (shoulder[0] + sx * 0.34 * math.sin(angle), shoulder[1] + 0.34 * math.cos(angle))
        pen.part = "body"
        pen.limb(shoulder, hand, 0.058, 0.05, skin)
        pen.part = "upper"
        if sleeve > 0:
            pen.limb(shoulder, point_along(shoulder, hand, sleeve), 0.066, 0.058, upper)
            if who.upper_type == "sweater":
                cuff = point_along(shoulder, hand, sleeve)
                pen.ellipse(cuff[0], cuff[1], 0.03, 0.03, dark)
        pen.part = "body"
        pen.ellipse(hand[0], hand[1], 0.028, 0.028, skin)
        if who.bag == "handbag" and number == 1:
            bag = jitter(COLOURS[who.bag_colour], rng)  # type: ignore[index]
            pen.part = "bag"
            pen.rect(hand[0] - 0.045, hand[1] + 0.015, hand[0] + 0.045, hand[1] + 0.09, bag)


def _draw_bag(pen: Pen, who: Identity, view: str, behind: bool,
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
            pen.rect(-0.055, 0.32, 0.055, 0.38, shade(bag, 0.75))
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


def _draw_head(pen: Pen, who: Identity, view: str, skin: tuple[int, int, int],
               hair: tuple[int, int, int], palette: dict[str, tuple[int, int, int]] = COLOURS) -> None:
    COLOURS = palette  # noqa: N806
    side, back = view == "side", view == "back"
    face_x = 0.012 if side else 0.0
    pen.part = "body"
    pen.rect(-0.022, 0.11, 0.022, 0.16, skin)
    pen.part = "hair"
    pen.ellipse(0.0, 0.055, 0.062, 0.06, hair)
    pen.part = "body"
    if not back:
        pen.ellipse(face_x, 0.08, 0.05, 0.055, skin)
        eye = (0.03,) if side else (-0.02, 0.02)
        for x in eye:
            pen.ellipse(x, 0.072, 0.007, 0.006, (40, 30, 30))
    if who.hair_length == "long" and back:
        pen.part = "hair"
        pen.poly(((-0.066, 0.06), (0.066, 0.06), (0.075, 0.28), (-0.075, 0.28)), hair)
    if who.glasses and not back:
        pen.part = "glasses"
        xs = (0.028,) if side else (-0.02, 0.02)
        for x in xs:
            pen.rect(x - 0.018, 0.062, x + 0.018, 0.082, (20, 20, 22))
    if who.hat_colour:
        hat = COLOURS[who.hat_colour]
        pen.part = "hat"
        pen.ellipse(0.0, 0.025, 0.066, 0.035, hat)
        pen.rect(-0.08 + (0.02 if side else 0), 0.03, 0.08 + (0.03 if side else 0), 0.045, hat)
    if who.umbrella_colour:
        canopy = COLOURS[who.umbrella_colour]
        pen.part = "umbrella"
        pen.rect(0.072, -0.02, 0.08, 0.3, (50, 50, 50))
        (x0, y0), (x1, y1) = pen.xy(0.076 - 0.27, -0.3), pen.xy(0.076 + 0.27, 0.2)
        pen.draw.pieslice((min(x0, x1), y0, max(x0, x1), y1), 180, 360, fill=canopy)
        if pen.labels is not None:
            pen.labels.pieslice((min(x0, x1), y0, max(x0, x1), y1), 180, 360, fill=PARTS.index("umbrella"))


def person_layer(who: Identity, view: str, size: tuple[int, int], cx: float, top: float, person_h: float,
                 build: float, palette: dict[str, RGB], rng: random.Random) -> Image.Image:
    """The figure alone on a transparent layer (so it can be lit and shaded apart from the background)."""
    layer = Image.new("RGBA", size, (0, 0, 0, 0))
    pen = Pen(ImageDraw.Draw(layer), cx, top, person_h, mirror=view == "left", build=build)
    draw_person(pen, who, "side" if view in ("left", "right") else view, rng, palette=palette)
    return layer
