"""What a ranking can be trusted with, measured on a split and carried with the model.

- "No good match": a query's best image is flagged when it does not stand out from the rest of the gallery.
  Statistic ``cosine``: the best cosine itself; ``zscore``: the best score's distance from the mean of the
  query's scores over the gallery, in standard deviations (whether the best image stands out). Rule ``cosine``
  (``eval.no_match_rule``) tests the first, ``zscore`` the second, ``both`` flags when either is low. A threshold
  flags a share of the split's queries whose best image is the right person (``eval.no_match_quantile``, shared
  evenly by the rule's statistics), measured twice: on what people type (every clause of each caption, "a man
  in a green shirt", each a query about its caption's person; ``eval.no_match_short_queries``) and on the whole
  annotator's captions; a query's threshold is read between the two by its number of words, since scores grow
  with the length of a description (flat over most of each set, rising where the two meet), and the two ends are
  fitted so that, read that way, each set is flagged at that share (fit_ends).
  Both error rates are measured: right best answers flagged, and queries about a person removed from the gallery
  (every image of their id taken out) not flagged. How far they can move on new people: the rule refitted on half
  of the split's people and read on the other half, many times (people_halves, held_out_rates).
- Re-ranking that never loses: the top k ordered by ``cosine + w * ITM`` (the ITM match logit rescaled to the
  cosine's spread within each query's top k), ``w`` chosen on the split from a grid that contains 0 (the cosine
  order itself), so on that split the blend is never below cosine ranking; a weight above 0 only where the
  queries it ranks better outnumber those it ranks worse beyond chance (a sign test), so that a split's noise
  is not carried to the next one as a gain.
- What the ITM head is worth where it acts: over each query's top k, the share of (right image, wrong image)
  pairs that the ITM score orders correctly, beside the share the cosine orders correctly.

The chosen threshold and weight travel in checkpoints (``calibration``) and model folders (config.json).
"""
from __future__ import annotations

import math
import re
from typing import Any, Callable, Iterator, Sequence

import torch

from utils.metrics import apply_rerank, retrieval_metrics, selection_value

# What a checkpoint and a model folder carry of a calibration, and a later evaluation applies.
CARRIED_KEYS = ("rule", "thresholds", "quantile", "fitted_quantile", "calibrated_on", "held_out")
HELD_OUT_PERCENTILES = (0.1, 0.5, 0.9)
STATISTICS = ("zscore", "cosine")
NO_MATCH_RULES = ("both", *STATISTICS)
# A clause ends at punctuation or where a caption goes on with a new sentence part ("... shirt, and red shorts").
_CLAUSE_END = re.compile(r"[,.;:!?]")


_STRIPPED = ",.;:!? "


def _parts(text: str, min_words: int) -> Iterator[tuple[int, int]]:
    """(start, end) in ``text`` of each part cut at punctuation, a part run on to the next mark while it has fewer
    than ``min_words`` words ("A man." is no description); then the rest after the last part, if any, as
    (start, -1)."""
    start = 0
    for match in _CLAUSE_END.finditer(text):
        if len(text[start: match.start()].split()) >= min_words:
            yield start, match.start()
            start = match.end()
    yield start, -1


def clauses_of(caption: str, min_words: int = 3) -> list[str]:
    """The caption cut into parts (_parts; a short tail joins the part before it): the short queries a person would
    type, one per thing the caption says. A caption that opens with the scene ("In this picture, a man ...") has
    its description in a later part, which is why every part is a short query and not the first alone."""
    text = caption.strip()
    spans = [[a, b] for a, b in _parts(text, min_words)]
    start = spans.pop()[0]
    tail = text[start:].rstrip(_STRIPPED)
    if tail.strip():
        if spans and len(tail.split()) < min_words:
            spans[-1][1] = start + len(tail)
        else:
            spans.append([start, start + len(tail)])
    return [text[a:b].strip() for a, b in spans] or [text.rstrip(_STRIPPED)]


def first_clause(caption: str, min_words: int = 3) -> str:
    """The caption's first part (_parts), or the whole of it without closing punctuation when no part has
    ``min_words`` words: the short query a person would type, if captions open with the person."""
    text = caption.strip()
    _, end = next(_parts(text, min_words))
    return text[:end].strip() if end >= 0 else text.rstrip(_STRIPPED)


SHORT_QUERIES = {"clauses": "every clause of each caption", "first_clause": "the first clause of each caption"}


def short_queries(captions: Sequence[str], how: str) -> tuple[list[str], torch.Tensor]:
    """The short queries measured for ``captions`` (``eval.no_match_short_queries``: clauses, every part of each
    caption, see clauses_of; first_clause, the first part only) and the caption index each comes from [n]."""
    if how not in SHORT_QUERIES:
        raise ValueError(f"eval.no_match_short_queries must be one of {tuple(SHORT_QUERIES)}, got {how!r}")
    parts = [clauses_of(c) if how == "clauses" else [first_clause(c)] for c in captions]
    owner = torch.tensor([i for i, cs in enumerate(parts) for _ in cs], dtype=torch.long)
    return [c for cs in parts for c in cs], owner


def match_statistic(scores: torch.Tensor, keep: torch.Tensor | None = None, rule: str = "zscore") -> torch.Tensor:
    """The "how clearly does the best image stand out" statistic [q] of scores [q, G] (cosines).

    keep: [q, G] bool, the gallery entries each query is ranked against (None: all). zscore: (best - mean) / std
    over the kept entries (std with Bessel's correction; 0 when fewer than two entries are kept); cosine: the
    best kept score.
    """
    if rule not in STATISTICS:
        raise ValueError(f"rule must be one of {STATISTICS}, got {rule!r}")
    scores = scores.float()
    if keep is None:
        keep = torch.ones_like(scores, dtype=torch.bool)
    best = scores.masked_fill(~keep, float("-inf")).amax(dim=1)
    if rule == "cosine":
        return best
    count = keep.sum(dim=1).clamp(min=1)
    mean = scores.masked_fill(~keep, 0.0).sum(dim=1) / count
    var = ((scores - mean[:, None]) ** 2).masked_fill(~keep, 0.0).sum(dim=1) / (count - 1).clamp(min=1)
    std = var.sqrt()
    return torch.where(std > 0, (best - mean) / std.clamp(min=1e-12), torch.zeros_like(best))


def no_match_measure(text_feats: torch.Tensor, image_feats: torch.Tensor, query_pids: torch.Tensor,
                     gallery_pids: torch.Tensor, chunk_size: int) -> dict[str, torch.Tensor]:
    """Per query: each statistic (STATISTICS) over the whole gallery ("present_<name>"), whether the best image
    is the right person ("right"), each statistic with every image of the query's person removed
    ("absent_<name>") and whether the gallery held that person beside others ("has_positive").
    text_feats [Q, D], image_feats [G, D], pids [Q] / [G]; every tensor returned is [Q], on the CPU."""
    g = torch.nn.functional.normalize(image_feats.float(), dim=1)
    gallery_pids = gallery_pids.to(g.device)
    parts: dict[str, list[torch.Tensor]] = {}
    for start in range(0, text_feats.shape[0], chunk_size):
        q = torch.nn.functional.normalize(text_feats[start:start + chunk_size].float().to(g.device), dim=1)
        scores = q @ g.t()  # [q, G]
        same = gallery_pids[None, :] == query_pids[start:start + chunk_size].to(g.device)[:, None]
        found = {"right": same.gather(1, scores.argmax(dim=1, keepdim=True))[:, 0],
                 "has_positive": same.any(dim=1) & (~same).any(dim=1)}
        for name in STATISTICS:
            found[f"present_{name}"] = match_statistic(scores, None, name)
            found[f"absent_{name}"] = match_statistic(scores, ~same, name)
        for key, value in found.items():
            parts.setdefault(key, []).append(value)
    return {k: torch.cat(v).cpu() for k, v in parts.items()}


def rule_statistics(rule: str) -> tuple[str, ...]:
    """The statistics a rule tests: "both" flags a query when either is below its threshold."""
    if rule not in NO_MATCH_RULES:
        raise ValueError(f"the no-match rule must be one of {NO_MATCH_RULES}, got {rule!r}")
    return STATISTICS if rule == "both" else (rule,)


def word_count(text: str) -> int:
    """The words of a query, as the thresholds count them."""
    return len(text.split())


def threshold_at(entry: dict, words: torch.Tensor) -> torch.Tensor:
    """A threshold [Q] per query from its word count [Q]: linear between the (words, value) points measured on
    short queries and on whole captions, constant beyond them (scores grow with the length of a description)."""
    (w0, w1), (v0, v1) = entry["words"], entry["values"]
    if w1 <= w0:
        return torch.full(words.shape, float(v0))
    t = ((words.float() - w0) / (w1 - w0)).clamp(0.0, 1.0)
    return v0 + t * (v1 - v0)


def no_match_thresholds(short: dict[str, torch.Tensor], full: dict[str, torch.Tensor], quantile: float,
                        rule: str, knots: Sequence[float], statistics: Sequence[str] | None = None
                        ) -> dict[str, dict] | None:
    """Each statistic's threshold: at ``quantile`` split evenly between the rule's statistics (so that at most
    about ``quantile`` of the right answers are flagged), two ends (see threshold_at) at the word counts where
    the two sets meet: the ``knots[0]`` quantile of the short queries' word counts and the ``knots[1]`` quantile
    of the whole captions' (``eval.no_match_knots``; the medians where those cross), fitted so that, read per
    query, the threshold flags that share of each set's right best answers (fit_ends). Between the ends the
    threshold rises with the length; outside them it is flat, so most of each set reads its own end. None without
    a right answer in either set. ``statistics``: any measured ones instead of the rule's (bench_no_match)."""
    if not (bool(short["right"].any()) and bool(full["right"].any())):
        return None
    names = tuple(statistics) if statistics else rule_statistics(rule)
    share = quantile / len(names)
    words = [float(torch.quantile(short["words"].float(), float(knots[0]))),
             float(torch.quantile(full["words"].float(), float(knots[1])))]
    if words[1] <= words[0]:  # the sets overlap that far in length: the medians
        words = [float(short["words"].float().median()), float(full["words"].float().median())]
    return {name: fit_ends(words, [(m[f"present_{name}"][m["right"]].float(), m["words"][m["right"]])
                                   for m in (short, full)], share)
            for name in names}


def fit_ends(words: list[float], sets: list[tuple[torch.Tensor, torch.Tensor]], share: float,
             rounds: int = 100) -> dict:
    """A threshold entry (threshold_at) with its ends at ``words`` whose values flag ``share`` of each set's right
    answers as read per query. sets: (statistic [n], word counts [n]) of the short queries' and of the whole
    captions' right answers. Each end starts at its set's ``share`` quantile, which is exact only where every
    query of the set reads that end: a short query longer than the end reads a threshold raised towards the whole
    captions', so the set would be flagged more often than ``share``. Each end is then moved in turn by the
    ``share`` quantile of its set's statistic minus the threshold read for each of its queries, until neither
    moves (the ends interact only through the queries between them). No end goes below its set's lowest right
    answer: where the line cannot fit both sets (their lengths overlap, their scores differ), an end under all of
    them would only say "never flag" while the rest of its set carried every flag; held there, that set is
    flagged more often than ``share`` instead."""
    entry = {"words": list(words), "values": [float(torch.quantile(stat, share)) for stat, _ in sets]}
    if words[1] <= words[0]:  # one constant threshold (threshold_at): nothing to fit between two ends
        return entry
    floors = [float(stat.min()) for stat, _ in sets]
    for _ in range(rounds):
        moved = 0.0
        for end, (stat, count) in enumerate(sets):
            step = float(torch.quantile(stat - threshold_at(entry, count), share))
            value = max(entry["values"][end] + step, floors[end])
            moved = max(moved, abs(value - entry["values"][end]))
            entry["values"][end] = value
        if moved < 1e-7:
            break
    return entry


def flagged(measured: dict[str, torch.Tensor], thresholds: dict[str, dict], where: str) -> torch.Tensor:
    """[Q] bool: the queries a rule flags, from the statistics measured ``where`` ("present" or "absent")."""
    out = torch.zeros_like(measured["right"])
    for name, entry in thresholds.items():
        out |= measured[f"{where}_{name}"] < threshold_at(entry, measured["words"])
    return out


def no_match_rates(measured: dict[str, torch.Tensor], thresholds: dict[str, dict] | None) -> dict[str, Any]:
    """Both error rates of ``thresholds`` (percent): right best answers flagged; absent persons not flagged."""
    right, absent = measured["right"], measured["has_positive"]
    counts = {"queries_answered_right": int(right.sum()), "absent_queries": int(absent.sum())}
    if not thresholds:
        return counts
    return {"right_top1_flagged": 100.0 * float(flagged(measured, thresholds, "present")[right].float().mean())
            if right.any() else None,
            "absent_not_flagged": 100.0 * float((~flagged(measured, thresholds, "absent"))[absent].float().mean())
            if absent.any() else None, **counts}


def _people_subset(measured: dict[str, torch.Tensor], people: torch.Tensor) -> dict[str, torch.Tensor]:
    keep = torch.isin(measured["pids"], people)
    return {key: value[keep] for key, value in measured.items()}


def people_halves(short: dict[str, torch.Tensor], full: dict[str, torch.Tensor], splits: int,
                  seed: int = 0) -> list[tuple[dict, dict, dict, dict]]:
    """``splits`` random halves of the split's people: per split (short, full) of the fitted half, then of the
    held-out half. short, full: no_match_measure records with "words" and "pids" [n] (each query's person). Drawn
    by a generator seeded with ``seed`` (the same halves on every run); none with fewer than two people."""
    people = torch.unique(full["pids"])
    if people.numel() < 2:
        return []
    generator = torch.Generator().manual_seed(seed)
    halves = []
    for _ in range(splits):
        order = people[torch.randperm(people.numel(), generator=generator)]
        fitted, held = order[:people.numel() // 2], order[people.numel() // 2:]
        halves.append((_people_subset(short, fitted), _people_subset(full, fitted), _people_subset(short, held),
                       _people_subset(full, held)))
    return halves


def held_out_rates(halves: list[tuple[dict, dict, dict, dict]], quantile: float, rule: str,
                   knots: Sequence[float], statistics: Sequence[str] | None = None) -> list[dict[str, dict]]:
    """The rule refitted on each split's fitted half of the people (people_halves) and read on its held-out half;
    ``statistics``: any measured ones instead of the rule's (no_match_thresholds).

    A split whose fitted half has no right answer in one of the sets is left out (no threshold to read). Returns per
    split kept {"short_queries": rates, "full_captions": rates} (no_match_rates) of the held-out half: how far the
    rates can move on people the threshold was not fitted on, at this split's size, since right answers come in
    clusters of one person's.
    """
    out = []
    for fitted_short, fitted_full, held_short, held_full in halves:
        thresholds = no_match_thresholds(fitted_short, fitted_full, quantile, rule, knots, statistics)
        if thresholds is not None:
            out.append({"short_queries": no_match_rates(held_short, thresholds),
                        "full_captions": no_match_rates(held_full, thresholds)})
    return out


def quantile_for_new_people(halves: list[tuple[dict, dict, dict, dict]], share: float, rule: str,
                            knots: Sequence[float], steps: int = 7, statistics: Sequence[str] | None = None
                            ) -> float:
    """The quantile to fit on the whole split so that, on average, ``share`` of the right best answers of people it
    was not fitted on are flagged, in each set (short queries, whole captions) at most; halves: people_halves.

    Fitted at quantile q on a few people, a threshold flags q of their right answers but more of anyone else's
    (held_out_rates: fitted on 30 of a demo val's people, a median of 8.2-15.3% of the others' right short
    answers where q is 8%): the fit sits in the low tail of the people it saw. The excess shrinks as more people are
    fitted, about as one over their number, so for the whole split it is taken as half the halves': the rate on
    new people at q is estimated as (q + the halves' mean held-out rate) / 2, and q found by bisection in
    [0, share] (``steps`` halvings) where the larger of the two sets' estimates meets ``share``. On a split of many
    people the excess vanishes and q tends to ``share``; 0 (the lowest right answer) where even that is estimated
    to flag more than ``share`` of new people's, as for a model that has barely learned. ``statistics``: any
    measured ones instead of the rule's (no_match_thresholds).
    """
    def estimate(quantile: float) -> float:
        rates = held_out_rates(halves, quantile, rule, knots, statistics)
        means = [sum(v) / len(v) for v in ([r[kind]["right_top1_flagged"] for r in rates
                                             if r[kind].get("right_top1_flagged") is not None]
                                            for kind in ("short_queries", "full_captions")) if v]
        return max(((100.0 * quantile + m) / 2 for m in means), default=100.0 * quantile)

    low, high = 0.0, share
    if estimate(high) <= 100.0 * share:
        return share
    for _ in range(steps):
        middle = (low + high) / 2
        if estimate(middle) > 100.0 * share:
            high = middle
        else:
            low = middle
    return low


def held_out_spread(rates: list[dict[str, dict]], splits: int, people: int) -> dict[str, Any]:
    """The 10th, 50th and 90th percentiles of each held-out rate (held_out_rates) over the splits where it was
    measured (a half without right answers or absent-person queries has none), with the splits asked for and
    kept and the people in a fitted half."""
    record: dict[str, Any] = {"splits": splits, "splits_kept": len(rates), "people_fitted": people // 2,
                              "percentiles": list(HELD_OUT_PERCENTILES)}
    for kind in ("short_queries", "full_captions"):
        record[kind] = {}
        for rate in ("right_top1_flagged", "absent_not_flagged"):
            values = torch.tensor([r[kind][rate] for r in rates if r[kind].get(rate) is not None],
                                  dtype=torch.float64)
            record[kind][rate] = ([float(torch.quantile(values, p)) for p in HELD_OUT_PERCENTILES]
                                  if values.numel() else None)
    return record


def calibrate_no_match(encode: Callable[[Sequence[str]], torch.Tensor], texts: Sequence[str],
                       text_feats: torch.Tensor, image_feats: torch.Tensor, query_pids: torch.Tensor,
                       gallery_pids: torch.Tensor, chunk_size: int, ev: Any, carried: dict | None) -> dict:
    """The "no good match" rule of ``eval`` (or the one ``carried`` with the model), measured on this split.

    encode(texts) -> [n, D] features of the short queries (short_queries of ``texts``: each a query about its
    caption's person). ``eval.no_match_quantile_on``: fitted_people fits the thresholds at
    ``eval.no_match_quantile``; new_people at the quantile that flags that share of new people's right answers
    (quantile_for_new_people for the configured rule, "fitted_quantile"). Returns {"rule", "thresholds", "quantile",
    "fitted_quantile", "calibrated_on", "held_out", "short_queries_from", "short_queries": rates, "full_captions":
    rates, "every_rule": the rates each rule would have had, calibrated here at that fitted quantile (a carried
    rule's own when one is applied)}: rates on this split's short queries and whole captions. "held_out"
    (held_out_spread, ``eval.no_match_held_out_splits`` half-splits of the people; None when 0) is measured where
    the rule is calibrated and carried with it, so a test evaluation shows what val expected of new people.
    """
    how = str(ev.get("no_match_short_queries", "clauses"))
    shorts, owner = short_queries(texts, how)
    short = no_match_measure(encode(shorts), image_feats, query_pids[owner.to(query_pids.device)], gallery_pids,
                             chunk_size)
    full = no_match_measure(text_feats, image_feats, query_pids, gallery_pids, chunk_size)
    short["words"] = torch.tensor([word_count(t) for t in shorts])
    full["words"] = torch.tensor([word_count(t) for t in texts])
    short["pids"] = query_pids.cpu()[owner]
    full["pids"] = query_pids.cpu()
    quantile, rule = float(ev.no_match_quantile), str(ev.no_match_rule)
    splits = int(ev.get("no_match_held_out_splits", 0))
    halves = [] if carried else people_halves(short, full, splits)  # drawn once, read by both below
    if carried:  # the carried rule's quantile: nothing is fitted here but every_rule's comparison
        fitted = next((float(v) for v in (carried.get("fitted_quantile"), carried.get("quantile")) if v is not None),
                      quantile)  # 0.0 is a fitted quantile (the lowest right answer), not a missing one
    elif str(ev.get("no_match_quantile_on", "fitted_people")) == "new_people" and splits:
        fitted = quantile_for_new_people(halves, quantile, rule, ev.no_match_knots)
    else:
        fitted = quantile
    every = {}
    for name in NO_MATCH_RULES:  # what each rule would give at the same fitted quantile, for choosing the rule
        thresholds = no_match_thresholds(short, full, fitted, name, ev.no_match_knots)
        every[name] = {"thresholds": thresholds, "short_queries": no_match_rates(short, thresholds),
                       "full_captions": no_match_rates(full, thresholds)}
    if carried:
        record = {k: carried.get(k) for k in CARRIED_KEYS}
    else:
        held_out = (held_out_spread(held_out_rates(halves, fitted, rule, ev.no_match_knots), splits,
                                    int(torch.unique(full["pids"]).numel())) if splits else None)
        record = {"rule": rule, "thresholds": every[rule]["thresholds"], "quantile": quantile,
                  "fitted_quantile": fitted,
                  "calibrated_on": f"this split: {SHORT_QUERIES[how]} and the whole captions", "held_out": held_out}
    thresholds = record["thresholds"]
    return {**record, "short_queries_from": SHORT_QUERIES[how], "short_queries": no_match_rates(short, thresholds),
            "full_captions": no_match_rates(full, thresholds), "every_rule": every}


def is_no_match(scores: torch.Tensor, rule: dict, words: int) -> tuple[bool, dict[str, float], dict[str, float]]:
    """(flagged, the statistics, their thresholds) of one query of ``words`` words, scores [G] over a gallery,
    under a carried rule record."""
    count = torch.tensor([words])
    stats = {name: float(match_statistic(scores.reshape(1, -1), None, name)[0]) for name in rule["thresholds"]}
    limits = {name: float(threshold_at(entry, count)[0]) for name, entry in rule["thresholds"].items()}
    return any(stats[n] < limits[n] for n in stats), stats, limits


# ------------------------------------------------------------------------------------------- blend
def blend_scores(cosine: torch.Tensor, itm: torch.Tensor, weight: float) -> torch.Tensor:
    """cosine + weight * ITM over each query's top k: cosine, itm [Q, k]. The ITM scores are rescaled to the
    cosine's standard deviation within the row, so ``weight`` is the ITM's share in units of the cosine's own
    spread (1: equal say), whatever the head's logit scale. weight 0 is the cosine order."""
    cosine, itm = cosine.float(), itm.float()
    if weight == 0 or itm.shape[1] < 2:
        return cosine.clone()
    scale = cosine.std(dim=1, keepdim=True) / itm.std(dim=1, keepdim=True).clamp(min=1e-12)
    return cosine + weight * (itm - itm.mean(dim=1, keepdim=True)) * scale


def blend_grid(text_feats: torch.Tensor, image_feats: torch.Tensor, query_pids: torch.Tensor,
               gallery_pids: torch.Tensor, top_idx: torch.Tensor, itm: torch.Tensor, weights: Sequence[float],
               chunk_size: int, options: dict) -> dict[float, dict]:
    """retrieval_metrics of the blend at every weight of ``weights``, each with its "per_query" first-hit ranks
    and APs (what blend_evidence compares); top_idx, itm [Q, k]."""
    g = torch.nn.functional.normalize(image_feats.float(), dim=1)
    q = torch.nn.functional.normalize(text_feats.float(), dim=1)
    cosine = (q[:, None, :] * g[top_idx.to(g.device)]).sum(-1)  # [Q, k]
    results = {}
    for weight in weights:
        blended = blend_scores(cosine, itm.to(cosine.device), float(weight))
        results[float(weight)] = retrieval_metrics(
            text_feats, image_feats, query_pids, gallery_pids, chunk_size=chunk_size, per_query=True,
            score_fn=lambda sim, rows, b=blended: apply_rerank(sim, top_idx[rows.start:rows.stop],
                                                               b[rows.start:rows.stop]), **options)
    return results


def _per_query_score(per_query: dict, metric: str) -> torch.Tensor:
    """[Q] each query's share of ``metric``: its rank-1 hit (R1), its AP (mAP) or their mean (R1+mAP)."""
    hit = (per_query["first_hit_rank"] == 0).double()
    ap = per_query["ap"].double()
    return {"R1": hit, "mAP": ap, "R1+mAP": 0.5 * (hit + ap)}[metric]


def sign_test_p(better: int, worse: int) -> float:
    """One-sided exact sign test: the chance of ``better`` or more of ``better + worse`` coin flips landing heads,
    i.e. of a gain at least this lopsided from a change that helps and hurts queries alike."""
    n = better + worse
    if n == 0:
        return 1.0
    heads = torch.arange(better, n + 1, dtype=torch.float64)
    log_p = (torch.lgamma(torch.tensor(n + 1.0, dtype=torch.float64)) - torch.lgamma(heads + 1)
             - torch.lgamma(n - heads + 1) - n * math.log(2.0))
    return min(1.0, float(torch.logsumexp(log_p, dim=0).exp()))


def blend_evidence(candidate: dict, cosine: dict, metric: str) -> dict[str, Any]:
    """How many queries the blend ranks better and worse than the cosine order by ``metric`` (from
    blend_grid's per-query records), and the sign test's p-value of that split."""
    gain = _per_query_score(candidate["per_query"], metric) - _per_query_score(cosine["per_query"], metric)
    better, worse = int((gain > 1e-12).sum()), int((gain < -1e-12).sum())
    return {"better": better, "worse": worse, "p_value": sign_test_p(better, worse)}


def choose_blend_weight(grid: dict[float, dict], metric: str, alpha: float = 1.0) -> tuple[float, dict | None]:
    """(weight, evidence): the weight with the best ``metric`` (R1, mAP or R1+mAP; ties go to the smallest, 0
    first), kept only when the queries it ranks better outnumber those it ranks worse beyond chance: the sign
    test's p-value (blend_evidence) at most ``alpha`` over the number of non-zero weights tried (Bonferroni: the
    best of several weights looks better than any one). Else 0, the cosine order. alpha 1 keeps the best weight
    whatever the evidence. evidence: blend_evidence of the best weight, None when that is 0 or alpha is 1."""
    best = min(grid, key=lambda w: (-selection_value(grid[w], metric), w))
    if best == 0 or alpha >= 1.0:
        return best, None
    evidence = blend_evidence(grid[best], grid[0.0], metric)
    tried = sum(1 for w in grid if w != 0)
    evidence["threshold"] = alpha / tried
    return (best if evidence["p_value"] <= evidence["threshold"] else 0.0), evidence


def itm_pair_accuracy(cosine_order_pids: torch.Tensor, query_pids: torch.Tensor, cosine: torch.Tensor,
                      itm: torch.Tensor) -> dict[str, Any]:
    """How well each score orders the (right, wrong) image pairs inside each query's top k (percent).

    cosine_order_pids: [Q, k] the person id of each top-k image; query_pids [Q]; cosine, itm: [Q, k]. A pair
    counts for a score when the right image scores strictly higher (a tie counts half).
    """
    right = cosine_order_pids == query_pids[:, None].to(cosine_order_pids.device)  # [Q, k]
    pairs = right[:, :, None] & ~right[:, None, :]  # [Q, k right, k wrong]
    total = int(pairs.sum())
    if not total:
        return {"pairs": 0, "queries": 0}

    def accuracy(s: torch.Tensor) -> float:
        s = s.float().to(pairs.device)
        diff = s[:, :, None] - s[:, None, :]
        won = (diff > 0).float() + 0.5 * (diff == 0).float()
        return 100.0 * float((won * pairs).sum()) / total

    return {"itm": accuracy(itm), "cosine": accuracy(cosine), "pairs": total,
            "queries": int(pairs.flatten(1).any(dim=1).sum())}
