"""Do the "why this person" heatmaps point at the garment a query names? The pointing game on synthetic data.

    python -m bench.bench_pointing --checkpoint runs/demo/best.pth --data-root runs/parts/classic-400 \
        --out bench/results/pointing.json

The classic synthetic style writes a part map beside every picture (which part each pixel shows: upper garment,
lower garment, shoes, bag, hat, ...; ``parts.json`` names each picture's attribute words). For every picture of
the split and every part it shows, a one-attribute query ("a person in a blue coat", "a person with a red
backpack") is explained against the split's gallery. The peak is the patch with the largest share; two rules,
each counting hits and chance the same way: "centre", a hit when the peak patch's centre pixel shows the part,
chance the share of patch centres that do; "overlap", a hit when any pixel of the peak patch shows it, chance the
share of patches that do (the map's own resolution: a part thinner than a patch row, such as the shoes, seldom
holds a centre). Chance is per picture, averaged like the hits. Heatmaps compared: the plain split of the score,
the contrastive split of the output tokens, integrated gradients over the input patches (models/explain.py), two
text-side baselines, and the one the web page shows ("served"). Per part it also reports how often the model
scores the query above the same query in each other colour of the captions: a model that cannot tell a part's
colour leaves no explanation anything to point at; and where the colour it ranks first comes from, the part's own,
another part's of the same picture (a colour word read as the picture's colours, not bound to the part it names),
or neither. The data set is written when missing.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from utils.errors import user_errors_as_one_line

ROOT = Path(__file__).resolve().parents[1]

# How a one-attribute query names each part.
QUERY = {"upper": "a person in {}", "lower": "a person in {}", "shoes": "a person wearing {}",
         "bag": "a person with {}", "hat": "a person with {}", "umbrella": "a person holding {}"}
PLURAL = ("shoes", "pants", "shorts")
SERVED = "served: integrated-gradients + colour foils"  # the web page's map (engine.explanation.explain_with)
COLOUR_SOURCES = ("own", "another part", "neither")  # colour_source


def query_for(part: str, words: str) -> str:
    """The one-attribute query of ``part`` described by ``words`` ("blue coat" -> "a person in a blue coat")."""
    if words.split()[-1] not in PLURAL:
        words = ("an " if words[0] in "aeiou" else "a ") + words
    return QUERY[part].format(words)


def cells(shape: tuple[int, int], parts: np.ndarray, code: int) -> dict[str, np.ndarray]:
    """Which patches of a [rows, cols] grid stretched over the picture show part ``code`` (parts [H, W], the
    picture's part map), by the two rules: "centre" (the patch's centre pixel shows it) and "overlap" (any of the
    patch's pixels does). Each is a [rows, cols] bool array; a rule's chance is its mean (a peak drawn at random)."""
    rows, cols = shape
    height, width = parts.shape
    ys = ((np.arange(rows) + 0.5) * height / rows).astype(int)
    xs = ((np.arange(cols) + 0.5) * width / cols).astype(int)
    on = parts == code
    y_edges = np.round(np.arange(rows + 1) * height / rows).astype(int)
    x_edges = np.round(np.arange(cols + 1) * width / cols).astype(int)
    overlap = np.array([[on[y_edges[r]:y_edges[r + 1], x_edges[c]:x_edges[c + 1]].any() for c in range(cols)]
                        for r in range(rows)])
    return {"centre": on[np.ix_(ys, xs)], "overlap": overlap}


def peak_hits(patch_map: torch.Tensor, parts: np.ndarray, code: int) -> dict[str, tuple[bool, float]]:
    """Per rule of ``cells``: (the peak patch, the largest share, is on the part; chance: that rule's share of
    patches on the part). patch_map [rows, cols]; parts [H, W] the picture's part map."""
    peak = int(torch.argmax(patch_map))
    return {rule: (bool(on.reshape(-1)[peak]), float(on.mean()))
            for rule, on in cells(tuple(patch_map.shape), parts, code).items()}


def _maps(model, pixels: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, baseline, text_mean: torch.Tensor,
          steps: int) -> dict[str, torch.Tensor]:
    """Every heatmap the game compares for one picture [1, 3, H, W] and one query: [rows, cols] each.

    plain / contrastive: models.explain.explain_match without / with the gallery baseline (output tokens);
    integrated-gradients: over the input patches from the gallery's mean input tokens (models.explain);
    "+ text-centred": the same with the query's direction less the mean direction of the split's captions, so
    what every description shares (a person, a figure) is left out and the named words remain. The map the web
    page shows (integrated gradients against colour foils) is added by _one_query."""
    import torch.nn.functional as F

    from models.explain import explain_match, integrated_gradients

    grid = tuple(model.encoder.grid)
    found = {"plain": explain_match(model, pixels, ids, mask).patch_map(),
             "contrastive": explain_match(model, pixels, ids, mask, baseline.tokens).patch_map()}
    with torch.no_grad():
        _, text = model.encode_text(ids, mask, bmm=False)
        tokens, image = model.encode_image(pixels, bmm=False)
    t_unit = F.normalize(text.float(), dim=1)[0]
    centred = t_unit - text_mean
    out = tokens[0].float() / image[0].float().norm() - baseline.tokens  # [N, D]
    found["contrastive + text-centred"] = (out @ centred)[1:].reshape(grid)
    for name, direction in (("integrated-gradients", t_unit), ("integrated-gradients + text-centred", centred)):
        found[name] = integrated_gradients(model, pixels, direction, baseline.inputs, steps)[1:].reshape(grid)
    return found


def play(checkpoint: str, data_root: Path, split: str, limit: int) -> dict:
    """Hit rates and chance per part kind, rule and heatmap."""
    from PIL import Image

    import torch.nn.functional as F

    from datasets.readers import load_annotations
    from datasets.synthetic.drawing import PARTS
    from datasets.synthetic.writer import PARTS_DIR, PARTS_FILE
    from engine.checkpoints import load_for_inference
    from engine.encoding import tokenize
    from engine.explanation import gallery_baseline

    model, cfg, tokenizer, _ = load_for_inference(checkpoint, None, [], "cpu")
    model.eval()
    steps = int(cfg.eval.explain_steps)  # integrated gradients: points on the path, as the web page
    records = getattr(load_annotations("cuhkpedes", data_root), split)
    images = list(dict.fromkeys(r.image_path for r in records))[:limit or None]
    described = json.loads((data_root / PARTS_FILE).read_text())["images"]
    baseline = gallery_baseline(model, cfg, "cpu", images, limit=len(images))
    with torch.no_grad():
        captions = [r.caption for r in records]
        text_mean = torch.cat([F.normalize(model.encode_text(*tokenize(tokenizer, captions[i:i + 64],
                                                                       cfg.text.max_text_len, "cpu"), bmm=False)[1]
                                           .float(), dim=1) for i in range(0, len(captions), 64)]).mean(0)
    colours = sorted({w.split()[0] for d in described.values() for w in d.values()})  # the captions' colour words
    tally: dict[str, dict[str, list]] = {}
    for path in images:
        name = Path(path).relative_to(data_root / "imgs").as_posix()
        parts = np.asarray(Image.open(data_root / PARTS_DIR / f"{name}.png"))
        for part, words in described[name].items():
            code = PARTS.index(part)
            if not (parts == code).any():
                continue  # hidden in this picture (an occluder, the view)
            row = tally.setdefault(part, {"area": [], "colour_top1": [], "colour_source": [],
                                          "colour_source_chance": [], "colours": [len(colours)]})
            row["area"].append(float((parts == code).mean()))
            foils = [c for c in colours if c != words.split()[0]]
            told, picked, maps = _one_query(model, tokenizer, cfg, path, part, words, foils, (baseline, text_mean),
                                            steps)
            row["colour_top1"].append(told)
            elsewhere = {worn.split()[0] for other_part, worn in described[name].items() if other_part != part}
            row["colour_source"].append(colour_source(picked, words.split()[0], elsewhere))
            row["colour_source_chance"].append(colour_source_chance(words.split()[0], elsewhere, len(foils) + 1))
            for kind in ("contrastive", SERVED):  # how much of the picture the page draws strongly red
                for drawing, weights in drawn(maps[kind]).items():
                    row.setdefault(f"drawn|{kind}|{drawing}", []).append(weights)
            for kind, patch_map in maps.items():
                for rule, (hit, chance) in peak_hits(patch_map, parts, code).items():
                    row.setdefault(f"{rule}|{kind}", []).append(hit)
                    if kind == "plain":  # the same for every heatmap
                        row.setdefault(f"{rule}|chance", []).append(chance)
    return {part: _summary(row) for part, row in sorted(tally.items())}


def drawn(patch_map: torch.Tensor) -> dict[str, float]:
    """The share of patches drawn red at more than half the strongest red: as the page drew maps before
    (share / largest |share|) and now (utils.visualize.heat_weights, min-max among the raising regions)."""
    from utils.visualize import heat_weights

    before = patch_map / patch_map.abs().max().clamp(min=1e-12)
    now = heat_weights(patch_map)
    return {"before": float((before >= 0.5).float().mean()), "now": float((now >= 0.5).float().mean())}


def _one_query(model, tokenizer, cfg, path: str, part: str, words: str, foils: list[str], baselines: tuple,
               steps: int) -> tuple[bool, str, dict[str, torch.Tensor]]:
    """The one-attribute query of ``part`` (``words``, colour first) on the picture at ``path``: (does the model
    score it above the same query with each colour of ``foils``, so that it tells this part's colour at all;
    the colour it ranks first among the query's own and ``foils``; the heatmaps of _maps and the web page's,
    "served"). baselines: (the gallery's, mean caption direction)."""
    import torch.nn.functional as F

    from engine.encoding import tokenize
    from engine.explanation import explain_with, pixels_of

    pixels = pixels_of(cfg, [path], "cpu")

    rest = words.split()[1:]
    ids, mask = tokenize(tokenizer, [query_for(part, words)], cfg.text.max_text_len, "cpu")
    with torch.no_grad():
        others = tokenize(tokenizer, [query_for(part, " ".join([c] + rest)) for c in foils], cfg.text.max_text_len,
                          "cpu")
        foil_units = F.normalize(model.encode_text(*others, bmm=False)[1].float(), dim=1)  # [C, D]
        query_unit = F.normalize(model.encode_text(ids, mask, bmm=False)[1].float(), dim=1)[0]
        image_unit = F.normalize(model.encode_image(pixels, bmm=False)[1].float(), dim=1)[0]
    foil_scores = foil_units @ image_unit
    told = bool(float(query_unit @ image_unit) > float(foil_scores.max()))
    picked = words.split()[0] if told else foils[int(foil_scores.argmax())]
    baseline, text_mean = baselines
    maps = _maps(model, pixels, ids, mask, baseline, text_mean, steps)
    maps[SERVED] = explain_with(model, tokenizer, cfg, "cpu", query_for(part, words), path, baseline).patch_map
    return told, picked, maps


def colour_source_chance(own: str, elsewhere: set[str], candidates: int) -> dict[str, float]:
    """colour_source's rates for a colour drawn at random among ``candidates`` (the part's own and its foils)."""
    other = len(elsewhere - {own}) / candidates
    return {"own": 1 / candidates, "another part": other, "neither": 1 - 1 / candidates - other}


def colour_source(picked: str, own: str, elsewhere: set[str]) -> str:
    """Where the colour a model ranks first for a part comes from: "own" (the part's colour), "another part" (a
    colour another part of the same picture wears: the word read as a bag of the picture's colours, not bound to
    the part it names) or "neither"."""
    if picked == own:
        return "own"
    return "another part" if picked in elsewhere else "neither"


def _summary(row: dict[str, list]) -> dict:
    """One part's tallies -> queries, area share, how often the model ranks the query's colour first among the
    captions' colours for this part (and that rate's chance), and per rule its chance and each heatmap's hit rate."""
    out: dict = {"queries": len(row["area"]), "area_share": float(np.mean(row["area"])),
                 "colour_top1": float(np.mean(row["colour_top1"])), "colour_chance": 1 / row["colours"][0],
                 "colour_source": {source: row["colour_source"].count(source) / len(row["colour_source"])
                                   for source in COLOUR_SOURCES},
                 "colour_source_chance": {source: float(np.mean([c[source] for c in row["colour_source_chance"]]))
                                          for source in COLOUR_SOURCES}}
    for key, values in row.items():
        if key.startswith("drawn|"):
            _, kind, drawing = key.split("|")
            out.setdefault("red_above_half", {}).setdefault(kind, {})[drawing] = float(np.mean(values))
            continue
        if "|" not in key:
            continue
        rule, kind = key.split("|")
        chance = float(np.mean(row[f"{rule}|chance"]))
        entry = out.setdefault(rule, {"chance": chance, "hit_rate": {}, "over_chance": {}})
        if kind != "chance":
            rate = float(np.mean(values))
            entry["hit_rate"][kind] = rate
            entry["over_chance"][kind] = rate / max(chance, 1e-9)
    return out


def table(results: dict) -> str:
    """The results as a Markdown table: per part and rule, chance and each heatmap's hit rate (x chance)."""
    kinds = list(next(iter(results.values()))["centre"]["hit_rate"])
    lines = ["| part | queries | area share | colour told (chance) | rule | chance | " + " | ".join(kinds) + " |",
             "|---|---|---|---|---|---|" + "---|" * len(kinds)]
    for part, row in results.items():
        for rule in ("centre", "overlap"):
            entry = row[rule]
            rates = " | ".join(f"{100 * entry['hit_rate'][k]:.1f}% ({entry['over_chance'][k]:.1f}x)" for k in kinds)
            lines.append(f"| {part} | {row['queries']} | {100 * row['area_share']:.1f}% | "
                         f"{100 * row['colour_top1']:.1f}% ({100 * row['colour_chance']:.1f}%) | {rule} | "
                         f"{100 * entry['chance']:.1f}% | {rates} |")
    lines += ["", "| part | the colour ranked first (at random): the part's own | another part's of the same picture "
                  "| neither |", "|---|---|---|---|"]
    for part, row in results.items():
        rates = (f"{100 * row['colour_source'][s]:.1f}% ({100 * row['colour_source_chance'][s]:.1f}%)"
                 for s in COLOUR_SOURCES)
        lines.append(f"| {part} | " + " | ".join(rates) + " |")
    drawings = list(next(iter(results.values()))["red_above_half"])
    lines += ["", "| part | " + " | ".join(f"{k}: patches drawn above half red, before / now" for k in drawings) + " |",
              "|---|" + "---|" * len(drawings)]
    for part, row in results.items():
        shares = row["red_above_half"]
        lines.append(f"| {part} | " + " | ".join(f"{100 * shares[k]['before']:.1f}% / {100 * shares[k]['now']:.1f}%"
                                                 for k in drawings) + " |")
    return "\n".join(lines)


@user_errors_as_one_line()
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data-root", required=True, help="a classic synthetic CUHK-PEDES-format set (written "
                                                           "when missing: 400 identities, seed 0, the demo's)")
    parser.add_argument("--split", default="val", choices=("val", "test"))
    parser.add_argument("--limit", type=int, default=0, help="at most this many pictures (0: all)")
    parser.add_argument("--out", default=None, help="JSON file for the results")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    root = Path(args.data_root)
    if not (root / "SYNTHETIC.json").is_file():
        from datasets.synthetic import make_synthetic

        make_synthetic("cuhkpedes", root, num_ids=400, seed=0, style="classic")
    began = time.perf_counter()
    results = play(args.checkpoint, root, args.split, args.limit)
    from utils.environment import environment_record

    record = {"command": "python -m bench.bench_pointing " + " ".join(argv if argv is not None else sys.argv[1:]),
              "split": args.split, "results": results, "seconds": round(time.perf_counter() - began, 1),
              "threads": 1, "environment": environment_record("cpu"),
              "load_average": [round(x, 2) for x in __import__("os").getloadavg()]}
    print(table(results))
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    return record


if __name__ == "__main__":
    main()
