"""The mixed style, for pretraining corpora: every picture drawn under other conditions, captions in many registers.

Not a fine-tuning target: ``configs/demo_pretrain.yaml`` pretrains on it, and fine-tuning is measured on the
other styles. It randomises what the other styles each fix (domain randomisation), so that what a model learns
from it is the person and the words, not one camera or one annotator:

Pictures: 80-256 px high, aspect 1.8-3.2:1, one of five background kinds (flat, gradient, blocks, stripes,
grid), each colour name drawn in a shade of its own per picture (hue, saturation and brightness jittered, some
drift towards grey), squat to tall proportions, broad to slim builds, occluders, blur, tinted and dimmed light,
sensor noise, JPEG at quality 20-95 or PNG. Captions: one of five registers (a sentence, several sentences, a
comma list, an "upper body: ..." form, a short phrase) over a general English lexicon of colour and garment
words (several per colour and garment), sometimes a remark about the picture, a few typos.
"""
from __future__ import annotations

import colorsys
import random
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from datasets.synthetic.captions import article, typo
from datasets.synthetic.drawing import RGB, Picture, crop_canvas, encode, mix, muted, person_layer
from datasets.synthetic.identities import COLOURS, Identity

_HEIGHTS, _ASPECTS = (80, 256), (1.8, 3.2)
MARKER = {"image_height_range": list(_HEIGHTS), "aspect_range": list(_ASPECTS)}

COLOUR_WORDS: dict[str, tuple[str, ...]] = {
    "red": ("red", "crimson", "scarlet", "maroon", "burgundy", "dark red", "cherry red", "wine red"),
    "blue": ("blue", "navy", "navy blue", "royal blue", "cobalt", "dark blue", "light blue", "sky blue",
             "denim blue"),
    "green": ("green", "olive", "dark green", "emerald", "lime", "forest green", "olive green"),
    "yellow": ("yellow", "mustard", "gold", "golden", "lemon", "bright yellow"),
    "black": ("black", "dark", "jet-black", "all-black"),
    "white": ("white", "cream", "ivory", "off-white", "snow-white"),
    "gray": ("gray", "grey", "silver", "charcoal", "ash gray", "light gray"),
    "pink": ("pink", "rose", "salmon", "hot pink", "pale pink", "fuchsia"),
    "purple": ("purple", "violet", "lilac", "plum", "lavender", "mauve"),
    "orange": ("orange", "tangerine", "rust", "burnt orange", "amber", "peach"),
    "brown": ("brown", "tan", "beige", "khaki", "chocolate", "camel", "coffee"),
}
UPPER_WORDS = {
    "t-shirt": ("t-shirt", "tee", "tee shirt", "t shirt", "tshirt", "short-sleeved shirt", "short sleeve top",
                "polo shirt", "top"),
    "shirt": ("shirt", "long-sleeved shirt", "button-up shirt", "button-down", "blouse", "dress shirt",
              "collared shirt"),
    "jacket": ("jacket", "windbreaker", "hoodie", "bomber jacket", "zip-up jacket", "blazer", "anorak"),
    "coat": ("coat", "overcoat", "long coat", "trench coat", "parka", "raincoat"),
    "sweater": ("sweater", "jumper", "pullover", "cardigan", "sweatshirt", "knit top"),
    "dress": ("dress", "long dress", "sundress", "gown", "frock"),
}
LOWER_WORDS = {
    "pants": ("pants", "trousers", "jeans", "slacks", "chinos", "joggers", "sweatpants", "leggings"),
    "shorts": ("shorts", "short pants", "bermuda shorts", "cut-offs"),
    "skirt": ("skirt", "miniskirt", "long skirt", "pleated skirt"),
}
_SHOES = ("shoes", "sneakers", "trainers", "boots", "loafers", "sandals")
_BAGS = {"backpack": ("backpack", "rucksack", "schoolbag"), "handbag": ("handbag", "purse", "clutch", "tote"),
         "shoulder bag": ("shoulder bag", "satchel", "messenger bag", "crossbody bag")}
_HATS = ("hat", "cap", "beanie", "baseball cap")
_PATTERNS = {"striped": ("striped", "stripy", "pinstriped"), "plaid": ("plaid", "checked", "checkered", "tartan")}
_PEOPLE = {"man": ("man", "male", "guy", "gentleman", "young man", "boy", "male pedestrian"),
           "woman": ("woman", "female", "lady", "girl", "young woman", "female pedestrian")}
_NEUTRAL = ("person", "pedestrian", "individual", "someone")
_WORN = ("upper", "lower", "shoes", "hat", "glasses")
_LABELS = {"upper": ("upper body", "top", "upper"), "lower": ("lower body", "bottom", "lower"),
           "shoes": ("footwear", "shoes", "feet"), "hair": ("hair", "head"), "bag": ("carrying", "bag", "belongings"),
           "hat": ("headwear", "hat"), "glasses": ("accessory", "face"), "umbrella": ("holding", "accessory")}
_REMARKS = ("The photo is blurry.", "The picture is taken from above.", "It seems to be a sunny day.",
            "The background is a wall.", "The image is dark.", "There is a pole in front.", "The lighting is dim.",
            "This image was taken outdoors.", "The picture is a little grainy.", "Other people walk behind.")
_VIEW_WORDS = {"front": ("facing the camera", "walking towards the camera", "seen from the front"),
               "back": ("seen from behind", "walking away", "with the back to the camera"),
               "left": ("seen from the side", "walking to the left", "in profile"),
               "right": ("seen from the side", "walking to the right", "in profile")}
# For article(): the plural nouns of this lexicon the shared list does not hold.
_PLURALS = {"sweatpants", "leggings", "sandals"}


# ----------------------------------------------------------------------------------------------- drawing

def _palette(rng: random.Random) -> dict[str, RGB]:
    """Every colour name in a shade of its own: hue, saturation and value jittered, and a drift towards grey."""
    grey, value = rng.uniform(0.0, 0.35), rng.uniform(0.7, 1.15)
    palette = {}
    for name, rgb in COLOURS.items():
        h, s, v = colorsys.rgb_to_hsv(*(c / 255 for c in rgb))
        h = (h + rng.uniform(-0.025, 0.025)) % 1.0
        s = min(1.0, max(0.0, s * rng.uniform(0.75, 1.1)))
        v = min(1.0, max(0.03, v * value * rng.uniform(0.9, 1.1)))
        shade = tuple(int(round(255 * c)) for c in colorsys.hsv_to_rgb(h, s, v))
        palette[name] = mix(shade, (128, 128, 128), grey)  # type: ignore[arg-type]
    return palette


def _background(width: int, height: int, rng: random.Random) -> Image.Image:
    """Flat, a vertical gradient, blocks, stripes or a grid, in muted colours, sometimes out of focus."""
    canvas = Image.new("RGB", (width, height), muted(rng, 40, 210))
    draw = ImageDraw.Draw(canvas)
    kind = rng.randrange(5)
    if kind == 1:
        top, bottom = muted(rng, 40, 220), muted(rng, 40, 220)
        for y in range(height):
            t = y / max(1, height - 1)
            draw.line((0, y, width, y), fill=tuple(int(a + (b - a) * t) for a, b in zip(top, bottom)))
    elif kind == 2:
        for _ in range(rng.randint(3, 9)):
            x0, y0 = rng.uniform(-0.3, 1.0) * width, rng.uniform(-0.3, 1.0) * height
            draw.rectangle((x0, y0, x0 + rng.uniform(0.1, 0.7) * width, y0 + rng.uniform(0.05, 0.5) * height),
                           fill=muted(rng, 30, 220))
    elif kind == 3:
        step, colour, vertical = rng.randint(6, 30) * 2, muted(rng, 30, 220), rng.random() < 0.5
        for p in range(0, width if vertical else height, step):
            draw.rectangle((p, 0, p + step // 2, height) if vertical else (0, p, width, p + step // 2), fill=colour)
    elif kind == 4:
        step, line = rng.randint(8, 28) * 2, muted(rng, 30, 220)
        for y in range(0, height, step):
            draw.line((0, y, width, y), fill=line, width=2)
        for x in range(0, width, step):
            draw.line((x, 0, x, height), fill=line, width=2)
    if rng.random() < 0.5:
        canvas = canvas.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 2.5)))
    return canvas


def _occlude(canvas: Image.Image, rng: random.Random) -> None:
    """A pole across the picture, or something low in front of the legs."""
    width, height = canvas.size
    draw = ImageDraw.Draw(canvas)
    if rng.random() < 0.5:
        x0 = rng.uniform(0, 0.9) * width
        draw.rectangle((x0, 0, x0 + rng.uniform(0.05, 0.14) * width, height), fill=muted(rng, 20, 200))
    else:
        y0, x0 = height * rng.uniform(0.65, 0.88), rng.uniform(-0.3, 0.6) * width
        draw.rectangle((x0, y0, x0 + rng.uniform(0.3, 0.7) * width, height), fill=muted(rng, 20, 200))


def render(who: Identity, rng: random.Random, noise: np.random.Generator) -> tuple[Image.Image, str]:
    """(picture, view): a crop of random size and framing under random light and camera."""
    (out_w, out_h), canvas, view = crop_canvas(_HEIGHTS, _ASPECTS, _background, rng)
    width, height = canvas.size
    tall = int(round(height / rng.uniform(0.78, 1.0)))  # drawn taller, then squashed: seen from above
    person_h = rng.uniform(0.72, 0.97) * tall
    top = rng.uniform(0.0, 1.0) * (tall - person_h - 0.01 * tall)
    cx = width / 2 + rng.uniform(-0.12, 0.12) * width
    layer = person_layer(who, view, (width, tall), cx, top, person_h, rng.uniform(0.85, 1.3), _palette(rng), rng)
    canvas = Image.alpha_composite(canvas, layer.resize((width, height), Image.Resampling.BILINEAR))
    if rng.random() < 0.25:
        _occlude(canvas, rng)
    resample = rng.choice((Image.Resampling.BILINEAR, Image.Resampling.LANCZOS))
    image = canvas.convert("RGB").resize((out_w, out_h), resample)
    if rng.random() < 0.4:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.2)))
    pixels = np.asarray(image, dtype=np.float32)
    mean = pixels.mean()
    tint = np.array([rng.uniform(0.85, 1.15) for _ in range(3)], dtype=np.float32)
    pixels = ((pixels - mean) * rng.uniform(0.65, 1.2) + mean) * rng.uniform(0.5, 1.2) * tint
    pixels += noise.normal(0.0, rng.uniform(0.0, 8.0), pixels.shape)
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8)), view


def picture(who: Identity, rng: random.Random, noise: np.random.Generator) -> Picture:
    image, view = render(who, rng, noise)
    if rng.random() < 0.2:
        return Picture(encode(image, "PNG", 0), ".png", view)
    return Picture(encode(image, "JPEG", rng.randint(20, 95)), ".jpg", view)


# ----------------------------------------------------------------------------------------------- captions

def _a(phrase: str) -> str:
    return phrase if phrase.split()[-1] in _PLURALS or phrase.endswith("hair") else article(phrase)


def _join(items: Sequence[str], rng: random.Random) -> str:
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + rng.choice((" and ", ", and ", ", ")) + items[-1]


class _Writer:
    """One caption in one of five registers; upper garment always, lower nearly always, the rest sometimes."""

    def __init__(self, who: Identity, view: str, rng: random.Random, always: Sequence[str]) -> None:
        self.who, self.view, self.rng, self.always = who, view, rng, set(always)

    def colour(self, name: str) -> str:
        return self.rng.choice(COLOUR_WORDS[name])

    def items(self) -> list[tuple[str, str]]:
        """(slot, words) for what this caption names."""
        who, rng = self.who, self.rng
        upper = f"{self.colour(who.upper_colour)} {rng.choice(UPPER_WORDS[who.upper_type])}"
        if who.pattern != "plain" and rng.random() < 0.7:
            upper = f"{rng.choice(_PATTERNS[who.pattern])} {upper}"
        out = [("upper", upper)]
        # lower_colour is always a key field, so the lower garment is always named; the draw stays because the
        # recorded corpora's bytes depend on the sequence of draws
        if who.lower_type is not None and (rng.random() < 0.95 or "lower_colour" in self.always):
            out.append(("lower", f"{self.colour(who.lower_colour)} {rng.choice(LOWER_WORDS[who.lower_type])}"))  # type: ignore[arg-type]
        if rng.random() < 0.4 or "shoes_colour" in self.always:
            out.append(("shoes", f"{self.colour(who.shoes_colour)} {rng.choice(_SHOES)}"))
        if rng.random() < 0.4 or "hair_colour" in self.always:
            colour = {"gray": rng.choice(("gray", "grey")), "blonde": rng.choice(("blonde", "fair"))}.get(
                who.hair_colour, who.hair_colour)
            length = rng.choice(("long", "shoulder-length") if who.hair_length == "long" else ("short", "cropped"))
            out.append(("hair", f"{length} {colour} hair"))
        if who.bag and rng.random() < 0.6:
            out.append(("bag", f"{self.colour(who.bag_colour)} {rng.choice(_BAGS[who.bag])}"))  # type: ignore[arg-type]
        if who.hat_colour and rng.random() < 0.5:
            out.append(("hat", f"{self.colour(who.hat_colour)} {rng.choice(_HATS)}"))
        if who.glasses and rng.random() < 0.4:
            out.append(("glasses", rng.choice(("glasses", "sunglasses", "specs"))))
        if who.umbrella_colour and rng.random() < 0.6:
            out.append(("umbrella", f"{self.colour(who.umbrella_colour)} umbrella"))
        return out

    def caption(self) -> str:
        who, rng = self.who, self.rng
        items = self.items()
        person = rng.choice(_PEOPLE[who.gender] if rng.random() < 0.8 else _NEUTRAL)
        pronoun, possessive = (("he", "his") if who.gender == "man" else ("she", "her")) if rng.random() < 0.8 \
            else ("they", "their")
        worn = [words for slot, words in items if slot in _WORN]
        held = [words for slot, words in items if slot in ("bag", "umbrella")]
        hair = [words for slot, words in items if slot == "hair"]
        register = rng.randrange(5)
        if register == 0:  # one sentence
            verb = rng.choice(("is wearing", "wears", "is dressed in", "has on", "is in"))
            text = f"{article(person)}{''.join(' with ' + h for h in hair)} {verb} {_join([_a(w) for w in worn], rng)}"
            if held:
                verb = rng.choice(("carries", "has", "is holding", "is carrying"))
                text += f" and {verb} {_join([_a(w) for w in held], rng)}"
            text = text[0].upper() + text[1:] + "."
        elif register == 1:  # several sentences, the view first
            parts = [f"{article(person)} is {rng.choice(_VIEW_WORDS[self.view])}."]
            rng.shuffle(items)
            plural = pronoun == "they"
            for slot, words in items:
                if slot == "hair":
                    parts.append(f"{possessive} hair is {words.removesuffix(' hair')}.")
                elif slot in ("bag", "umbrella"):
                    parts.append(f"{pronoun} {'carry' if plural else 'carries'} {_a(words)}.")
                else:
                    parts.append(f"{pronoun} {'wear' if plural else 'wears'} {_a(words)}.")
            text = " ".join(p[0].upper() + p[1:] for p in parts)
        elif register == 2:  # a comma list
            rng.shuffle(items)
            text = f"{person}, " + ", ".join(words for _, words in items)
        elif register == 3:  # an attribute form
            text = f"{person}; " + "; ".join(f"{rng.choice(_LABELS[slot])}: {words}" for slot, words in items)
        else:  # a short phrase
            text = f"{person} in {_join(worn, rng)}" + (f" with {_join(held + hair, rng)}" if held + hair else "")
        if rng.random() < 0.2:
            text += " " + rng.choice(_REMARKS)
        return " ".join(typo(w, rng) if len(w) >= 4 and w.isalpha() and rng.random() < 0.02 else w
                        for w in text.split(" "))


def caption(who: Identity, view: str, rng: random.Random, always: Sequence[str]) -> str:
    return _Writer(who, view, rng, always).caption()
