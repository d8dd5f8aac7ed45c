""""Why this person": the score split over image regions and words (models/explain.py, engine/explanation.py)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from models.explain import explain_match
from models.ivt import build_model
from tests.search_fixtures import QUERY, copy_gallery, make_checkpoint
from tests.tiny import TINY_MODEL
from utils.config import load_config


def _model(pool: str, seed: int = 0):
    cfg = load_config(None, TINY_MODEL + [f"model.feature_pool={pool}"])
    torch.manual_seed(seed)
    return build_model(cfg).eval(), cfg


def _inputs(seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    image = torch.randn(1, 3, 32, 16, generator=generator)
    ids = torch.randint(5, 400, (1, 9), generator=generator)
    ids[0, 0] = 2
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0  # two padding positions: they must get no share
    return image, ids, mask


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mean_pool_shares_add_up_to_the_ranking_score(seed):
    model, _ = _model("mean", seed)
    image, ids, mask = _inputs(seed + 10)
    got = explain_match(model, image, ids, mask)
    with torch.no_grad():
        _, v = model.encode_image(image, bmm=False)
        _, t = model.encode_text(ids, mask, bmm=False)
    cosine = float(F.normalize(v, dim=1)[0] @ F.normalize(t, dim=1)[0])
    assert got.exact and got.method == "exact mean-pool decomposition"
    assert got.score == pytest.approx(cosine, abs=1e-6)
    assert abs(float(got.image.double().sum()) - got.score) < 1e-5  # image tokens (CLS + patches)
    assert abs(float(got.text.double().sum()) - got.score) < 1e-5  # text tokens
    assert got.image.shape == (1 + 4 * 2,) and got.patch_map().shape == (4, 2)  # 32x16 input, 8-pixel patches
    assert torch.equal(got.text[7:], torch.zeros(2)) and got.text[:7].abs().min() > 0


def test_cls_pool_uses_gradient_times_input_and_leaves_the_model_as_it_was():
    model, _ = _model("cls")
    image, ids, mask = _inputs()
    got = explain_match(model, image, ids, mask)
    assert not got.exact and got.method == "gradient x input"
    assert got.image.shape == (9,) and torch.isfinite(got.image).all() and got.image.abs().sum() > 0
    assert torch.equal(got.text[7:], torch.zeros(2)) and got.text[:7].abs().sum() > 0
    assert all(p.grad is None for p in model.parameters()) and not model.training
    # gradient x input is first order: scaling the score's most important input token by (1 + eps) moves the
    # score by about eps x its share
    with torch.no_grad():
        _, t = model.encode_text(ids, mask, bmm=False)
    eps = 1e-3
    patch = int(got.image[1:].abs().argmax()) + 1
    seen = []

    def scale_token(_module, args):
        x = args[0].clone()
        if x.shape[1] == 9 and not seen:  # the image's tokens
            seen.append(True)
            x[:, patch] *= 1 + eps
        return (x, *args[1:])

    handle = model.encoder.blocks[0].register_forward_pre_hook(scale_token)
    with torch.no_grad():
        _, v = model.encode_image(image, bmm=False)
    handle.remove()
    moved = float(F.normalize(v, dim=1)[0] @ F.normalize(t, dim=1)[0]) - got.score
    assert moved == pytest.approx(eps * float(got.image[patch]), rel=0.05, abs=1e-7)


def test_retriever_explains_its_own_score_word_by_word(tmp_path):
    from datasets.synthetic import make_synthetic
    from engine.retrieval import Retriever

    root = make_synthetic("cuhkpedes", tmp_path / "synth", num_ids=8, seed=0)
    checkpoint = make_checkpoint(tmp_path / "mean.pth", root, seed=0, extra=["model.feature_pool=mean"])
    retriever = Retriever.from_checkpoint(checkpoint, device="cpu")
    retriever.index(copy_gallery(root, tmp_path / "gallery", count=4))
    hit = retriever.search(QUERY, k=1)[0]
    why = retriever.explain(QUERY, hit.path)
    assert why.score == pytest.approx(hit.score, abs=1e-5)
    assert abs(why.image_total() - why.score) < 1e-5 and abs(why.text_total() - why.score) < 1e-5
    assert " ".join(w for w, _ in why.words).replace(" ,", ",").replace(" .", ".") == QUERY
    assert "split exactly" in why.summary() and why.top_words()
    assert Path(why.image_path) == Path(hit.path)


@pytest.mark.parametrize("seed", [0, 1])
def test_contrastive_shares_add_up_to_the_gap_over_the_baseline(seed):
    from models.explain import baseline_tokens

    model, _ = _model("mean", seed)
    image, ids, mask = _inputs(seed + 20)
    others = torch.randn(5, 3, 32, 16, generator=torch.Generator().manual_seed(seed))
    tokens = baseline_tokens(model, others)  # [N, D]
    with torch.no_grad():
        _, feats = model.encode_image(others, bmm=False)
    mean_unit = F.normalize(feats.float(), dim=1).mean(0)
    assert torch.allclose(tokens.mean(0), mean_unit, atol=1e-5)  # its token mean is the mean unit feature
    plain = explain_match(model, image, ids, mask)
    for baseline in (tokens, mean_unit):
        got = explain_match(model, image, ids, mask, baseline)
        with torch.no_grad():
            _, t = model.encode_text(ids, mask, bmm=False)
        against = float(F.normalize(t, dim=1)[0] @ mean_unit)
        assert got.exact and got.method == "exact contrastive mean-pool decomposition"
        assert got.score == pytest.approx(plain.score, abs=1e-6) and got.baseline_score == pytest.approx(against, abs=1e-5)
        gap = got.score - got.baseline_score
        assert abs(float(got.image.double().sum()) - gap) < 1e-5 and abs(float(got.text.double().sum()) - gap) < 1e-5
        assert torch.equal(got.text[7:], torch.zeros(2))
    # against itself an image has nothing to explain: every share is 0
    itself = explain_match(model, image, ids, mask, baseline_tokens(model, image))
    assert itself.image.abs().max() < 1e-5 and itself.text.abs().max() < 1e-5


def test_function_words_are_never_reasons():
    from engine.explanation import Explanation

    words = [("A", 0.5), ("man", 0.05), ("with", 0.4), ("a", 0.3), ("blue", 0.2), ("coat", 0.1), ("and", 0.6),
             ("red", -0.2)]
    found = Explanation("x.jpg", "", 0.5, torch.zeros(2, 2), 0.0, words, 0.0, "m", True)
    assert found.top_words(3) == ["blue", "coat", "man"]


def test_integrated_gradients_add_up_to_the_score_gap_between_the_start_and_the_image():
    from models.explain import entering_tokens, integrated_gradients

    model, _ = _model("mean", 3)
    image, ids, mask = _inputs(5)
    others = torch.randn(4, 3, 32, 16, generator=torch.Generator().manual_seed(7))
    start = entering_tokens(model, others).mean(0)  # [N, D]
    with torch.no_grad():
        _, t = model.encode_text(ids, mask, bmm=False)
    direction = F.normalize(t.float(), dim=1)[0]

    def score_from(entering: torch.Tensor) -> float:
        handle = model.encoder.blocks[0].register_forward_pre_hook(lambda _m, args: (entering[None], *args[1:]))
        try:
            with torch.no_grad():
                _, v = model.encode_image(image, bmm=False)
        finally:
            handle.remove()
        return float(F.normalize(v.float(), dim=1)[0] @ direction)

    gap = score_from(entering_tokens(model, image)[0]) - score_from(start)
    shares = integrated_gradients(model, image, direction, start, steps=64)
    assert shares.shape == (1 + 4 * 2,) and abs(gap) > 1e-3
    assert float(shares.double().sum()) == pytest.approx(gap, rel=0.02, abs=1e-4)
    # from the image itself nothing moves: every share is 0
    assert integrated_gradients(model, image, direction, entering_tokens(model, image)[0], steps=4).abs().max() < 1e-6
    assert all(p.grad is None for p in model.parameters())


def test_pointing_rules_count_patch_centres_and_patch_overlaps():
    import numpy as np

    from bench.bench_pointing import cells, peak_hits

    parts = np.zeros((16, 8), dtype=np.uint8)  # a 4 x 2 grid of 4 x 4-pixel patches
    parts[13:15, 1:3] = 5  # shoes over the centre pixel (14, 2) of the bottom-left patch
    parts[5, 7] = 5  # one pixel in patch (1, 1), not its centre (6, 6)
    found = cells((4, 2), parts, 5)
    assert found["centre"].tolist() == [[False, False], [False, False], [False, False], [True, False]]
    assert found["overlap"].tolist() == [[False, False], [False, True], [False, False], [True, False]]
    heat = torch.zeros(4, 2)
    heat[1, 1] = 1.0  # the peak on the patch with one pixel of the part
    assert peak_hits(heat, parts, 5) == {"centre": (False, 0.125), "overlap": (True, 0.25)}


def test_colour_foils_swap_each_colour_word_for_every_other_colour():
    from engine.explanation import COLOURS, colour_foils

    foils = colour_foils("A man in a Red coat and grey pants.")
    assert len(foils) == 2 * (len(COLOURS) - 1)
    assert "A man in a black coat and grey pants." in foils and "A man in a Red coat and black pants." in foils
    assert not any("gray pants" in f for f in foils)  # grey is gray: never its own foil
    assert colour_foils("a man with a backpack") == [] and colour_foils("redcoat") == []


def test_the_page_explanation_splits_words_exactly_and_regions_by_integrated_gradients_against_foils(tmp_path):
    from datasets.synthetic import make_synthetic
    from engine.checkpoints import load_for_inference
    from engine.encoding import tokenize
    from engine.explanation import colour_foils, explain_with, gallery_baseline, pixels_of
    from models.explain import GalleryBaseline

    root = make_synthetic("cuhkpedes", tmp_path / "synth", num_ids=6, seed=0)
    checkpoint = make_checkpoint(tmp_path / "mean.pth", root, seed=1, extra=["model.feature_pool=mean",
                                                                             "eval.explain_steps=64"])
    model, cfg, tokenizer, _ = load_for_inference(checkpoint, None, [], "cpu")
    paths = sorted(str(p) for p in (root / "imgs").rglob("*.jpg"))
    baseline = gallery_baseline(model, cfg, "cpu", paths)
    assert isinstance(baseline, GalleryBaseline) and baseline.inputs.shape == baseline.tokens.shape
    text = "a woman in a red coat"
    why = explain_with(model, tokenizer, cfg, "cpu", text, paths[0], baseline)
    gap = why.score - why.baseline_score
    assert abs(why.text_total() - gap) < 1e-5  # the words: exact, against the gallery's average feature
    assert "integrated gradients" in why.summary() and "other colours" in why.summary()
    # the regions add up to the score along t - mean(foils), from the gallery's mean input to this image's
    with torch.no_grad():
        length = cfg.text.max_text_len
        t = F.normalize(model.encode_text(*tokenize(tokenizer, [text], length, "cpu"), bmm=False)[1].float(), dim=1)[0]
        foils = F.normalize(model.encode_text(*tokenize(tokenizer, colour_foils(text), length, "cpu"), bmm=False)[1]
                            .float(), dim=1).mean(0)
    image = pixels_of(cfg, [paths[0]], "cpu")

    def along(entering=None) -> float:
        hook = None if entering is None else model.encoder.blocks[0].register_forward_pre_hook(
            lambda _m, args: (entering[None], *args[1:]))
        try:
            with torch.no_grad():
                _, v = model.encode_image(image, bmm=False)
        finally:
            if hook is not None:
                hook.remove()
        return float(F.normalize(v.float(), dim=1)[0] @ (t - foils))

    assert why.image_total() == pytest.approx(along() - along(baseline.inputs), rel=0.03, abs=1e-4)
    # the page says what the map answers: the named colours against other colours, or (no colour named) the words
    from engine.webapp import why_html

    assert why.foils == len(colour_foils(text)) == 10
    assert "rather than the same words in other colours" in why_html(why, 1)
    plain = explain_with(model, tokenizer, cfg, "cpu", "a woman with a backpack", paths[0], baseline)
    assert plain.foils == 0 and "Red regions raise the score for the description above" in why_html(plain, 1)


def test_colour_source_tells_a_bound_colour_from_another_parts_colour():
    from bench.bench_pointing import colour_source, colour_source_chance

    assert colour_source("black", "black", {"black", "red"}) == "own"  # shoes as black as the trousers: still own
    assert colour_source("red", "black", {"red", "blue"}) == "another part"  # "black shoes" read as the red coat
    assert colour_source("green", "black", {"red", "blue"}) == "neither"
    # at random among 10 colours: the own one, 2 others worn elsewhere (black counts as own), 7 worn nowhere
    assert colour_source_chance("black", {"black", "red", "blue"}, 10) == pytest.approx(
        {"own": 0.1, "another part": 0.2, "neither": 0.7})


def test_the_pointing_game_reports_where_each_top_colour_comes_from(tmp_path):
    from bench import bench_pointing
    from datasets.synthetic import make_synthetic

    root = make_synthetic("cuhkpedes", tmp_path / "synth", num_ids=6, seed=0)
    # mean pooling, as the demo: the page's map needs a contrastive model
    checkpoint = make_checkpoint(tmp_path / "tiny.pth", root, seed=1, extra=["model.feature_pool=mean",
                                                                             "eval.explain_steps=4"])
    record = bench_pointing.main(["--checkpoint", str(checkpoint), "--data-root", str(root), "--split", "test",
                                  "--limit", "3", "--out", str(tmp_path / "pointing.json")])
    # brute force: every colour of the captions in the one-attribute query, the picked one the highest cosine
    import json

    from datasets.readers import load_annotations
    from engine.checkpoints import load_for_inference
    from engine.encoding import tokenize
    from engine.explanation import pixels_of

    model, cfg, tokenizer, _ = load_for_inference(checkpoint, None, [], "cpu")
    described = json.loads((root / "parts.json").read_text())["images"]
    colours = sorted({words.split()[0] for d in described.values() for words in d.values()})
    images = list(dict.fromkeys(r.image_path for r in load_annotations("cuhkpedes", root).test))[:3]
    expected: dict[str, list[str]] = {}
    for path in images:
        worn = described[Path(path).relative_to(root / "imgs").as_posix()]
        for part, words in worn.items():
            queries = [bench_pointing.query_for(part, " ".join([c] + words.split()[1:])) for c in colours]
            with torch.no_grad():
                text = F.normalize(model.encode_text(*tokenize(tokenizer, queries, cfg.text.max_text_len, "cpu"),
                                                   bmm=False)[1], dim=1)
                image = F.normalize(model.encode_image(pixels_of(cfg, [path], "cpu"), bmm=False)[1], dim=1)[0]
            picked = colours[int((text @ image).argmax())]
            others = {w.split()[0] for p, w in worn.items() if p != part}
            expected.setdefault(part, []).append("own" if picked == words.split()[0]
                                                 else "another part" if picked in others else "neither")
    assert set(record["results"]) == set(expected)  # every part of these pictures shows in its map here
    for part, row in record["results"].items():
        assert row["colour_source"] == {s: pytest.approx(expected[part].count(s) / len(expected[part]))
                                        for s in ("own", "another part", "neither")}, part
        # the query's own colour ranks first exactly when the model tells the colour: two counts of one ranking
        assert row["colour_source"]["own"] == pytest.approx(row["colour_top1"]), part
        assert row["colour_source_chance"]["own"] == pytest.approx(1 / len(colours))
        assert sum(row["colour_source_chance"].values()) == pytest.approx(1.0)
    assert any(row["colour_source"]["another part"] > 0 for row in record["results"].values())
