"""Which "no good match" rule flags queries about absent people without flagging right answers? Every rule tried.

    python -m bench.bench_no_match --checkpoint runs/demo/best.pth --data-root data/synthetic-cuhkpedes \
        --out bench/results/nomatch.json

For the val and test splits of a synthetic CUHK-PEDES-format set: each caption is a query whole, and each of its
short queries (what people type: every clause, or the first alone, as the checkpoint's
``eval.no_match_short_queries`` says) is a query about the same person. "Present": ranked against the split's
gallery; its best image is right or not. "Absent": every image of the query's person removed first. Each rule
(engine.calibration's statistics, the gap at several ranks, and with a fusion stack the ITM head's match log-odds
of the best image) is calibrated on val as evaluate.py calibrates its rule (``--quantile`` of the right best
answers, split evenly between a rule's statistics, read between short and whole captions by word count; with
``--quantile-on new_people``, evaluate.py's default, the quantile fitted is the one estimated to flag that share of
new people's right answers, from ``--held-out-splits`` half-splits of val's people, each rule for itself;
``fitted_people``: that share of val's own) and applied to val and test.

Measurement honesty: an "absent" query whose description fits another person of the gallery equally well is not a
query about nobody. The generator's identities are drawn again from SYNTHETIC.json (same seed, same people), the
attributes each caption names are read from its words (classic style only: its garment words are known here), and
an absent query counts as *about nobody* when no other person of the split shares every attribute it names
(exact match: garment type and colour, pattern, shoes, hair, bag, hat, glasses, umbrella, and the gender when a
gendered word is used). A caption naming nothing ("The person is walking") fits everyone.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Sequence

import torch

from utils.errors import user_errors_as_one_line

ROOT = Path(__file__).resolve().parents[1]
GAP_RANKS = (2, 4, 8, 16)
GENDER_WORDS = {"man": "man", "guy": "man", "he": "man", "his": "man",
                "woman": "woman", "lady": "woman", "she": "woman", "her": "woman"}
# At most this many words between a colour and the garment it colours ("a blue and red striped shirt").
COLOUR_REACH = 3


def _phrase_after(words: list[str], first: str, phrases: Sequence[str], reach: int) -> bool:
    """Whether ``first`` is followed, with at most ``reach`` words between, by one of ``phrases``."""
    wanted = [p.split() for p in phrases]
    for i, word in enumerate(words):
        if word != first:
            continue
        for j in range(i + 1, min(i + 2 + reach, len(words))):
            if any(words[j:j + len(p)] == p for p in wanted):
                return True
    return False


def named_attributes(caption: str, who) -> dict[str, object]:
    """The attributes of ``who`` (datasets.synthetic.identities.Identity) that a classic-style caption names,
    {field: value}; values compare equal between persons exactly when the caption fits both on that field."""
    from datasets.synthetic.captions import tokens
    from datasets.synthetic.classic import LOWER_WORDS, UPPER_WORDS

    words = tokens(caption)
    named: dict[str, object] = {}
    genders = {GENDER_WORDS[w] for w in words if w in GENDER_WORDS}
    if genders:
        named["gender"] = who.gender
    if _phrase_after(words, who.upper_colour, UPPER_WORDS[who.upper_type], COLOUR_REACH):
        named["upper"] = (who.upper_type, who.upper_colour)
    if {"striped", "stripes", "plaid", "checkered"} & set(words):
        named["pattern"] = who.pattern
    if who.lower_type and _phrase_after(words, who.lower_colour, (*LOWER_WORDS[who.lower_type], "jeans"),
                                        COLOUR_REACH):
        named["lower"] = (who.lower_type, who.lower_colour)
    if _phrase_after(words, who.shoes_colour, ("shoes", "sneakers", "trainers"), 0):
        named["shoes"] = who.shoes_colour
    if _phrase_after(words, who.hair_colour, ("hair",), 1):
        named["hair"] = (who.hair_length, who.hair_colour)
    bag_words = {"backpack": ("backpack",), "handbag": ("handbag", "purse"), "shoulder bag": ("shoulder bag", "bag")}
    if who.bag and _phrase_after(words, who.bag_colour, bag_words[who.bag], 0):
        named["bag"] = (who.bag, who.bag_colour)
    if who.hat_colour and _phrase_after(words, who.hat_colour, ("hat", "cap"), 0):
        named["hat"] = who.hat_colour
    if "glasses" in words:
        named["glasses"] = who.glasses
    if who.umbrella_colour and _phrase_after(words, who.umbrella_colour, ("umbrella",), 0):
        named["umbrella"] = who.umbrella_colour
    return named


def attribute_values(who) -> dict[str, object]:
    """Every field of ``who`` in the form named_attributes gives it."""
    return {"gender": who.gender, "upper": (who.upper_type, who.upper_colour), "pattern": who.pattern,
            "lower": (who.lower_type, who.lower_colour) if who.lower_type else None, "shoes": who.shoes_colour,
            "hair": (who.hair_length, who.hair_colour), "bag": (who.bag, who.bag_colour) if who.bag else None,
            "hat": who.hat_colour, "glasses": who.glasses, "umbrella": who.umbrella_colour}


def about_nobody(captions: Sequence[str], query_pids: Sequence[int], gallery_pids: Sequence[int],
                 people: dict) -> torch.Tensor:
    """[Q] bool: no other person of the gallery shares every attribute the caption names about its own person.
    people: raw id -> Identity."""
    others = sorted(set(int(p) for p in gallery_pids))
    values = {p: attribute_values(people[p]) for p in others}
    out = []
    for caption, pid in zip(captions, query_pids):
        named = named_attributes(caption, people[int(pid)])
        out.append(not any(all(values[p][f] == v for f, v in named.items()) for p in others if p != int(pid)))
    return torch.tensor(out)


def synthetic_people(data_root: Path) -> dict | None:
    """raw id -> Identity of a classic-style synthetic set (drawn again from its SYNTHETIC.json), else None."""
    from datasets.synthetic.identities import sample_identities

    marker = json.loads((data_root / "SYNTHETIC.json").read_text()) if (data_root / "SYNTHETIC.json").exists() else None
    if not marker or marker.get("style", "classic") != "classic":
        return None
    return {raw: who for _, raw, who in sample_identities(marker["format"], marker["num_ids"], marker["seed"])}


def gap(scores: torch.Tensor, keep: torch.Tensor | None, rank: int) -> torch.Tensor:
    """[Q]: the best kept score minus the ``rank``-th best (1-based; the lowest kept one when fewer are kept).
    scores, keep: [Q, G]. A rank past the few pictures one person has: when the described person is there, their
    pictures might lead the rest by a margin."""
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    top = scores.topk(min(rank, scores.shape[1]), dim=1).values
    count = torch.isfinite(top).sum(dim=1).clamp(min=1)
    return top[:, 0] - top.gather(1, (count - 1)[:, None])[:, 0]


_CLAUSE_SPLIT = re.compile(r"[,.;:!?]|\band\b|\bwith\b")


def clauses(text: str, min_words: int = 2) -> list[str]:
    """The parts of a description, each of which the right person must fit: split at punctuation and at "and" /
    "with", parts of fewer than ``min_words`` words dropped; the whole text when nothing is left."""
    parts = [p.strip() for p in _CLAUSE_SPLIT.split(text)]
    kept = [p for p in parts if len(p.split()) >= min_words]
    return kept or [text.strip() or text]


def measure(texts: list[str], text_feats: torch.Tensor, image_feats: torch.Tensor, query_pids: torch.Tensor,
            gallery_pids: torch.Tensor, itm=None, encode=None) -> dict[str, torch.Tensor]:
    """engine.calibration.no_match_measure's dict (right, has_positive and the product's statistics, present_<name>
    and absent_<name>) with every other statistic tried (the gaps; itm(texts, best gallery index [Q]) -> [Q] adds
    the ITM head's log-odds, encode the clause statistics), the words of each query and its unit text feature."""
    from engine.calibration import no_match_measure, word_count

    out = no_match_measure(text_feats, image_feats, query_pids, gallery_pids, chunk_size=max(1, len(texts)))
    q = torch.nn.functional.normalize(text_feats.float(), dim=1)
    g = torch.nn.functional.normalize(image_feats.float(), dim=1)
    scores = q @ g.t()  # [Q, G]
    same = gallery_pids[None, :] == query_pids[:, None]
    out.update({"text_feats": q, "words": torch.tensor([word_count(t) for t in texts]), "pids": query_pids.cpu()})
    for where, keep in (("present", None), ("absent", ~same)):
        out.update({f"{where}_gap@{k}": gap(scores, keep, k) for k in GAP_RANKS})
        best = (scores if keep is None else scores.masked_fill(~keep, float("-inf"))).argmax(dim=1)
        if itm is not None:
            out[f"{where}_itm"] = itm(texts, best)
        if encode is not None:
            out.update({f"{where}_{k}": v for k, v in clause_statistics(texts, encode, g, best, keep).items()})
    return out


def clause_statistics(texts, encode, g, best, keep) -> dict[str, torch.Tensor]:
    """Per query, over its clauses (see clauses): clause_min, the lowest cosine of a clause with
    the best image; clause_lag, minus the most a clause's cosine with the best image falls short of that
    clause's best cosine over the kept gallery."""
    parts = [clauses(t) for t in texts]
    flat = [c for cs in parts for c in cs]
    feats = torch.nn.functional.normalize(encode(flat).float(), dim=1)
    owner = torch.tensor([i for i, cs in enumerate(parts) for _ in cs])
    scores = feats @ g.t()  # [C, G]
    if keep is not None:
        scores = scores.masked_fill(~keep[owner], float("-inf"))
    on_best = scores.gather(1, best[owner][:, None])[:, 0]
    lag = scores.amax(dim=1) - on_best
    n = len(texts)
    low = torch.full((n,), float("inf")).scatter_reduce(0, owner, on_best, "amin")
    worst = torch.full((n,), float("-inf")).scatter_reduce(0, owner, lag, "amax")
    return {"clause_min": low, "clause_lag": -worst}


def rules_tried(singles: Sequence[str]) -> list[tuple[str, ...]]:
    """Every statistic alone, and every pair of them but two gaps."""
    pairs = [(a, b) for i, a in enumerate(singles) for b in singles[i + 1:]
             if not (a.startswith("gap") and b.startswith("gap"))]
    return [(s,) for s in singles] + pairs


def rates_of(measured: dict, thresholds: dict, nobody: torch.Tensor | None) -> dict:
    """no_match_rates, and the absent rate over the queries about nobody and over those fitting someone."""
    from engine.calibration import no_match_rates

    out = no_match_rates(measured, thresholds)
    if nobody is not None:
        for name, subset in (("about_nobody", nobody), ("fits_someone", ~nobody)):
            part = no_match_rates({**measured, "has_positive": measured["has_positive"] & subset}, thresholds)
            out[f"absent_not_flagged_{name}"] = part.get("absent_not_flagged")
            out[f"absent_queries_{name}"] = part["absent_queries"]
    return out


def encode_split(model, cfg, tokenizer, records, people, batch_size: int) -> dict[str, dict]:
    """{"short": measured, "full": measured} of one split (measured also holds "about_nobody")."""
    from engine.calibration import short_queries
    from engine.encoding import encode_images, encode_texts, rerank_scores
    from engine.evaluation import build_eval_protocol, query_token_limit
    from datasets.transforms import build_test_transform

    sets = build_eval_protocol(records, "standard", cfg.data.format)
    transform = build_test_transform(cfg.input)
    limit = query_token_limit(cfg, "standard")
    image_feats = encode_images(model, sets.image_paths, transform, batch_size, "cpu", False, 0)

    def itm_log_odds(texts: list[str], best: torch.Tensor) -> torch.Tensor:
        return rerank_scores(model, tokenizer, texts, sets.image_paths, best[:, None], transform, limit, batch_size,
                             "cpu", False, 0, score="margin")[:, 0]

    itm = itm_log_odds if getattr(model, "has_fusion", False) else None
    out = {}
    shorts, owner = short_queries(sets.texts, str(cfg.eval.get("no_match_short_queries", "clauses")))
    for kind, texts, pids in (("short", shorts, sets.query_pids[owner]), ("full", list(sets.texts), sets.query_pids)):
        feats = encode_texts(model, tokenizer, texts, limit, batch_size, "cpu", False)
        out[kind] = measure(texts, feats, image_feats, pids, sets.gallery_pids, itm,
                            lambda t: encode_texts(model, tokenizer, t, limit, batch_size, "cpu", False))
        out[kind]["about_nobody"] = (None if people is None else
                                     about_nobody(texts, pids.tolist(), sets.gallery_pids.tolist(), people))
        out[kind]["fields_named"] = None if people is None else dict(sorted(Counter(
            f for t, pid in zip(texts, pids.tolist()) for f in named_attributes(t, people[pid])).items()))
    return out


RIDGE = 1.0  # the ridge penalty of the expected right score's regression (unit-length text features)


def add_expected_score(measured: dict[str, dict]) -> None:
    """Adds statistic "residual": the best cosine minus the score a right answer to this very query is expected to
    reach, a ridge regression on the query's own text feature (and a constant) fitted to val's right best answers,
    short and whole captions together (what the word-count rule does with one number)."""
    val = [measured["val"][kind] for kind in ("short", "full")]
    x = torch.cat([torch.nn.functional.pad(m["text_feats"][m["right"]], (0, 1), value=1.0) for m in val])
    y = torch.cat([m["present_cosine"][m["right"]] for m in val])
    weights = torch.linalg.solve(x.t() @ x + RIDGE * torch.eye(x.shape[1]), x.t() @ y)
    for both in measured.values():
        for m in both.values():
            expected = torch.nn.functional.pad(m["text_feats"], (0, 1), value=1.0) @ weights
            m["present_residual"], m["absent_residual"] = m["present_cosine"] - expected, m["absent_cosine"] - expected


def add_linear_combination(measured: dict[str, dict], names: Sequence[str]) -> None:
    """Adds statistic "lda" to every measured dict: Fisher's linear discriminant of ``names`` between val's right
    best answers (present) and val's absent queries (about nobody when known), fitted on val for short and whole
    captions apart. A ceiling on what any linear rule of these statistics can do, not a carried rule."""
    for kind in ("short", "full"):
        val = measured["val"][kind]
        nobody = val["about_nobody"] if val["about_nobody"] is not None else torch.ones_like(val["right"])

        def features(m: dict, where: str) -> torch.Tensor:
            return torch.stack([m[f"{where}_{n}"].float() for n in names], dim=1)  # [Q, S]

        right, absent = features(val, "present")[val["right"]], features(val, "absent")[val["has_positive"] & nobody]
        centre, scale = right.mean(dim=0), right.std(dim=0).clamp(min=1e-6)
        right, absent = (right - centre) / scale, (absent - centre) / scale
        within = torch.cov(right.t()) + torch.cov(absent.t()) + 1e-3 * torch.eye(len(names))
        weights = torch.linalg.solve(within, right.mean(dim=0) - absent.mean(dim=0))
        for split in measured:
            m = measured[split][kind]
            for where in ("present", "absent"):
                m[f"{where}_lda"] = ((features(m, where) - centre) / scale) @ weights


def separability(m: dict, name: str) -> float | None:
    """Percent: the chance that a right best answer's statistic exceeds an absent query's (about nobody when
    known; ties count half), the area under the ROC curve of telling them apart; 50 is chance."""
    nobody = m["about_nobody"] if m["about_nobody"] is not None else torch.ones_like(m["right"])
    right, absent = m[f"present_{name}"][m["right"]], m[f"absent_{name}"][m["has_positive"] & nobody]
    if not (right.numel() and absent.numel()):
        return None
    diff = right[:, None] - absent[None, :]
    return 100.0 * float(((diff > 0).float() + 0.5 * (diff == 0).float()).mean())


def flagged_at(m: dict, name: str, limit: float) -> float | None:
    """Percent of the absent queries about nobody (all when unknown) that the statistic flags at the threshold
    flagging ``limit`` % of this very set's right best answers: the most any threshold of it can do at that limit
    (an oracle's threshold, set on the data it is measured on)."""
    nobody = m["about_nobody"] if m["about_nobody"] is not None else torch.ones_like(m["right"])
    right, absent = m[f"present_{name}"][m["right"]], m[f"absent_{name}"][m["has_positive"] & nobody]
    if not (right.numel() and absent.numel()):
        return None
    threshold = torch.quantile(right.float(), limit / 100.0)
    return 100.0 * float((absent < threshold).float().mean())


def per_query(measured: dict) -> dict[str, torch.Tensor]:
    """The per-query tensors [Q] of a measured dict: what people_halves splits by person."""
    return {key: value for key, value in measured.items() if isinstance(value, torch.Tensor) and value.dim() == 1}


def compare(measured: dict[str, dict], quantile: float, limit: float, knots: Sequence[float],
            quantile_on: str = "new_people", splits: int = 100) -> dict:
    """Every rule calibrated on val (``quantile``, for new people or val's own: see the module's docstring;
    ``knots``: the model's eval.no_match_knots) and applied to val and test; each statistic's separability and what
    it could do at best (best_at_limit); the chosen statistic (see chosen_by)."""
    from engine.calibration import no_match_thresholds, people_halves, quantile_for_new_people

    singles = [k.removeprefix("present_") for k in measured["val"]["short"] if k.startswith("present_")]
    singles.sort(key=lambda name: name != "cosine")  # the served rule first, as the tables name its pairs
    add_expected_score(measured)
    singles.append("residual")
    add_linear_combination(measured, singles)
    val = [per_query(measured["val"][kind]) for kind in ("short", "full")]
    halves = people_halves(*val, splits) if quantile_on == "new_people" else []  # drawn once, for every rule
    table = {}
    for rule in rules_tried(singles) + [("lda",)]:
        fitted = quantile_for_new_people(halves, quantile, "", knots, statistics=rule) if halves else quantile
        thresholds = no_match_thresholds(*val, fitted, "", knots, statistics=rule)
        table["+".join(rule)] = {"fitted_quantile": fitted, "thresholds": thresholds, **{
            split: {kind: rates_of(m, thresholds, m["about_nobody"]) for kind, m in both.items()}
            for split, both in measured.items()}}

    auc = {name: {split: {kind: separability(m, name) for kind, m in both.items()}
                  for split, both in measured.items()} for name in [*singles, "lda"]}
    best = {name: {split: {kind: flagged_at(m, name, limit) for kind, m in both.items()}
                   for split, both in measured.items()} for name in [*singles, "lda"]}

    # Chosen by separability, not by the error rates at the calibrated thresholds: a rule that flags more absent
    # queries by flagging more right answers has moved along the same curve, not improved it.
    mean_auc = {name: 0.5 * (row["val"]["short"] + row["val"]["full"]) for name, row in auc.items()
                if name != "lda" and None not in row["val"].values()}
    chosen = max(mean_auc, key=mean_auc.get) if mean_auc else None
    return {"rules": table, "quantile_on": quantile_on if halves else "fitted_people",
            "held_out_splits": len(halves), "auc": auc, "best_at_limit": best, "limit": limit, "chosen": chosen,
            "chosen_by": "val only: the statistic that best tells val's right best answers from val's absent queries "
                         "about nobody (area under the ROC curve, mean of short and whole captions); lda excluded "
                         "(fitted on those very queries)"}


def markdown(result: dict) -> str:
    """The table of every rule: val and test, short and whole, both error rates."""
    head = ("| rule | split | right flagged short / whole | absent not flagged short / whole | "
            "about nobody: not flagged short / whole | fits someone: not flagged short / whole |")
    lines = [head, "|---|---|---|---|---|---|"]

    def pair(row: dict, key: str) -> str:
        values = [row[k].get(key) for k in ("short", "full")]
        return " / ".join("-" if v is None else f"{v:.1f}%" for v in values)

    auc = ["", f"| statistic | AUC val short / whole | AUC test short / whole | about nobody flagged at {result['limit']:g}% "
           "right flagged, val short / whole | the same, test |", "|---|---|---|---|---|"]

    def cells(row: dict) -> list[str]:
        return [" / ".join(f"{row[s][k]:.1f}" if row[s][k] is not None else "-" for k in ("short", "full"))
                for s in ("val", "test")]

    for name, row in result["auc"].items():
        auc.append(f"| {name} | " + " | ".join(cells(row) + cells(result["best_at_limit"][name])) + " |")
    for rule, row in result["rules"].items():
        mark = " **(chosen)**" if rule == result["chosen"] else ""  # a single statistic's rule
        mark += f" (q {row['fitted_quantile']:.3f})"
        for split in ("val", "test"):
            r = row[split]
            lines.append(f"| {rule}{mark} | {split} | {pair(r, 'right_top1_flagged')} | {pair(r, 'absent_not_flagged')} "
                         f"| {pair(r, 'absent_not_flagged_about_nobody')} | {pair(r, 'absent_not_flagged_fits_someone')} |")
    return "\n".join(lines + auc)


def add_checkpoint_arguments(parser: argparse.ArgumentParser) -> None:
    """--checkpoint, --data-root, --batch-size and --root-key: what the synthetic-set benches load."""
    parser.add_argument("--checkpoint", required=True, help="a checkpoint or model folder")
    parser.add_argument("--data-root", required=True, type=Path, help="the synthetic set it was trained on")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--root-key", default="data.root", choices=("data.root", "data.eval_root"),
                        help="the config key --data-root sets (data.eval_root for a pretraining checkpoint)")


def load_checkpoint(args: argparse.Namespace) -> tuple:
    """(model, resolved config, tokenizer, evaluation splits) of ``args.checkpoint`` on ``args.data_root``, CPU."""
    from engine.checkpoints import load_for_inference
    from engine.data import load_eval_splits

    model, cfg, tokenizer, _ = load_for_inference(args.checkpoint, None, [f"{args.root_key}={args.data_root}"], "cpu")
    return model, cfg, tokenizer, load_eval_splits(cfg)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_checkpoint_arguments(parser)
    parser.add_argument("--quantile", type=float, default=0.08, help="the share of right answers a rule flags")
    parser.add_argument("--quantile-on", choices=("new_people", "fitted_people"), default="new_people",
                        help="the share --quantile is of: new people's right answers (evaluate.py's default) or val's")
    parser.add_argument("--held-out-splits", type=int, default=100,
                        help="half-splits of val's people that estimate the rate on new people (each of the "
                             "40-50 rules searched apart: about 3 minutes a model on a demo's val, one thread)")
    parser.add_argument("--limit", type=float, default=10.0, help="at most this %% of right answers flagged")
    parser.add_argument("--out", default=None, help="the JSON record (a .md table beside it)")
    args = parser.parse_args(argv)
    from bench.base import machine_record, report

    if args.out:  # before the minutes of measuring, not after
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    began = time.time()
    with user_errors_as_one_line():
        model, cfg, tokenizer, splits = load_checkpoint(args)
    people = synthetic_people(args.data_root)
    with torch.inference_mode():
        measured = {split: encode_split(model, cfg, tokenizer, splits.split(split), people, args.batch_size)
                    for split in ("val", "test")}
    result = compare(measured, args.quantile, args.limit, cfg.eval.no_match_knots, args.quantile_on,
                     args.held_out_splits)
    counts = {split: {kind: {"queries": int(m["right"].numel()), "right": int(m["right"].sum()),
                             "absent": int(m["has_positive"].sum()),
                             "about_nobody": None if m["about_nobody"] is None else
                             int((m["about_nobody"] & m["has_positive"]).sum()), "fields_named": m["fields_named"]}
                      for kind, m in both.items()} for split, both in measured.items()}
    payload = {"bench": "no_match", "command": " ".join(["python -m bench.bench_no_match", *(argv or sys.argv[1:])]),
               "checkpoint": args.checkpoint, "quantile": args.quantile, "attributes_known": people is not None,
               "counts": counts, **result, "seconds": round(time.time() - began, 1), "machine": machine_record("cpu")}
    if args.out:
        Path(args.out).with_suffix(".md").write_text(markdown(result) + "\n")
    return report(payload, args.out)


if __name__ == "__main__":
    main()
