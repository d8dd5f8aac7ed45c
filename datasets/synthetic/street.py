"""The street style: tall shaded crops of varied size, long observational captions in their own words.

Pictures: 160-256 px high, aspect 2.4-3:1, light from one side shades each figure, a drop shadow, building facades
with windows, passers-by, PNG or JPEG. Captions: several sentences, the lower garment often first, colour and
garment words of their own (navy, crimson, chinos, windbreaker...), the view of the picture ("seen from behind").
"""
from __future__ import annotations

import random
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from datasets.synthetic.captions import article
from datasets.synthetic.drawing import RGB, Picture, crop_canvas, encode, muted, person_layer, shade
from datasets.synthetic.identities import Identity

# Output crop heights (px) and height/width ratios; SYNTHETIC.json records them.
_HEIGHTS, _ASPECTS = (160, 256), (2.4, 3.0)
MARKER = {"image_height_range": list(_HEIGHTS), "aspect_range": list(_ASPECTS)}

# The shared colour names in deeper "real cloth" shades.
PALETTE: dict[str, RGB] = {
    "red": (170, 28, 45), "blue": (30, 45, 125), "green": (60, 110, 45), "yellow": (225, 180, 40),
    "black": (30, 30, 34), "white": (232, 228, 215), "gray": (140, 142, 150), "pink": (230, 150, 170),
    "purple": (105, 55, 140), "orange": (220, 105, 35), "brown": (150, 105, 65),
}
# No colour word is used by two styles' captions except the plain colour names every annotator uses.
COLOUR_WORDS: dict[str, tuple[str, ...]] = {
    "red": ("crimson", "dark red", "burgundy"), "blue": ("navy", "navy blue", "dark blue"),
    "green": ("olive", "olive green", "dark green"), "yellow": ("mustard", "mustard yellow", "gold"),
    "black": ("black", "jet-black"), "white": ("cream", "off-white", "white"), "gray": ("gray", "silver"),
    "pink": ("rose", "pale pink", "pink"), "purple": ("violet", "deep purple"), "orange": ("rust", "burnt orange"),
    "brown": ("tan", "khaki", "light brown"),
}
UPPER_WORDS = {
    "t-shirt": ("tee", "polo shirt", "short-sleeved top"), "shirt": ("button-down", "dress shirt", "oxford shirt"),
    "jacket": ("windbreaker", "bomber jacket", "zip jacket"), "coat": ("trench coat", "parka", "overcoat"),
    "sweater": ("cardigan", "sweatshirt", "knitted top"), "dress": ("sundress", "summer dress", "frock"),
}
LOWER_WORDS = {"pants": ("chinos", "trousers", "slacks"), "shorts": ("bermuda shorts", "cut-offs"),
               "skirt": ("miniskirt", "pleated skirt")}
_VIEW_WORDS = {"front": ("facing the camera", "walking towards the camera"),
               "back": ("seen from behind", "walking away from the camera"),
               "left": ("seen from the side", "walking to the left"),
               "right": ("seen from the side", "walking to the right")}


# ----------------------------------------------------------------------------------------------- drawing

def _background(width: int, height: int, rng: random.Random) -> Image.Image:
    """A facade with windows above a pavement, a vertical light gradient and a few blurred passers-by."""
    canvas = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(canvas)
    wall = muted(rng, 70, 190)
    ground = muted(rng, 80, 160)
    horizon = int(height * rng.uniform(0.6, 0.8))
    for y in range(horizon):  # brighter towards the top (sky light)
        draw.line((0, y, width, y), fill=shade(wall, 1.15 - 0.35 * y / horizon))
    draw.rectangle((0, horizon, width, height), fill=ground)
    cols, rows = rng.randint(2, 4), rng.randint(3, 6)
    window = shade(wall, rng.uniform(0.45, 0.7))
    for i in range(cols):
        for j in range(rows):
            x0 = (i + 0.2) * width / cols
            y0 = (j + 0.15) * horizon / rows
            draw.rectangle((x0, y0, x0 + 0.55 * width / cols, y0 + 0.55 * horizon / rows), fill=window)
    for _ in range(rng.randint(0, 2)):  # distant passers-by: small muted silhouettes
        px, ph = rng.uniform(0, width), rng.uniform(0.25, 0.45) * height
        py = horizon - 0.8 * ph
        body = muted(rng, 40, 150)
        draw.ellipse((px - 0.05 * ph, py, px + 0.05 * ph, py + 0.1 * ph), fill=body)
        draw.rectangle((px - 0.08 * ph, py + 0.1 * ph, px + 0.08 * ph, py + ph), fill=body)
    draw.line((0, horizon, width, horizon), fill=shade(ground, 0.7), width=3)
    return canvas.filter(ImageFilter.GaussianBlur(1.5))


def _side_light(layer: Image.Image, strength: float, from_left: bool) -> Image.Image:
    """Darkens the figure towards one side and towards the feet: light from a window or the street."""
    pixels = np.asarray(layer, dtype=np.float32)
    height, width = pixels.shape[:2]
    x = np.linspace(0.0, 1.0, width)[None, :]
    y = np.linspace(0.0, 1.0, height)[:, None]
    factor = 1.12 - strength * (x if from_left else 1.0 - x) - 0.2 * y
    pixels[..., :3] *= factor[..., None]
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGBA")


def picture(who: Identity, rng: random.Random, noise: np.random.Generator) -> Picture:
    """The style interface: a PNG two times in five, else a JPEG of quality 70-92."""
    image, view = render(who, rng, noise)
    if rng.random() < 0.4:
        return Picture(encode(image, "PNG", 0), ".png", view)
    return Picture(encode(image, "JPEG", rng.randint(70, 92)), ".jpg", view)


def render(who: Identity, rng: random.Random, noise: np.random.Generator) -> tuple[Image.Image, str]:
    """(picture, view) for the street style: a tall shaded crop of varied size."""
    size, canvas, view = crop_canvas(_HEIGHTS, _ASPECTS, _background, rng)
    width, height = canvas.size
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
    layer = person_layer(who, view, canvas.size, cx, top, person_h, build, PALETTE, rng)
    canvas = Image.alpha_composite(canvas, _side_light(layer, rng.uniform(0.25, 0.5), from_left))
    if rng.random() < 0.15:  # a lamp post or a sign in front
        x0 = rng.uniform(0, 0.9) * width
        ImageDraw.Draw(canvas).rectangle((x0, 0, x0 + rng.uniform(0.05, 0.1) * width, height),
                                         fill=muted(rng, 30, 90))
    image = canvas.convert("RGB").resize(size, Image.Resampling.LANCZOS)
    pixels = np.asarray(image, dtype=np.float32)
    warm = np.array([rng.uniform(0.95, 1.08), 1.0, rng.uniform(0.9, 1.05)], dtype=np.float32)  # daylight tint
    pixels = pixels * warm * rng.uniform(0.85, 1.15) + noise.normal(0.0, 2.0, pixels.shape)
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8)), view


# ----------------------------------------------------------------------------------------------- captions

class _Writer:
    """Long, observational, several sentences; the lower garment often comes first; the view is described."""

    def __init__(self, who: Identity, view: str, rng: random.Random, always: Sequence[str]) -> None:
        self.who, self.view, self.rng, self.always = who, view, rng, set(always)

    def colour(self, name: str) -> str:
        return self.rng.choice(COLOUR_WORDS[name])

    def caption(self) -> str:
        who, rng = self.who, self.rng
        man = who.gender == "man"
        noun = rng.choice(("gentleman", "male pedestrian", "young guy") if man else
                          ("lady", "female pedestrian", "young girl"))
        pro, poss = ("he", "his") if man else ("she", "her")
        hair = f"{'long' if who.hair_length == 'long' else 'cropped'} {who.hair_colour} hair"
        upper = f"{self.colour(who.upper_colour)} {rng.choice(UPPER_WORDS[who.upper_type])}"
        if who.pattern != "plain" and rng.random() < 0.7:
            upper = f"{'pinstriped' if who.pattern == 'striped' else 'tartan'} {upper}"
        parts = []
        lead = rng.choice((f"In this picture, a {noun} is {rng.choice(_VIEW_WORDS[self.view])}.",
                           f"A {noun} with {hair} is {rng.choice(_VIEW_WORDS[self.view])}.",
                           f"This {noun} appears to be strolling along the pavement."))
        parts.append(lead)
        if who.lower_type is not None:
            lower = f"{self.colour(who.lower_colour)} {rng.choice(LOWER_WORDS[who.lower_type])}"  # type: ignore[arg-type]
            if rng.random() < 0.5:
                parts.append(rng.choice((f"{pro.capitalize()} has on {article(lower)} paired with {article(upper)}.",
                                         f"Dressed in {article(lower)}, {pro} also sports {article(upper)} on top.")))
            else:
                parts.append(rng.choice((f"{pro.capitalize()} sports {article(upper)} over {article(lower)}.",
                                         f"Up top {pro} has {article(upper)}, and below {article(lower)}.")))
        else:
            parts.append(f"{pro.capitalize()} is in {article(upper)} that reaches {poss} knees.")
        footwear = f"{self.colour(who.shoes_colour)} {rng.choice(('loafers', 'boots', 'sneakers'))}"
        if "shoes_colour" in self.always or rng.random() < 0.4:
            parts.append(f"On {poss} feet are {footwear}.")
        if who.bag and rng.random() < 0.6:
            bag = {"backpack": "rucksack", "handbag": "clutch", "shoulder bag": "satchel"}[who.bag]
            colour = self.colour(who.bag_colour)  # type: ignore[arg-type]
            parts.append(f"{pro.capitalize()} is toting {article(f'{colour} {bag}')}.")
        if "hair_colour" in self.always and hair not in parts[0]:
            parts.append(f"{poss.capitalize()} hair is {who.hair_colour} and {who.hair_length}.")
        if who.hat_colour and rng.random() < 0.5:
            parts.append(f"{article(self.colour(who.hat_colour) + ' beanie').capitalize()} covers {poss} head.")
        if who.glasses and rng.random() < 0.4:
            parts.append(f"{pro.capitalize()} wears sunglasses.")
        if who.umbrella_colour and rng.random() < 0.6:
            parts.append(f"{pro.capitalize()} shelters under {article(f'{self.colour(who.umbrella_colour)} parasol')}.")
        if rng.random() < 0.3:
            parts.append(rng.choice(("The photo is fairly clear.", "The background is a building.")))
        return " ".join(parts)


def caption(who: Identity, view: str, rng: random.Random, always: Sequence[str]) -> str:
    """The style interface: one street caption of ``who`` as seen in ``view``."""
    return _Writer(who, view, rng, always).caption()
