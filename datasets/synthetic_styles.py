"""Two further synthetic pedestrian styles, so a recipe can be checked on data it was not designed on.

The classic style (datasets/synthetic.py) draws 128x64 JPEG figures and writes CUHK-PEDES-like captions. The
styles here draw the same kinds of people (the same attributes, the same key that singles out every identity)
but differently, and describe them in other words:

=========  =======================================================  ==============================================
style      pictures                                                 captions
=========  =======================================================  ==============================================
street     tall crops of varied size (160-256 px high, aspect        long multi-sentence descriptions, lower garment
           2.4-3:1), light from one side shades each figure, drop    often first, its own colour and garment words
           shadow, building facades with windows, passers-by,        (navy, crimson, chinos, windbreaker...), the
           PNG or JPEG                                               view of the picture ("seen from behind")
cctv       small surveillance crops (88-150 px high, aspect          terse attribute lists and "upper body: ..."
(held out) 1.9-2.6:1), squat proportions, washed-out colours, dim    forms, British words (grey, trousers, jumper,
           tinted light, motion blur, sensor noise, frequent         trainers), their own colour words (scarlet,
           occluders, heavy JPEG (quality 25-55)                     cobalt, charcoal...), typos
=========  =======================================================  ==============================================

cctv is the held-out style: no number of any recipe is tuned on it (bench/bench_learning.py reports it apart).
Same arguments, same bytes, as for the classic style.
"""
from __future__ import annotations

import io
import json
import logging
import random
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from datasets import synthetic as base
from datasets.synthetic import COLOURS, FORMATS, Identity

logger = logging.getLogger(__name__)

RGB = tuple[int, int, int]


def _mix(colour: RGB, towards: RGB, amount: float) -> RGB:
    return tuple(int(round(c + (t - c) * amount)) for c, t in zip(colour, towards))  # type: ignore[return-value]


# Each style draws the shared colour names in its own shades: street in deeper "real cloth" shades, cctv washed out
# towards grey (a cheap camera), which makes neighbouring colours harder to tell apart.
STREET_PALETTE: dict[str, RGB] = {
    "red": (170, 28, 45), "blue": (30, 45, 125), "green": (60, 110, 45), "yellow": (225, 180, 40),
    "black": (30, 30, 34), "white": (232, 228, 215), "gray": (140, 142, 150), "pink": (230, 150, 170),
    "purple": (105, 55, 140), "orange": (220, 105, 35), "brown": (150, 105, 65),
}
CCTV_PALETTE: dict[str, RGB] = {name: _mix(rgb, (128, 128, 128), 0.3) for name, rgb in COLOURS.items()}

# Words for the shared colour names; no word is used by two styles' captions except the plain colour names
# that every annotator uses (street and cctv each use some of them, and words of their own).
STREET_COLOUR_WORDS: dict[str, tuple[str, ...]] = {
    "red": ("crimson", "dark red", "burgundy"), "blue": ("navy", "navy blue", "dark blue"),
    "green": ("olive", "olive green", "dark green"), "yellow": ("mustard", "mustard yellow", "gold"),
    "black": ("black", "jet-black"), "white": ("cream", "off-white", "white"), "gray": ("gray", "silver"),
    "pink": ("rose", "pale pink", "pink"), "purple": ("violet", "deep purple"), "orange": ("rust", "burnt orange"),
    "brown": ("tan", "khaki", "light brown"),
}
CCTV_COLOUR_WORDS: dict[str, tuple[str, ...]] = {
    "red": ("red", "scarlet"), "blue": ("blue", "cobalt", "royal blue"), "green": ("green", "emerald", "lime"),
    "yellow": ("yellow", "lemon"), "black": ("black", "dark"), "white": ("white", "ivory"),
    "gray": ("grey", "charcoal"), "pink": ("pink", "hot pink", "salmon"), "purple": ("purple", "plum", "lilac"),
    "orange": ("orange", "tangerine"), "brown": ("brown", "chocolate", "camel"),
}
STREET_UPPER = {
    "t-shirt": ("tee", "polo shirt", "short-sleeved top"), "shirt": ("button-down", "dress shirt", "oxford shirt"),
    "jacket": ("windbreaker", "bomber jacket", "zip jacket"), "coat": ("trench coat", "parka", "overcoat"),
    "sweater": ("cardigan", "sweatshirt", "knitted top"), "dress": ("sundress", "summer dress", "frock"),
}
STREET_LOWER = {"pants": ("chinos", "trousers", "slacks"), "shorts": ("bermuda shorts", "cut-offs"),
                "skirt": ("miniskirt", "pleated skirt")}
CCTV_UPPER = {
    "t-shirt": ("t-shirt", "tshirt", "short sleeve top"), "shirt": ("shirt", "long sleeve shirt"),
    "jacket": ("jacket", "hoodie"), "coat": ("coat", "long coat"), "sweater": ("jumper", "pullover"),
    "dress": ("dress", "long dress"),
}
CCTV_LOWER = {"pants": ("trousers", "jeans", "joggers"), "shorts": ("shorts",), "skirt": ("skirt",)}
_VIEW_WORDS = {"front": ("facing the camera", "walking towards the camera"),
               "back": ("seen from behind", "walking away from the camera"),
               "left": ("seen from the side", "walking to the left"),
               "right": ("seen from the side", "walking to the right")}


# ----------------------------------------------------------------------------------------------- drawing

def _street_background(width: int, height: int, rng: random.Random) -> Image.Image:
    """A facade with windows above a pavement, a vertical light gradient and a few blurred passers-by."""
    canvas = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(canvas)
    wall = base._muted(rng, 70, 190)
    ground = base._muted(rng, 80, 160)
    horizon = int(height * rng.uniform(0.6, 0.8))
    for y in range(horizon):  # brighter towards the top (sky light)
        draw.line((0, y, width, y), fill=base._shade(wall, 1.15 - 0.35 * y / horizon))
    draw.rectangle((0, horizon, width, height), fill=ground)
    cols, rows = rng.randint(2, 4), rng.randint(3, 6)
    window = base._shade(wall, rng.uniform(0.45, 0.7))
    for i in range(cols):
        for j in range(rows):
            x0 = (i + 0.2) * width / cols
            y0 = (j + 0.15) * horizon / rows
            draw.rectangle((x0, y0, x0 + 0.55 * width / cols, y0 + 0.55 * horizon / rows), fill=window)
    for _ in range(rng.randint(0, 2)):  # distant passers-by: small muted silhouettes
        px, ph = rng.uniform(0, width), rng.uniform(0.25, 0.45) * height
        py = horizon - 0.8 * ph
        body = base._muted(rng, 40, 150)
        draw.ellipse((px - 0.05 * ph, py, px + 0.05 * ph, py + 0.1 * ph), fill=body)
        draw.rectangle((px - 0.08 * ph, py + 0.1 * ph, px + 0.08 * ph, py + ph), fill=body)
    draw.line((0, horizon, width, horizon), fill=base._shade(ground, 0.7), width=3)
    return canvas.filter(ImageFilter.GaussianBlur(1.5))


def _cctv_background(width: int, height: int, rng: random.Random) -> Image.Image:
    """A flat floor seen from above (a station, a mall): tiles, a wall strip at the top, low contrast."""
    floor = base._muted(rng, 90, 170)
    canvas = Image.new("RGB", (width, height), floor)
    draw = ImageDraw.Draw(canvas)
    draw.rectangle((0, 0, width, int(height * rng.uniform(0.05, 0.3))), fill=base._muted(rng, 60, 200))
    step = rng.randint(10, 24) * 2
    line = base._shade(floor, rng.uniform(0.75, 0.9))
    for y in range(0, height, step):
        draw.line((0, y, width, y), fill=line, width=2)
    for x in range(rng.randint(0, step), width, step):
        draw.line((x, 0, x, height), fill=line, width=2)
    return canvas


def _person_layer(who: Identity, view: str, size: tuple[int, int], cx: float, top: float, person_h: float,
                  build: float, palette: dict[str, RGB], rng: random.Random) -> Image.Image:
    """The figure alone on a transparent layer (so it can be lit and shaded apart from the background)."""
    layer = Image.new("RGBA", size, (0, 0, 0, 0))
    pen = base._Pen(ImageDraw.Draw(layer), cx, top, person_h, mirror=view == "left", build=build)
    base._draw_person(pen, who, "side" if view in ("left", "right") else view, rng, palette=palette)
    return layer


def _side_light(layer: Image.Image, strength: float, from_left: bool) -> Image.Image:
    """Darkens the figure towards one side and towards the feet: light from a window or the street."""
    pixels = np.asarray(layer, dtype=np.float32)
    height, width = pixels.shape[:2]
    x = np.linspace(0.0, 1.0, width)[None, :]
    y = np.linspace(0.0, 1.0, height)[:, None]
    factor = 1.12 - strength * (x if from_left else 1.0 - x) - 0.2 * y
    pixels[..., :3] *= factor[..., None]
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGBA")


def _encode(image: Image.Image, fmt: str, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, quality=quality) if fmt == "JPEG" else image.save(buffer, fmt, optimize=False)
    return buffer.getvalue()


# Output crop heights (px) and height/width ratios per style; SYNTHETIC.json records them.
_IMAGE_SIZES = {"street": ((160, 256), (2.4, 3.0)), "cctv": ((88, 150), (1.9, 2.6))}


def _crop_size(style: str, rng: random.Random) -> tuple[int, int]:
    """(height, width) of one output picture of ``style``, drawn from _IMAGE_SIZES."""
    (low, high), (thin, wide) = _IMAGE_SIZES[style]
    height = rng.randint(low, high)
    return height, int(round(height / rng.uniform(thin, wide)))


def render_street(who: Identity, rng: random.Random, noise: np.random.Generator) -> tuple[Image.Image, str]:
    """(picture, view) for the street style: a tall shaded crop of varied size."""
    out_h, out_w = _crop_size("street", rng)
    width, height = out_w * 2, out_h * 2
    canvas = _street_background(width, height, rng).convert("RGBA")
    view = rng.choice(base._VIEWS)
    person_h = rng.uniform(0.82, 0.96) * height
    top = rng.uniform(0.01, 0.99) * (height - person_h - 0.02 * height)
    cx = width / 2 + rng.uniform(-0.07, 0.07) * width
    build = rng.uniform(0.85, 1.2)
    # drop shadow on the ground, away from the light
    from_left = rng.random() < 0.5
    shadow = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
    foot_y = top + 0.95 * person_h
    offset = (0.25 if from_left else -0.25) * person_h * 0.3
    ImageDraw.Draw(shadow).ellipse((cx + offset - 0.18 * person_h * build, foot_y - 0.03 * person_h,
                                    cx + offset + 0.18 * person_h * build, foot_y + 0.03 * person_h),
                                   fill=(0, 0, 0, 90))
    canvas = Image.alpha_composite(canvas, shadow)
    layer = _person_layer(who, view, canvas.size, cx, top, person_h, build, STREET_PALETTE, rng)
    canvas = Image.alpha_composite(canvas, _side_light(layer, rng.uniform(0.25, 0.5), from_left))
    if rng.random() < 0.15:  # a lamp post or a sign in front
        x0 = rng.uniform(0, 0.9) * width
        ImageDraw.Draw(canvas).rectangle((x0, 0, x0 + rng.uniform(0.05, 0.1) * width, height),
                                         fill=base._muted(rng, 30, 90))
    image = canvas.convert("RGB").resize((out_w, out_h), Image.Resampling.LANCZOS)
    pixels = np.asarray(image, dtype=np.float32)
    warm = np.array([rng.uniform(0.95, 1.08), 1.0, rng.uniform(0.9, 1.05)], dtype=np.float32)  # daylight tint
    pixels = pixels * warm * rng.uniform(0.85, 1.15) + noise.normal(0.0, 2.0, pixels.shape)
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8)), view


def render_cctv(who: Identity, rng: random.Random, noise: np.random.Generator) -> tuple[Image.Image, str]:
    """(picture, view) for the cctv style: a small dim squat crop with blur, tint, noise and occluders."""
    out_h, out_w = _crop_size("cctv", rng)
    width, height = out_w * 2, out_h * 2
    canvas = _cctv_background(width, height, rng).convert("RGBA")
    view = rng.choice(base._VIEWS)
    # seen from above: drawn taller, then squashed, so heads look big and legs short
    squash = rng.uniform(0.78, 0.92)
    tall = int(round(height / squash))
    person_h = rng.uniform(0.85, 0.97) * tall
    top = rng.uniform(0.0, 1.0) * (tall - person_h - 0.01 * tall)
    cx = width / 2 + rng.uniform(-0.12, 0.12) * width
    layer = _person_layer(who, view, (width, tall), cx, top, person_h, rng.uniform(1.0, 1.3), CCTV_PALETTE, rng)
    layer = layer.resize((width, height), Image.Resampling.BILINEAR)
    canvas = Image.alpha_composite(canvas, layer)
    draw = ImageDraw.Draw(canvas)
    if rng.random() < 0.3:  # occluders: a railing, another person's shoulder, a bin
        kind = rng.randrange(3)
        if kind == 0:
            y0 = height * rng.uniform(0.55, 0.75)
            draw.rectangle((0, y0, width, y0 + 0.03 * height), fill=base._muted(rng, 30, 100))
            for x in range(0, width, max(4, width // 5)):
                draw.rectangle((x, y0, x + 3, height), fill=base._muted(rng, 30, 100))
        elif kind == 1:
            x0 = rng.choice((-0.45, 0.65)) * width
            draw.ellipse((x0, height * 0.2, x0 + 0.8 * width, height * 1.1), fill=base._muted(rng, 20, 110))
        else:
            y0 = height * rng.uniform(0.7, 0.85)
            x0 = rng.uniform(-0.2, 0.6) * width
            draw.rectangle((x0, y0, x0 + 0.5 * width, height), fill=base._muted(rng, 40, 140))
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

def _a(phrase: str) -> str:
    last = phrase.split()[-1]
    if last in ("trousers", "chinos", "slacks", "shorts", "cut-offs", "jeans", "joggers", "trainers", "boots",
                "shoes", "sneakers", "loafers", "glasses", "sunglasses"):
        return phrase
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


class _StreetWriter:
    """Long, observational, several sentences; the lower garment often comes first; the view is described."""

    def __init__(self, who: Identity, view: str, rng: random.Random, always: Sequence[str]) -> None:
        self.who, self.view, self.rng, self.always = who, view, rng, set(always)

    def colour(self, name: str) -> str:
        return self.rng.choice(STREET_COLOUR_WORDS[name])

    def caption(self) -> str:
        who, rng = self.who, self.rng
        man = who.gender == "man"
        noun = rng.choice(("gentleman", "male pedestrian", "young guy") if man else
                          ("lady", "female pedestrian", "young girl"))
        pro, poss = ("he", "his") if man else ("she", "her")
        hair = f"{'long' if who.hair_length == 'long' else 'cropped'} {who.hair_colour} hair"
        upper = f"{self.colour(who.upper_colour)} {rng.choice(STREET_UPPER[who.upper_type])}"
        if who.pattern != "plain" and rng.random() < 0.7:
            upper = f"{'pinstriped' if who.pattern == 'striped' else 'tartan'} {upper}"
        parts = []
        lead = rng.choice((f"In this picture, a {noun} is {rng.choice(_VIEW_WORDS[self.view])}.",
                           f"A {noun} with {hair} is {rng.choice(_VIEW_WORDS[self.view])}.",
                           f"This {noun} appears to be strolling along the pavement."))
        parts.append(lead)
        if who.lower_type is not None:
            lower = f"{self.colour(who.lower_colour)} {rng.choice(STREET_LOWER[who.lower_type])}"  # type: ignore[arg-type]
            if rng.random() < 0.5:
                parts.append(rng.choice((f"{pro.capitalize()} has on {_a(lower)} paired with {_a(upper)}.",
                                         f"Dressed in {_a(lower)}, {pro} also sports {_a(upper)} on top.")))
            else:
                parts.append(rng.choice((f"{pro.capitalize()} sports {_a(upper)} over {_a(lower)}.",
                                         f"Up top {pro} has {_a(upper)}, and below {_a(lower)}.")))
        else:
            parts.append(f"{pro.capitalize()} is in {_a(upper)} that reaches {poss} knees.")
        footwear = f"{self.colour(who.shoes_colour)} {rng.choice(('loafers', 'boots', 'sneakers'))}"
        if "shoes_colour" in self.always or rng.random() < 0.4:
            parts.append(f"On {poss} feet are {footwear}.")
        if who.bag and rng.random() < 0.6:
            bag = {"backpack": "rucksack", "handbag": "clutch", "shoulder bag": "satchel"}[who.bag]
            parts.append(f"{pro.capitalize()} is toting {_a(f'{self.colour(who.bag_colour)} {bag}')}.")  # type: ignore[arg-type]
        if "hair_colour" in self.always and hair not in parts[0]:
            parts.append(f"{poss.capitalize()} hair is {who.hair_colour} and {who.hair_length}.")
        if who.hat_colour and rng.random() < 0.5:
            parts.append(f"{_a(self.colour(who.hat_colour) + ' beanie').capitalize()} covers {poss} head.")
        if who.glasses and rng.random() < 0.4:
            parts.append(f"{pro.capitalize()} wears sunglasses.")
        if who.umbrella_colour and rng.random() < 0.6:
            parts.append(f"{pro.capitalize()} shelters under {_a(f'{self.colour(who.umbrella_colour)} parasol')}.")
        if rng.random() < 0.3:
            parts.append(rng.choice(("The photo is fairly clear.", "The background is a building.")))
        return " ".join(parts)


_KEYBOARD_NEIGHBOURS = {c: n for c, n in zip("abcdefghijklmnopqrstuvwxyz", (
    "sq", "vn", "xv", "sf", "wr", "dg", "fh", "gj", "uo", "hk", "jl", "k", "n", "bm", "ip", "o", "w", "et", "ad",
    "ry", "yi", "cb", "qe", "zc", "tu", "x"))}


def _typo(word: str, rng: random.Random) -> str:
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


class _CctvWriter:
    """Terse attribute lists or "upper body: ..." forms, British words, a few typos."""

    TYPO_RATE = 0.04  # per word of four letters or more

    def __init__(self, who: Identity, rng: random.Random, always: Sequence[str]) -> None:
        self.who, self.rng, self.always = who, rng, set(always)

    def colour(self, name: str) -> str:
        return self.rng.choice(CCTV_COLOUR_WORDS[name])

    def items(self) -> list[tuple[str, str]]:
        """(slot, text) pairs; upper and lower garments always, the rest sometimes."""
        who, rng = self.who, self.rng
        upper = f"{self.colour(who.upper_colour)} {rng.choice(CCTV_UPPER[who.upper_type])}"
        if who.pattern != "plain" and rng.random() < 0.7:
            upper = f"{'stripy' if who.pattern == 'striped' else 'checked'} {upper}"
        out = [("upper", upper)]
        if who.lower_type is not None:
            out.append(("lower", f"{self.colour(who.lower_colour)} {rng.choice(CCTV_LOWER[who.lower_type])}"))  # type: ignore[arg-type]
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
        words = [_typo(w, rng) if len(w) >= 4 and w.isalpha() and rng.random() < self.TYPO_RATE else w
                 for w in words]
        return " ".join(words) + rng.choice((".", "", "."))


def write_styled_caption(style: str, who: Identity, view: str, rng: random.Random, always: Sequence[str]) -> str:
    if style == "street":
        return _StreetWriter(who, view, rng, always).caption()
    return _CctvWriter(who, rng, always).caption()


# ----------------------------------------------------------------------------------------------- writer

def make_styled(fmt: str, out_dir: str | Path, num_ids: int, seed: int, style: str) -> Path:
    """``make_synthetic`` for the street and cctv styles: the same formats, layouts and marker file."""
    out = Path(out_dir)
    _, (low, high), per_image, annotation_name = base._LAYOUT[fmt]
    always = base.key_fields(num_ids)
    render = render_street if style == "street" else render_cctv
    image_root = out if fmt == "pretrain" else out / "imgs"
    entries: list[dict] = []
    counts: dict[str, dict[str, int]] = {}
    for split, raw_id, who in base.sample_identities(fmt, num_ids, seed, style=style):
        rng = random.Random(f"synthetic:{style}:{fmt}:{seed}:{raw_id}")
        stats = counts.setdefault(split, {"ids": 0, "images": 0, "captions": 0})
        stats["ids"] += 1
        for k in range(rng.randint(low, high)):
            noise = np.random.default_rng([seed, raw_id, k, FORMATS.index(fmt), 1 + base.STYLES.index(style)])
            image, view = render(who, rng, noise)
            if style == "street" and rng.random() < 0.4:
                name, data = base._image_name(fmt, split, raw_id, k)[:-4] + ".png", _encode(image, "PNG", 0)
            else:
                quality = rng.randint(25, 55) if style == "cctv" else rng.randint(70, 92)
                name, data = base._image_name(fmt, split, raw_id, k), _encode(image, "JPEG", quality)
            path = image_root / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            captions: list[str] = []
            while len(captions) < per_image:
                caption = write_styled_caption(style, who, view, rng, always)
                if caption not in captions or len(captions) >= 8:
                    captions.append(caption)
            stats["images"] += 1
            stats["captions"] += len(captions)
            entries.append(base._entry(fmt, split, raw_id, name, captions))
    out.mkdir(parents=True, exist_ok=True)
    with open(out / annotation_name, "w", encoding="utf-8") as handle:
        json.dump(entries, handle, indent=1)
    (heights, aspects) = _IMAGE_SIZES[style]
    marker = {"format": fmt, "seed": seed, "num_ids": num_ids, "style": style, "annotation": annotation_name,
              "image_height_range": list(heights), "aspect_range": list(aspects), "key_fields": list(always),
              "counts": counts}
    with open(out / "SYNTHETIC.json", "w", encoding="utf-8") as handle:
        json.dump(marker, handle, indent=1)
    logger.info("synthetic %s, style %s (%d ids, seed %d) written to %s: %s", fmt, style, num_ids, seed, out,
                counts)
    return out


def caption_words(captions: Sequence[str]) -> set[str]:
    """The lower-case words of some captions (for comparing the styles' vocabularies)."""
    return {w for c in captions for w in base._tokens(c)}


