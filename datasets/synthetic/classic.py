"""The classic style, the README's figures: 128x64 JPEG figures, CUHK-PEDES-style captions.

Each image varies scale, position, view, limbs, background, lighting, blur and sometimes occlusion; each caption
is written from the attributes in the words annotators of CUHK-PEDES use.
"""
from __future__ import annotations

import random
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from datasets.synthetic.captions import PLURAL_WORDS, article
from datasets.synthetic.drawing import Picture, Pen, contrast, draw_person, encode, muted, shade
from datasets.synthetic.identities import VIEWS, Identity

IMAGE_HEIGHT, IMAGE_WIDTH = 128, 64
_SUPERSAMPLE = 2  # drawn at twice the size, then box-reduced, for clean edges
_JPEG_QUALITY = 90
# What SYNTHETIC.json records about this style's pictures.
MARKER = {"image_size": [IMAGE_HEIGHT, IMAGE_WIDTH]}


# ----------------------------------------------------------------------------------------------- drawing

def _background(draw: ImageDraw.ImageDraw, width: int, height: int, rng: random.Random) -> None:
    wall, ground = muted(rng), muted(rng)
    horizon = int(height * rng.uniform(0.55, 0.85))
    draw.rectangle((0, 0, width, horizon), fill=wall)
    draw.rectangle((0, horizon, width, height), fill=ground)
    for _ in range(rng.randint(0, 4)):  # facades, doors, windows
        x0, y0 = rng.uniform(-0.2, 1.0) * width, rng.uniform(0, 0.7) * horizon
        draw.rectangle((x0, y0, x0 + rng.uniform(0.1, 0.5) * width, y0 + rng.uniform(0.1, 0.5) * horizon),
                       fill=muted(rng))
    if rng.random() < 0.6:  # paving lines
        step = rng.randint(8, 20) * _SUPERSAMPLE
        for y in range(horizon + step, height, step):
            draw.line((0, y, width, y), fill=shade(ground, 0.8), width=_SUPERSAMPLE)



def render_image(who: Identity, rng: random.Random, noise_rng: np.random.Generator) -> Image.Image:
    """One 128 x 64 RGB picture of ``who`` with a random view, framing, background and photometric noise."""
    return _render(who, rng, noise_rng)[0]


def picture(who: Identity, rng: random.Random, noise: np.random.Generator) -> Picture:
    """The style interface: one encoded picture of ``who`` (always a JPEG at one quality), with its part map."""
    image, view, parts = _render(who, rng, noise)
    return Picture(encode(image, "JPEG", _JPEG_QUALITY), ".jpg", view, encode(parts, "PNG", 0))


def _render(who: Identity, rng: random.Random, noise_rng: np.random.Generator
            ) -> tuple[Image.Image, str, Image.Image]:
    """(picture, view, part map): the map ("L", the picture's size) holds the PARTS index each pixel shows."""
    width, height = IMAGE_WIDTH * _SUPERSAMPLE, IMAGE_HEIGHT * _SUPERSAMPLE
    canvas = Image.new("RGB", (width, height))
    parts = Image.new("L", (width, height), 0)
    labels = ImageDraw.Draw(parts)
    draw = ImageDraw.Draw(canvas)
    _background(draw, width, height, rng)
    view = rng.choice(VIEWS)
    scale = rng.uniform(0.68, 0.76) if who.umbrella_colour else rng.uniform(0.8, 0.95)
    person_h = scale * height
    head_room = 0.3 * person_h if who.umbrella_colour else 0.0
    top = head_room + rng.uniform(0.01, 0.99) * (height - person_h - head_room - 0.02 * height)
    cx = width / 2 + rng.uniform(-0.09, 0.09) * width
    pen = Pen(draw, cx, top, person_h, mirror=view == "left", labels=labels)
    draw_person(pen, who, "side" if view in ("left", "right") else view, rng)
    if rng.random() < 0.12:  # occluder: a pole, or something low in front of the legs
        if rng.random() < 0.5:
            x0 = rng.uniform(0, 0.9) * width
            box = (x0, 0, x0 + rng.uniform(0.06, 0.12) * width, height)
            draw.rectangle(box, fill=muted(rng, 40, 120))
        else:
            y0 = height * rng.uniform(0.75, 0.88)
            x0 = rng.choice((-0.1, 0.5)) * width
            box = (x0, y0, x0 + 0.6 * width, height)
            draw.rectangle(box, fill=muted(rng))
        labels.rectangle(box, fill=0)  # the occluder hides what it covers
    image = canvas.reduce(_SUPERSAMPLE)
    if rng.random() < 0.35:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.8)))
    pixels = np.asarray(image, dtype=np.float32)
    spread, brightness = rng.uniform(0.8, 1.15), rng.uniform(0.82, 1.15)
    pixels = (pixels - pixels.mean()) * spread + pixels.mean()
    pixels = pixels * brightness + noise_rng.normal(0.0, rng.uniform(0.0, 4.0), pixels.shape)
    # each output pixel takes the part at the centre of its 2 x 2 block's lower-right pixel (no mixing of indices)
    parts = parts.resize((IMAGE_WIDTH, IMAGE_HEIGHT), Image.Resampling.NEAREST)
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8)), view, parts


# ----------------------------------------------------------------------------------------------- captions

UPPER_WORDS = {
    "t-shirt": ("t-shirt", "tee shirt", "short-sleeved shirt", "short sleeve top", "t shirt"),
    "shirt": ("shirt", "long-sleeved shirt", "button-up shirt", "collared shirt"),
    "jacket": ("jacket", "zip-up jacket", "short jacket"),
    "coat": ("coat", "long coat", "overcoat", "knee-length coat"),
    "sweater": ("sweater", "jumper", "pullover", "knit sweater"),
    "dress": ("dress", "sleeveless dress", "knee-length dress"),
}
LOWER_WORDS = {
    "pants": ("pants", "trousers", "long pants", "slacks"),
    "shorts": ("shorts", "short pants"),
    "skirt": ("skirt", "short skirt"),
}


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
        word = rng.choice(UPPER_WORDS[who.upper_type])
        if who.pattern == "striped" and rng.random() < 0.8:
            second = contrast(who.upper_colour)[0]
            if rng.random() < 0.5:
                return article(f"{who.upper_colour} and {second} striped {word}")
            return f"{article(f'{who.upper_colour} {word}')} with {second} stripes"
        if who.pattern == "plaid" and rng.random() < 0.8:
            return article(f"{who.upper_colour} {rng.choice(('plaid', 'checkered'))} {word}")
        return article(f"{who.upper_colour} {word}")

    def lower(self) -> str:
        who = self.who
        words = LOWER_WORDS[who.lower_type]  # type: ignore[index]
        if who.lower_type == "pants" and who.lower_colour in ("blue", "black", "gray"):
            words += ("jeans",)
        phrase = f"{who.lower_colour} {self.rng.choice(words)}"
        if phrase.split()[-1] in PLURAL_WORDS and self.rng.random() < 0.15:
            return "a pair of " + phrase
        return article(phrase)

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
                "backpack": (f"is carrying {article(f'{colour} backpack')}", f"wears {article(f'{colour} backpack')}",
                             f"has {article(f'{colour} backpack')} on {poss} back"),
                "handbag": (f"is carrying {article(f'{colour} handbag')} in {poss} hand",
                            f"holds {article(f'{colour} purse')}", f"carries {article(f'{colour} handbag')}"),
                "shoulder bag": (f"has {article(f'{colour} shoulder bag')}",
                                 f"is carrying {article(f'{colour} shoulder bag')}",
                                 f"carries {article(f'{colour} bag')} over {poss} shoulder"),
            }[who.bag])  # type: ignore[index]
        if name == "hat":
            return rng.choice((f"is wearing {article(f'{who.hat_colour} hat')}",
                               f"has {article(f'{who.hat_colour} cap')} on {poss} head"))
        if name == "glasses":
            return rng.choice(("is wearing glasses", "wears dark glasses"))
        return rng.choice((f"is holding {article(f'{who.umbrella_colour} umbrella')}",
                           f"holds {article(f'{who.umbrella_colour} umbrella')} over {poss} head"))

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


def caption(who: Identity, view: str, rng: random.Random, always: Sequence[str]) -> str:
    """The style interface: one caption of ``who`` (the classic annotators do not describe the view)."""
    return write_caption(who, rng, always)
