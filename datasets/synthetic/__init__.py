"""A deterministic synthetic person-retrieval dataset, written in the real datasets' on-disk formats.

Each identity is a factorised set of clearly visible attributes (garment types and colours, hair, shoes, bag,
accessories); every image of it varies scale, position, view, limbs, background, lighting, blur and sometimes
occlusion, and every caption is written from the attributes. The attributes every caption mentions (upper and
lower garment, plus shoes/hair for big sets) form a key that is unique over all identities, so a perfect model
can reach R@1 = 100% and no attribute set is shared between splits.

    python -m datasets.synthetic --format cuhkpedes --out data/synth_cuhk --num-ids 200 --seed 0

The readers load the result like the real files (``SYNTHETIC.json`` marks it so no count warning fires).

Styles draw the same people differently and describe them in other words, so a recipe can be checked on data it
was not designed on: classic (128x64 JPEG figures, CUHK-PEDES-like captions, the README's figures), street (tall
shaded crops of varied size, PNG or JPEG, long captions in their own words) and cctv (small dim surveillance crops,
heavy JPEG, terse captions with typos). cctv is held out: no number of any recipe is tuned on it. mixed draws
pretraining corpora (every picture under other conditions, captions in five registers); it is never a target.

The modules, bottom up: ``identities`` (formats, styles, attributes, who is drawn), ``drawing`` (colour helpers,
the figure, encoding) and ``captions`` (articles, words); one module per style (``classic``, ``street``,
``cctv``, ``mixed``); ``writer`` (the one writer loop and the table of styles; its docstring says how to add a style);
``__main__`` (the command line).
"""
from datasets.synthetic.captions import caption_words
from datasets.synthetic.classic import IMAGE_HEIGHT, IMAGE_WIDTH, render_image, write_caption
from datasets.synthetic.identities import (COLOURS, FORMATS, HELD_OUT_STYLE, PRETRAINING_STYLES, STYLES,
                                           TARGET_STYLES, Identity, identity_key, key_fields, sample_identities,
                                           split_sizes)
from datasets.synthetic.writer import STYLE_TABLE, make_synthetic

__all__ = ["COLOURS", "FORMATS", "HELD_OUT_STYLE", "IMAGE_HEIGHT", "IMAGE_WIDTH", "PRETRAINING_STYLES", "STYLES",
           "STYLE_TABLE", "TARGET_STYLES", "Identity",
           "caption_words", "identity_key", "key_fields", "make_synthetic", "render_image", "sample_identities",
           "split_sizes", "write_caption"]
