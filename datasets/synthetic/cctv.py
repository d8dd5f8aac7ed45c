"""The cctv style, held out: small dim surveillance crops, terse captions with typos.

Pictures: 88-150 px high, aspect 1.9-2.6:1, squat proportions, washed-out colours, dim tinted light, motion blur,
sensor noise, frequent occluders, heavy JPEG (quality 25-55). Captions: terse attribute lists and "upper body: ..."
forms, British words (grey, trousers, jumper, trainers), colour words of their own (scarlet, cobalt, charcoal...),
typos. No number of any recipe is tuned on this style (bench/bench_learning.py reports it apart).
"""
from __future__ import annotations

import random
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from datasets.synthetic.captions import typo
from datasets.synthetic.drawing import RGB, Picture, crop_canvas, encode, mix, muted, person_layer, shade
from datasets.synthetic.identities import COLOURS, Identity

# Output crop heights (px) and height/width ratios; SYNTHETIC.json records them.
_HEIGHTS, _ASPECTS = (88, 150), (1.9, 2.6)
MARKER = {"image_height_range": list(_HEIGHTS), "aspect_range": list(_ASPECTS)}

# The shared colour names washed out towards grey (a cheap camera): neighbouring colours are harder to tell apart.
PALETTE: dict[str, RGB] = {name: mix(rgb, (128, 128, 128), 0.3) for name, rgb in COLOURS.items()}
COLOUR_WORDS: dict[str, tuple[str, ...]] = {
    "red": ("red", "scarlet"), "blue": ("blue", "cobalt", "royal blue"), "green": ("green", "emerald", "lime"),
    "yellow": ("yellow", "lemon"), "black": ("black", "dark"), "white": ("white", "ivory"),
    "gray": ("grey", "charcoal"), "pink": ("pink", "hot pink", "salmon"), "purple": ("purple", "plum", "lilac"),
    "orange": ("orange", "tangerine"), "brown": ("brown", "chocolate", "camel"),
}
UPPER_WORDS = {
    "t-shirt": ("t-shirt", "tshirt", "short sleeve top"), "shirt": ("shirt", "long sleeve shirt"),
    "jacket": ("jacket", "hoodie"), "coat": ("coat", "long coat"), "sweater": ("jumper", "pullover"),
    "dress": ("dress", "long dress"),
}
LOWER_WORDS = {"pants": ("trousers", "jeans", "joggers"), "shorts": ("shorts",), "skirt": ("skirt",)}


# ----------------------------------------------------------------------------------------------- drawing

def _background(width: int, height: int, rng: random.Random) -> Image.Image:
    """A flat floor seen from above (a station, a mall): tiles, a wall strip at the top, low contrast."""
    floor = muted(rng, 90, 170)
    canvas = Image.new("RGB", (width, height), floor)
    draw = ImageDraw.Draw(canvas)
    draw.rectangle((0, 0, width, int(height * rng.uniform(0.05, 0.3))), fill=muted(rng, 60, 200))
    step = rng.randint(10, 24) * 2
    line = shade(floor, rng.uniform(0.75, 0.9))
    for y in range(0, height, step):
        draw.line((0, y, width, y), fill=line, width=2)
    for x in range(rng.randint(0, step), width, step):
        draw.line((x, 0, x, height), fill=line, width=2)
    return canvas


def picture(who: Identity, rng: random.Random, noise: np.random.Generator) -> Picture:
    """The style interface: always a heavily compressed JPEG (quality 25-55)."""
    image, view = render(who, rng, noise)
    return Picture(encode(image, "JPEG", rng.randint(25, 55)), ".jpg", view)


def render(who: Identity, rng: random.Random, noise: np.random.Generator) -> tuple[Image.Image, str]:
    """(picture, view) for the cctv style: a small dim squat crop with blur, tint, noise and occluders."""
    _, canvas, view = crop_canvas(_HEIGHTS, _ASPECTS, _background, rng)  # drawn at twice the size, then reduced
    width, height = canvas.size
    # seen from above: drawn taller, then squashed, so heads look big and legs short
    squash = rng.uniform(0.78, 0.92)
    tall = int(round(height / squash))
    person_h = rng.uniform(0.85, 0.97) * tall
    top = rng.uniform(0.0, 1.0) * (tall - person_h - 0.01 * tall)
    cx = width / 2 + rng.uniform(-0.12, 0.12) * width
    layer = person_layer(who, view, (width, tall), cx, top, person_h, rng.uniform(1.0, 1.3), PALETTE, rng)
    layer = layer.resize((width, height), Image.Resampling.BILINEAR)
    canvas = Image.alpha_composite(canvas, layer)
    draw = ImageDraw.Draw(canvas)
    if rng.random() < 0.3:  # occluders: a railing, another person's shoulder, a bin
        kind = rng.randrange(3)
        if kind == 0:
            y0 = height * rng.uniform(0.55, 0.75)
            draw.rectangle((0, y0, width, y0 + 0.03 * height), fill=muted(rng, 30, 100))
            for x in range(0, width, max(4, width // 5)):
                draw.rectangle((x, y0, x + 3, height), fill=muted(rng, 30, 100))
        elif kind == 1:
            x0 = rng.choice((-0.45, 0.65)) * width
            draw.ellipse((x0, height * 0.2, x0 + 0.8 * width, height * 1.1), fill=muted(rng, 20, 110))
        else:
            y0 = height * rng.uniform(0.7, 0.85)
            x0 = rng.uniform(-0.2, 0.6) * width
            draw.rectangle((x0, y0, x0 + 0.5 * width, height), fill=muted(rng, 40, 140))
    image = canvas.convert("RGB").reduce(2)
    if rng.random() < 0.5:  # motion blur along the walk
        kernel = rng.choice((3, 5))
        image = image.filter(ImageFilter.Kernel((kernel, kernel), [1.0 if i // kernel == kernel // 2 else 0.0
                                                  for i in range(kernel * kernel)], scale=kernel))
    pixels = np.asarray(image, dtype=np.float32)
    tint = np.array(rng.choice(((1.0, 1.0, 1.0), (0.9, 1.05, 0.9), (0.88, 0.95, 1.1), (1.08, 1.0, 0.85))),
                    dtype=np.float32)
    gain = rng.uniform(0.55, 0.95)  # dim indoor light
    mean = pixels.mean()
    pixels = ((pixels - mean) * rng.uniform(0.7, 0.95) + mean) * gain * tint
    pixels += noise.normal(0.0, rng.uniform(3.0, 8.0), pixels.shape)
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8)), view


# ----------------------------------------------------------------------------------------------- captions

class _Writer:
    """Terse attribute lists or "upper body: ..." forms, British words, a few typos."""

    TYPO_RATE = 0.04  # per word of four letters or more

    def __init__(self, who: Identity, rng: random.Random, always: Sequence[str]) -> None:
        self.who, self.rng, self.always = who, rng, set(always)

    def colour(self, name: str) -> str:
        return self.rng.choice(COLOUR_WORDS[name])

    def items(self) -> list[tuple[str, str]]:
        """(slot, text) pairs; upper and lower garments always, the rest sometimes."""
        who, rng = self.who, self.rng
        upper = f"{self.colour(who.upper_colour)} {rng.choice(UPPER_WORDS[who.upper_type])}"
        if who.pattern != "plain" and rng.random() < 0.7:
            upper = f"{'stripy' if who.pattern == 'striped' else 'checked'} {upper}"
        out = [("upper", upper)]
        if who.lower_type is not None:
            out.append(("lower", f"{self.colour(who.lower_colour)} {rng.choice(LOWER_WORDS[who.lower_type])}"))  # type: ignore[arg-type]
        if "shoes_colour" in self.always or rng.random() < 0.35:
            out.append(("shoes", f"{self.colour(who.shoes_colour)} trainers"))
        if "hair_colour" in self.always or rng.random() < 0.35:
            length = "long" if who.hair_length == "long" else "short"
            colour = {"gray": "grey", "blonde": "fair"}.get(who.hair_colour, who.hair_colour)
            out.append(("hair", f"{length} {colour} hair"))
        if who.bag and rng.random() < 0.5:
            bag = {"backpack": "backpack", "handbag": "handbag", "shoulder bag": "messenger bag"}[who.bag]
            out.append(("bag", f"{self.colour(who.bag_colour)} {bag}"))  # type: ignore[arg-type]
        if who.hat_colour and rng.random() < 0.4:
            out.append(("hat", f"{self.colour(who.hat_colour)} cap"))
        if who.glasses and rng.random() < 0.3:
            out.append(("glasses", "specs"))
        return out

    def caption(self) -> str:
        who, rng = self.who, self.rng
        items = self.items()
        sex = rng.choice(("male", "man") if who.gender == "man" else ("female", "woman"))
        form = rng.randrange(3)
        if form == 0:  # a comma list in any order
            rng.shuffle(items)
            text = f"{sex}, " + ", ".join(t for _, t in items)
        elif form == 1:  # attribute form
            label = {"upper": "upper body", "lower": "lower body", "shoes": "footwear", "hair": "hair",
                     "bag": "carrying", "hat": "headwear", "glasses": "accessory"}
            text = f"{sex}; " + "; ".join(f"{label[s]}: {t}" for s, t in items)
        else:  # one short sentence
            main = [t for s, t in items if s in ("upper", "lower")]
            rest = [t for s, t in items if s not in ("upper", "lower")]
            text = f"{sex} in {' and '.join(main)}"
            if rest:
                text += " with " + ", ".join(rest)
        words = text.split(" ")
        words = [typo(w, rng) if len(w) >= 4 and w.isalpha() and rng.random() < self.TYPO_RATE else w
                 for w in words]
        return " ".join(words) + rng.choice((".", "", "."))


def caption(who: Identity, view: str, rng: random.Random, always: Sequence[str]) -> str:
    """The style interface: one cctv caption of ``who`` (the view is not described)."""
    return _Writer(who, rng, always).caption()
