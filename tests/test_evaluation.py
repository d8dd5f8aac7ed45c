"""Evaluation: protocol, encoding order, ITM re-ranking, evaluate.main on both checkpoint formats, bad input."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from datasets.records import Record
from utils.checkpoint import atomic_save, load_file
from utils.config import load_config
from engine.checkpoints import checkpoint_dict
from engine.encoding import encode_images, encode_texts, rerank_scores
from engine.evaluation import build_eval_protocol, chance_r1, evaluate_model, selection_ranking, selection_score
from utils.metrics import retrieval_metrics

TINY = ["model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.patch_size=16", "model.stride=16",
        "input.image_size=[64,32]", "text.tokenizer=train", "text.tokenizer_vocab_size=200", "model.vocab_size=200",
        "eval.batch_size=8", "data.num_workers=0", "eval.amp=false"]


# ------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def synth_root(tmp_path_factory) -> Path:
    from datasets.synthetic import make_synthetic

    return make_synthetic("cuhkpedes", tmp_path_factory.mktemp("synth") / "cuhk", num_ids=20, seed=0)


@pytest.fixture(scope="module")
def splits(synth_root):
    from datasets.readers import load_annotations

    return load_annotations("cuhkpedes", synth_root)


def tiny_cfg(root: Path, *extra: str):
    return load_config(None, TINY + [f"data.root={root}", *extra])


def tiny_model(cfg, seed: int = 0):
    from models.ivt import build_model

    torch.manual_seed(seed)
    return build_model(cfg).eval()


@pytest.fixture(scope="module")
def tokenizer(splits):
    from datasets.tokenizer import build_tokenizer

    return build_tokenizer(load_config(None, TINY).text, [r.caption for r in splits.train])


def save_ours(path: Path, model, cfg, tokenizer) -> Path:
    from datasets.tokenizer import tokenizer_vocab

    atomic_save(checkpoint_dict(model.state_dict(), cfg.to_dict(),
                                {"vocab": tokenizer_vocab(tokenizer), "lowercase": True}, epoch=0, step=0), path)
    return path


@pytest.fixture(scope="module")
def our_checkpoint(tmp_path_factory, synth_root, tokenizer) -> Path:
    cfg = tiny_cfg(synth_root)
    return save_ours(tmp_path_factory.mktemp("ckpt") / "tiny.pth", tiny_model(cfg), cfg, tokenizer)


def error_of(argv: list[str]) -> str:
    import evaluate

    with pytest.raises(SystemExit) as info:
        evaluate.main(argv)
    message = str(info.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


# ------------------------------------------------------------------------------------------- protocol
def _records() -> list[Record]:
    # image 0 and 1 show person 7 (three captions), image 2 shows person 9 (two captions)
    return [Record("a.jpg", "cap a1", 7, 0), Record("a.jpg", "cap a2", 7, 0), Record("b.jpg", "cap b1", 7, 1),
            Record("c.jpg", "cap c1", 9, 2), Record("c.jpg", "cap c2", 9, 2)]


def test_protocol_one_gallery_entry_per_image_and_pid_matching():
    sets = build_eval_protocol(_records())
    assert sets.texts == ["cap a1", "cap a2", "cap b1", "cap c1", "cap c2"]
    assert sets.query_pids.tolist() == [7, 7, 7, 9, 9]
    assert sets.query_image_ids.tolist() == [0, 0, 1, 2, 2]
    assert sets.image_paths == ["a.jpg", "b.jpg", "c.jpg"]
    assert sets.gallery_pids.tolist() == [7, 7, 9]
    # positives per query: 2, 2, 2, 1, 1 of 3 images
    assert chance_r1(sets.query_pids, sets.gallery_pids) == pytest.approx(100 * 8 / 15)
    # every text query ranks b.jpg first: person 7's captions hit (another image of the same person counts),
    # person 9's miss
    text = torch.eye(3)[[1, 1, 1, 1, 1]]
    metrics = retrieval_metrics(text, torch.eye(3), sets.query_pids, sets.gallery_pids)
    assert metrics["R1"] == pytest.approx(60.0)


def test_protocol_rejects_empty_and_inconsistent_records():
    with pytest.raises(ValueError, match="no records"):
        build_eval_protocol([])
    bad = _records() + [Record("a.jpg", "cap a3", 8, 0)]
    with pytest.raises(ValueError, match="record 5: image_id 0"):
        build_eval_protocol(bad)


def _path_order(sets) -> list[str]:
    return [os.path.basename(p) for p in sets.image_paths]


@pytest.mark.parametrize("fmt", ["cuhkpedes", "rstp"])
def test_authors_gallery_is_the_unique_images_when_each_image_has_two_adjacent_captions(tmp_path, fmt):
    from datasets.readers import load_annotations
    from datasets.synthetic import make_synthetic

    test = load_annotations(fmt, make_synthetic(fmt, tmp_path / fmt, num_ids=20, seed=0)).test
    assert [r.image_id for r in test] == [i // 2 for i in range(len(test))]  # the premise: a, a, b, b, ...
    standard = build_eval_protocol(test)
    authors = build_eval_protocol(test, "authors", fmt)
    assert authors.image_paths == standard.image_paths and len(authors.image_paths) == len(test) // 2
    assert torch.equal(authors.gallery_pids, standard.gallery_pids)
    assert torch.equal(authors.gallery_image_ids, standard.gallery_image_ids)
    assert authors.texts == standard.texts and authors.dropped_captions == 0


def test_authors_gallery_follows_file_order_not_images():
    a, b, c = [Record(f"{n}.jpg", f"cap {n}{i}", pid, image_id) for i, (n, pid, image_id)
               in enumerate([("a", 7, 0), ("b", 7, 1), ("c", 9, 2)])]
    # image a has three captions: every second record then shows a twice and never c (as in the authors' code)
    records = [a, a, a, b, b, c]
    authors = build_eval_protocol(records, "authors", "cuhkpedes")
    assert _path_order(authors) == ["a.jpg", "a.jpg", "b.jpg"] and authors.gallery_pids.tolist() == [7, 7, 7]
    assert authors.num_queries == 6
    assert _path_order(build_eval_protocol(records)) == ["a.jpg", "b.jpg", "c.jpg"]
    # ICFG-PEDES: the authors take every record's image
    assert _path_order(build_eval_protocol([a, b, b, c], "authors", "icfg")) == ["a.jpg", "b.jpg", "b.jpg", "c.jpg"]
    with pytest.raises(ValueError, match="eval.protocol must be one of standard, authors"):
        build_eval_protocol(records, "paper")
    with pytest.raises(ValueError, match="not 'market'"):
        build_eval_protocol(records, "authors", "market")


# (caption, words as the authors' RSTPReid loader counts them), counted by hand: it splits on single spaces
# only, so an empty piece (two spaces, a leading or trailing space) is a word and tabs or newlines join words;
# a piece holding '.' is split on '.' alone (a ',' inside stays), else on ',', else on '?'; empty parts go.
AUTHORS_COUNTS = [
    ("a man in a red coat", 6),
    ("a  man", 3),  # double space: an empty word
    (" a man ", 4),  # leading and trailing space
    ("a\tman\nwith a bag", 3),  # "a\tman\nwith", "a", "bag"
    ("man,bag.", 1),  # split on '.' only: "man,bag"
    ("coat.shoes,bag", 2),  # "coat", "shoes,bag"
    ("coat,shoes,bag", 3),
    ("is it? yes", 3),
    ("a , b", 2),  # "," alone leaves nothing
    ("...", 0),
    ("", 1),
    ("end.  next", 3),  # "end", "", "next"
]


@pytest.mark.parametrize("caption, count", AUTHORS_COUNTS)
def test_authors_word_count_is_the_rstp_loaders_rule(caption, count):
    from datasets.authors_text import authors_word_count

    assert authors_word_count(caption) == count


def test_authors_drop_rstp_captions_over_90_words_before_taking_every_second():
    words_90 = " ".join(["tall"] * 89) + " man,bag."
    words_91 = " ".join(["tall"] * 89) + "  man,bag."  # one more space: one more word, as the authors count
    records = [Record("a.jpg", "short a", 1, 0), Record("a.jpg", words_91, 1, 0),
               Record("b.jpg", words_90, 2, 1), Record("b.jpg", "short b", 2, 1), Record("c.jpg", "short c", 3, 2)]
    sets = build_eval_protocol(records, "authors", "rstp")
    assert sets.dropped_captions == 1 and sets.texts == ["short a", words_90, "short b", "short c"]
    # after the drop the pairs are out of step: records a, b, b, c -> gallery a, b
    assert _path_order(sets) == ["a.jpg", "b.jpg"]
    # the drop is RSTPReid's only; the standard protocol never drops a caption
    assert build_eval_protocol(records, "authors", "cuhkpedes").num_queries == 5
    assert build_eval_protocol(records).num_queries == 5
    # the reader's count of the raw caption wins over the (stripped) caption's: 89 words plus a leading space
    stripped = Record("d.jpg", words_90, 4, 3, authors_word_count=91)
    assert build_eval_protocol([stripped, *records[2:]], "authors", "rstp").dropped_captions == 1


def test_authors_cut_icfg_captions_at_the_91st_processed_word():
    tokens = [f"w{i}" for i in range(90)] + ["an", "extra"]
    caption = "a man " + " ".join(tokens)
    cut = caption[: caption.index("an")]  # the first occurrence as a substring: inside "man", as the authors
    assert cut == "a m"
    long = Record("a.jpg", caption, 1, 0, authors_word_count=92, authors_caption=cut)
    short = Record("b.jpg", "a woman", 2, 1, authors_word_count=2)
    sets = build_eval_protocol([long, short], "authors", "icfg")
    assert sets.texts == ["a m", "a woman"] and sets.cut_captions == 1 and sets.dropped_captions == 0
    assert build_eval_protocol([long, short]).texts == [caption, "a woman"]  # standard: never cut


def test_authors_protocol_metrics_by_hand(tmp_path, monkeypatch, synth_root, tokenizer):
    """Three queries, a two-image gallery under the authors' protocol, features chosen so the rankings are:
    query 0 (person 1): c, a -> its positive a at rank 1; query 1 (person 9): its image b is record 1, which
    every-second-record skips, so no positive; query 2 (person 2): c, a -> positive c at rank 0."""
    import engine.evaluation as evaluation

    paths = {}
    for name in ("a", "b", "c"):
        paths[name] = str(tmp_path / f"{name}.jpg")
        Path(paths[name]).write_bytes(b"")  # existence is all the protocol checks; features are given below
    records = [Record(paths["a"], "q0", 1, 0), Record(paths["b"], "q1", 9, 1), Record(paths["c"], "q2", 2, 2)]
    gallery_feats = {paths["a"]: [1.0, 0.0], paths["c"]: [0.0, 1.0]}
    text_feats = {"q0": [0.2, 1.0], "q1": [1.0, 1.0], "q2": [0.0, 1.0]}
    monkeypatch.setattr(evaluation, "encode_images",
                        lambda model, image_paths, *a, **k: torch.tensor([gallery_feats[p] for p in image_paths]))
    monkeypatch.setattr(evaluation, "encode_texts",
                        lambda model, tok, texts, *a, **k: torch.tensor([text_feats[t] for t in texts]))
    cfg = tiny_cfg(synth_root, "eval.protocol=authors")
    results = evaluate_model(tiny_model(cfg), records, tokenizer, cfg, "cpu", "test")
    # Trapezoidal AP, (1/n) sum_i (p_before_i + p_i) / 2 with p_i = i / (r_i + 1), p_before_i = (i - 1) / r_i
    # (1 at r_i = 0): query 0, i = 1 at r = 1: (0/1 + 1/2) / 2 = 1/4; query 1: 0 (no positive, counted);
    # query 2, i = 1 at r = 0: (1 + 1) / 2 = 1.  mAP = (1/4 + 0 + 1) / 3 = 5/12.
    assert results["t2i"]["mAP"] == pytest.approx(100 * 5 / 12)
    assert results["t2i"]["R1"] == pytest.approx(100 / 3) and results["t2i"]["R5"] == pytest.approx(200 / 3)
    assert results["t2i"]["num_queries_without_positive"] == 1
    assert results["counts"]["gallery_images"] == 2
    assert results["protocol"] == {"name": "authors", "gallery": "the image of every second record in file order",
                                   "ap_formula": "trapezoidal", "without_positive": "zero",
                                   "max_caption_words": None, "captions_dropped": 0,
                                   "cut_caption_words": None, "captions_cut": 0}
    # the standard protocol on the same features: gallery a, b, c, so query 1 finds b; standard AP
    gallery_feats[paths["b"]] = [1.0, 1.0]
    standard = evaluate_model(tiny_model(cfg), records, None, tiny_cfg(synth_root), "cpu", "test")
    assert standard["counts"]["gallery_images"] == 3 and standard["t2i"]["num_queries_without_positive"] == 0
    # rankings c, b, a / b, ... / c, ...: positives at ranks 2, 0, 0, so AP 1/3, 1, 1
    assert standard["t2i"]["mAP"] == pytest.approx(100 * (1 / 3 + 2) / 3)


def test_authors_protocol_does_not_truncate_captions_at_max_text_len(tmp_path, monkeypatch, synth_root, tokenizer):
    """120 word pieces give 122 ids under the authors' protocol (their inference never truncates), 100 under
    the standard one (text.max_text_len=100); 600 give 512 under the authors' (model.max_text_positions)."""
    import engine.evaluation as evaluation
    from engine.encoding import tokenize

    assert tokenizer.tokenize("a a") == ["a", "a"]  # one word piece per word
    image = tmp_path / "a.jpg"
    image.write_bytes(b"")  # existence is all the protocol checks; features are given below
    records = [Record(str(image), " ".join(["a"] * 120), 1, 0), Record(str(image), " ".join(["a"] * 600), 1, 0)]
    ids_per_caption = {}

    def encode_texts_spy(model, tok, texts, limit, *args, **kwargs):
        ids_per_caption[protocol] = tokenize(tok, texts, limit, "cpu")[1].sum(1).tolist()
        return torch.ones(len(texts), 2)

    monkeypatch.setattr(evaluation, "encode_images", lambda model, paths, *a, **k: torch.ones(len(paths), 2))
    monkeypatch.setattr(evaluation, "encode_texts", encode_texts_spy)
    for protocol in ("standard", "authors"):
        cfg = tiny_cfg(synth_root, f"eval.protocol={protocol}")
        assert (cfg.text.max_text_len, cfg.model.max_text_positions) == (100, 512)
        evaluate_model(tiny_model(cfg), records, tokenizer, cfg, "cpu", "test")
    assert ids_per_caption == {"standard": [100, 100], "authors": [122, 512]}
    # the model takes the 122 ids: its feature differs from that of the caption cut at 100
    cfg = tiny_cfg(synth_root)
    model = tiny_model(cfg)
    full, cut = (encode_texts(model, tokenizer, [records[0].caption], limit, 1, "cpu", amp=False)
                 for limit in (evaluation.query_token_limit(tiny_cfg(synth_root, "eval.protocol=authors"), "authors"),
                               evaluation.query_token_limit(cfg, "standard")))
    assert (full - cut).abs().max() > 1e-4


def test_a_whitespace_only_caption_stays_a_query_under_the_authors_protocol(tmp_path):
    """10 test images with two captions each, one caption blank: 20 queries under the authors' protocol (their
    loader keeps it), 19 under the standard one; every second record is still each image once."""
    from datasets.readers import load_annotations
    from datasets.synthetic import make_synthetic

    root = make_synthetic("cuhkpedes", tmp_path / "cuhk", num_ids=20, seed=0)
    data = json.loads((root / "reid_raw.json").read_text())
    test = [entry for entry in data if entry["split"] == "test"]
    assert len(test) == 10 and all(len(entry["captions"]) == 2 for entry in test)
    test[0]["captions"][1] = "   "
    (root / "reid_raw.json").write_text(json.dumps(data))
    splits = load_annotations("cuhkpedes", root)
    assert len(splits.test) == 20 and splits.test[1].caption == ""
    assert all(r.caption.strip() for r in splits.train)  # nothing trains on a blank caption
    standard = build_eval_protocol(splits.test)
    authors = build_eval_protocol(splits.test, "authors", "cuhkpedes")
    assert (standard.num_queries, authors.num_queries) == (19, 20)
    assert (standard.blank_captions, authors.blank_captions) == (1, 1)
    assert authors.texts[1] == "" and authors.query_image_ids.tolist() == [i // 2 for i in range(20)]
    assert authors.image_paths == standard.image_paths and len(authors.image_paths) == 10


# ------------------------------------------------------------------------------------------- encoding
def test_encoders_keep_order_and_ignore_batching(splits, synth_root, tokenizer):
    from datasets.transforms import build_test_transform, load_image

    cfg = tiny_cfg(synth_root)
    model = tiny_model(cfg)
    sets = build_eval_protocol(splits.test)
    transform = build_test_transform(cfg.input)
    images = encode_images(model, sets.image_paths, transform, 3, "cpu", amp=False)
    texts = encode_texts(model, tokenizer, sets.texts, cfg.text.max_text_len, 3, "cpu", amp=False)
    assert images.shape == (sets.num_gallery, 32) and images.dtype == torch.float32
    assert texts.shape == (sets.num_queries, 32) and texts.dtype == torch.float32
    with torch.no_grad():
        for i in (0, 4, sets.num_gallery - 1):
            alone = model.encode_image(transform(load_image(sets.image_paths[i]))[None], bmm=False)[1]
            torch.testing.assert_close(images[i], alone[0], atol=1e-5, rtol=1e-4)
        for i in (0, 7, sets.num_queries - 1):
            batch = tokenizer([sets.texts[i]], return_tensors="pt")
            alone = model.encode_text(batch["input_ids"], batch["attention_mask"], bmm=False)[1]
            # the batched row was padded to a longer caption: the mask must make that invisible
            torch.testing.assert_close(texts[i], alone[0], atol=1e-5, rtol=1e-4)


def test_texts_are_truncated_at_max_text_len(splits, synth_root, tokenizer):
    cfg = tiny_cfg(synth_root)
    model = tiny_model(cfg)
    seen = []
    original = model.encode_text
    model.encode_text = lambda ids, mask, bmm=True, **kw: (seen.append(ids.shape[1]), original(ids, mask, bmm, **kw))[1]
    encode_texts(model, tokenizer, [r.caption for r in splits.test[:4]], 6, 4, "cpu", amp=False)
    assert seen == [6]


def test_evaluate_model_matches_brute_force(splits, synth_root, tokenizer):
    cfg = tiny_cfg(synth_root, "eval.save_examples=3")
    model = tiny_model(cfg)
    results = evaluate_model(model, splits.test, tokenizer, cfg, "cpu", "test")
    sets = build_eval_protocol(splits.test)
    from datasets.transforms import build_test_transform

    img = encode_images(model, sets.image_paths, build_test_transform(cfg.input), 64, "cpu", amp=False)
    txt = encode_texts(model, tokenizer, sets.texts, cfg.text.max_text_len, 64, "cpu", amp=False)
    sim = torch.nn.functional.normalize(txt, dim=1) @ torch.nn.functional.normalize(img, dim=1).t()
    hits_at_1 = sum(int(sets.gallery_pids[int(row.argmax())] == pid) for row, pid in zip(sim, sets.query_pids))
    assert results["t2i"]["R1"] == pytest.approx(100.0 * hits_at_1 / sets.num_queries)
    i2t_hits = sum(int(sets.query_pids[int(col.argmax())] == pid) for col, pid in zip(sim.t(), sets.gallery_pids))
    assert results["i2t"]["R1"] == pytest.approx(100.0 * i2t_hits / sets.num_gallery)
    assert results["counts"] == {"queries": 20, "gallery_images": 10, "identities": 3}
    examples = results["examples"]
    assert examples["query_indices"] == [0, 10, 19]
    best = sim[examples["query_indices"]].sort(dim=1, descending=True)
    assert examples["indices"] == best.indices.tolist()
    torch.testing.assert_close(torch.tensor(examples["scores"]), best.values)
    assert "t2i_rerank" not in results


# ----------------------------------------------------------------------------------------- re-ranking
@pytest.mark.parametrize("reading", [[], ["model.fusion_reads_block=1", "model.itm_residual=true"]],
                         ids=["output-tokens", "block-1-residual"])
def test_rerank_scores_match_pairwise_itm(splits, synth_root, tokenizer, reading):
    from datasets.transforms import build_test_transform, load_image

    cfg = tiny_cfg(synth_root, "model.fusion_layers=1", *reading)
    model = tiny_model(cfg)
    sets = build_eval_protocol(splits.test)
    transform = build_test_transform(cfg.input)
    top = torch.tensor([[3, 0, 7], [9, 3, 1], [0, 2, 5], [3, 4, 6]])
    texts = sets.texts[:4]
    # batch size 5 cuts the 12 pairs at odd places, across images and queries
    got = rerank_scores(model, tokenizer, texts, sets.image_paths, top, transform, 100, 5, "cpu", amp=False)
    margin = rerank_scores(model, tokenizer, texts, sets.image_paths, top, transform, 100, 5, "cpu", amp=False,
                           score="margin")
    with torch.no_grad():
        for q in range(4):
            batch = tokenizer([texts[q]], return_tensors="pt")
            text_tokens, text_feat = model.encode_text(batch["input_ids"], batch["attention_mask"], bmm=False,
                                                       for_fusion=True)
            for j, g in enumerate(top[q].tolist()):
                image_tokens, image_feat = model.encode_image(transform(load_image(sets.image_paths[g]))[None],
                                                              bmm=False, for_fusion=True)
                logits = model.itm_logits(text_tokens, batch["attention_mask"], image_tokens,
                                          features=(text_feat, image_feat))[0]
                # ranked by the match logit alone (RaSa, APTM), not by match minus no-match
                assert got[q, j].item() == pytest.approx(logits[1].item(), abs=1e-4)
                assert margin[q, j].item() == pytest.approx((logits[1] - logits[0]).item(), abs=1e-4)


def _oracle_itm(model, sets, tokenizer, cfg):
    """Replace model.itm_logits by an ITM that knows the truth: it recognises each text and image by its CLS
    token (nearest neighbour among all captions / images) and scores same-person pairs +5, others -5."""
    from datasets.transforms import build_test_transform

    img = encode_images(model, sets.image_paths, build_test_transform(cfg.input), 64, "cpu", amp=False)
    txt = encode_texts(model, tokenizer, sets.texts, cfg.text.max_text_len, 64, "cpu", amp=False)
    calls = []

    def itm_logits(text_tokens, text_mask, image_tokens, image_mask=None, features=None):
        q = torch.cdist(text_tokens[:, 0].float(), txt).argmin(dim=1)
        g = torch.cdist(image_tokens[:, 0].float(), img).argmin(dim=1)
        calls.append(len(q))
        match = (sets.query_pids[q] == sets.gallery_pids[g]).float() * 10 - 5
        return torch.stack([torch.zeros_like(match), match], dim=1)

    model.itm_logits = itm_logits
    return calls


def test_rerank_with_oracle_itm_reaches_r1_100(splits, synth_root, tokenizer):
    cfg = tiny_cfg(synth_root, "model.fusion_layers=1", "eval.rerank_top_k=10", "eval.rerank_batch_size=7")
    model = tiny_model(cfg)
    sets = build_eval_protocol(splits.test)
    calls = _oracle_itm(model, sets, tokenizer, cfg)
    results = evaluate_model(model, splits.test, tokenizer, cfg, "cpu", "test")
    assert sum(calls) == 20 * 10 and max(calls) <= 7
    assert results["t2i"]["R1"] < 100.0  # an untrained model
    # the whole gallery is re-ranked and the oracle puts every positive first
    assert results["t2i_rerank"]["R1"] == 100.0 and results["t2i_rerank"]["mAP"] == pytest.approx(100.0)
    assert results["rerank_top_k"] == 10


def test_the_blend_keeps_a_head_that_helps_beyond_chance_and_no_other(splits, synth_root, tokenizer):
    cfg = tiny_cfg(synth_root, "model.fusion_layers=1", "eval.rerank_top_k=10")
    model = tiny_model(cfg)
    _oracle_itm(model, build_eval_protocol(splits.test), tokenizer, cfg)
    chosen = evaluate_model(model, splits.test, tokenizer, cfg, "cpu", "test")
    blend = chosen["rerank_blend"]
    evidence = blend["evidence"]  # the oracle ranks many queries better and none worse: p = 0.5 ** better
    assert blend["weight"] > 0 and blend["alpha"] == 0.05 and evidence["worse"] == 0 and evidence["better"] >= 6
    # the epoch a run keeps is chosen on the ranking it serves, and its selection lines say which
    assert selection_ranking(chosen) == f"cosine + {blend['weight']:g} x ITM"
    assert selection_score(chosen, "R1") == chosen["t2i_blend"]["R1"] > chosen["t2i"]["R1"]
    assert evidence["p_value"] == pytest.approx(0.5 ** evidence["better"])
    assert evidence["threshold"] == pytest.approx(0.05 / 6)  # six non-zero weights in the grid
    # asking for more evidence than the queries give: the cosine order, and the blend's metrics are the cosine's
    strict = tiny_cfg(synth_root, "model.fusion_layers=1", "eval.rerank_top_k=10",
                      f"eval.rerank_blend_alpha={0.5 * evidence['p_value'] * 6}")
    results = evaluate_model(model, splits.test, tokenizer, strict, "cpu", "test")
    assert results["rerank_blend"]["weight"] == 0.0
    assert results["rerank_blend"]["evidence"] == {**evidence, "threshold": pytest.approx(0.5 * evidence["p_value"])}
    assert results["t2i_blend"] == results["t2i"]
    assert selection_ranking(results) == "the cosine order (blend weight 0)"
    assert selection_ranking({"t2i": results["t2i"]}) == "the cosine order"
    # alpha 0 never leaves the cosine order, not even for the oracle; a level above 1 is refused when the config
    # is built, before anything is evaluated
    never = tiny_cfg(synth_root, "model.fusion_layers=1", "eval.rerank_top_k=10", "eval.rerank_blend_alpha=0")
    assert evaluate_model(model, splits.test, tokenizer, never, "cpu", "test")["rerank_blend"]["weight"] == 0.0
    with pytest.raises(ValueError, match="'eval.rerank_blend_alpha' must be a finite number in \\[0.0, 1.0\\]"):
        tiny_cfg(synth_root, "eval.rerank_blend_alpha=1.5")


def test_rerank_only_reorders_the_top_k(splits, synth_root, tokenizer):
    cfg = tiny_cfg(synth_root, "model.fusion_layers=1", "eval.rerank_top_k=2")
    model = tiny_model(cfg)
    sets = build_eval_protocol(splits.test)
    _oracle_itm(model, sets, tokenizer, cfg)
    results = evaluate_model(model, splits.test, tokenizer, cfg, "cpu", "test")
    # R@1 after re-ranking = share of queries with a positive among the first-stage top 2 = plain R@2
    plain = retrieval_metrics(*_features(model, sets, tokenizer, cfg), sets.query_pids, sets.gallery_pids, ks=(2,))
    assert results["t2i_rerank"]["R1"] == pytest.approx(plain["R2"])
    assert results["t2i_rerank"]["R10"] == results["t2i"]["R10"]


def _features(model, sets, tokenizer, cfg):
    from datasets.transforms import build_test_transform

    txt = encode_texts(model, tokenizer, sets.texts, cfg.text.max_text_len, 64, "cpu", amp=False)
    img = encode_images(model, sets.image_paths, build_test_transform(cfg.input), 64, "cpu", amp=False)
    return txt, img


def test_rerank_without_fusion_is_an_error(splits, synth_root, tokenizer):
    cfg = tiny_cfg(synth_root, "eval.rerank_top_k=5")
    with pytest.raises(ValueError, match="needs a model with a fusion stack"):
        evaluate_model(tiny_model(cfg), splits.test, tokenizer, cfg, "cpu", "test")


# ----------------------------------------------------------------------------------------- evaluate.py
def test_evaluate_main_on_our_checkpoint(our_checkpoint, synth_root, tmp_path):
    import evaluate
    from engine.checkpoints import load_for_inference

    out = tmp_path / "out"
    results = evaluate.main(["--checkpoint", str(our_checkpoint), "--output-dir", str(out), "--save-examples", "2"])
    saved = json.loads((out / "metrics_test.json").read_text())
    for direction in ("t2i", "i2t"):
        assert set(saved[direction]) >= {"R1", "R5", "R10", "mAP", "mINP", "num_queries", "num_gallery"}
        assert saved[direction]["R1"] == pytest.approx(results[direction]["R1"])
        assert saved[direction]["R1"] <= saved[direction]["R5"] <= saved[direction]["R10"]
    assert saved["counts"] == {"queries": 20, "gallery_images": 10, "identities": 3}
    assert saved["t2i"]["R10"] == 100.0  # the gallery has 10 images
    assert saved["checkpoint"] == str(our_checkpoint)
    _, cfg, _, _ = load_for_inference(our_checkpoint, overrides=["eval.save_examples=2"])
    assert saved["config_digest"] == cfg.digest()
    assert saved["protocol"]["name"] == "standard" and saved["protocol"]["ap_formula"] == "standard"
    assert saved["environment"]["torch"] == str(torch.__version__)
    assert saved["environment"]["world_size"] == 1 and saved["environment"]["device"] == "cpu"
    assert sorted(p.name for p in (out / "examples_test").iterdir()) == ["index.html", "query_00000.png",
                                                                         "query_00019.png"]
    assert not list(out.glob("*.tmp"))


def test_evaluate_main_defaults_to_the_checkpoint_folder(our_checkpoint):
    import evaluate

    evaluate.main(["--checkpoint", str(our_checkpoint), "--split", "val"])
    # named after the checkpoint, so that a training run's own metrics_val.json stays as training wrote it
    assert not (our_checkpoint.parent / "metrics_val.json").exists()
    saved = json.loads((our_checkpoint.parent / "metrics_val_tiny.json").read_text())
    assert saved["split"] == "val" and saved["counts"]["queries"] == 16
    assert saved["epoch"] == -1  # the fixture stores epoch 0 = nothing trained yet: no finished epoch


def _official_state(synth_root: Path, vocab: int) -> dict[str, torch.Tensor]:
    """A tiny fine-tuned checkpoint in the authors' layout: 'module.encoder_vl.*' (the converter maps those
    names 1:1 onto our encoder) at their 384x128 stride-16 grid, plus their unused temp/classifier/bottleneck."""
    cfg = tiny_cfg(synth_root, "model.embed_dim=64", "model.num_heads=1", "input.image_size=[384,128]",
                   f"model.vocab_size={vocab}")
    encoder = tiny_model(cfg).encoder.state_dict()
    state = {"module.encoder_vl." + k: v for k, v in encoder.items()}
    state.update({"module.temp": torch.tensor(0.5),
                  "module.encoder_vl.embeddings.position_ids": torch.arange(512)[None],
                  "module.classifier_img.weight": torch.randn(5, 64), "module.bottleneck_img.weight": torch.ones(64),
                  "module.bottleneck_img.bias": torch.zeros(64), "module.bottleneck_img.running_mean": torch.zeros(64),
                  "module.bottleneck_img.running_var": torch.ones(64),
                  "module.bottleneck_img.num_batches_tracked": torch.tensor(0)})
    assert state["module.encoder_vl.pos_embed"].shape == (1, 193, 64)  # the authors' stride-16 grid, 24 x 8 + 1
    return state


def _bert_folder(path: Path, captions: list[str]) -> Path:
    """A BERT vocabulary folder of 1000 tokens holding the captions' words (the authors' path needs one)."""
    from datasets.tokenizer import SPECIAL_TOKENS, save_tokenizer, tokenizer_from_vocab

    words = sorted({w for c in captions for w in c.lower().replace(",", " , ").replace(".", " . ").split()})
    chars = sorted({ch for w in words for ch in w})
    tokens = list(SPECIAL_TOKENS) + chars + ["##" + ch for ch in chars] + [w for w in words if w not in chars]
    tokens += [f"[unused{i}]" for i in range(1000 - len(tokens))]
    return save_tokenizer(tokenizer_from_vocab(tokens, lowercase=True), path)


def test_evaluate_main_on_authors_checkpoint(splits, synth_root, tmp_path):
    import evaluate

    folder = _bert_folder(tmp_path / "bert", [r.caption for r in splits.train])
    ckpt = tmp_path / "authors" / "ivt_cuhk.pth"
    ckpt.parent.mkdir()
    torch.save({"state_dict": _official_state(synth_root, 1000), "epoch": 37, "best_acc": 0.6}, ckpt)
    results = evaluate.main(["--checkpoint", str(ckpt), f"data.root={synth_root}", f"text.tokenizer={folder}",
                             "input.image_size=[64,32]", "eval.batch_size=8", "data.num_workers=0"])
    saved = json.loads((ckpt.parent / "metrics_test_ivt_cuhk.json").read_text())
    assert saved["t2i"]["R1"] == pytest.approx(results["t2i"]["R1"])
    assert saved["epoch"] == 36  # the authors store the finished epoch + 1
    assert saved["counts"]["queries"] == 20 and saved["t2i"]["num_gallery"] == 10


# ---------------------------------------------------------------------------------------- bad input
def test_bad_checkpoints_give_one_line_errors(tmp_path, our_checkpoint):
    assert "checkpoint not found" in error_of(["--checkpoint", str(tmp_path / "nope.pth")])
    (tmp_path / "text.pth").write_text("not a checkpoint")
    assert "cannot be read as a PyTorch checkpoint" in error_of(["--checkpoint", str(tmp_path / "text.pth")])
    torch.save({"weights": torch.zeros(2), "iteration": 3}, tmp_path / "other.pth")
    message = error_of(["--checkpoint", str(tmp_path / "other.pth")])
    assert "neither one of our checkpoints" in message and "weights" in message
    # a config that does not fit the tensors names the first tensor that differs
    message = error_of(["--checkpoint", str(our_checkpoint), "model.embed_dim=64"])
    assert "shape" in message and "encoder." in message and "config does not match" in message
    assert "did you mean 'eval.batch_size'" in error_of(["--checkpoint", str(our_checkpoint), "eval.batch_sise=4"])


def test_empty_split_and_missing_images_give_one_line_errors(our_checkpoint, synth_root, tmp_path):
    raw = json.loads((synth_root / "reid_raw.json").read_text())
    (tmp_path / "noval.json").write_text(json.dumps([e for e in raw if e["split"] != "val"]))
    message = error_of(["--checkpoint", str(our_checkpoint), "--split", "val",
                        f"data.annotation_file={tmp_path / 'noval.json'}"])
    assert "split 'val'" in message and "is empty" in message
    moved = [e for e in raw if e["split"] == "test"]
    moved[0] = dict(moved[0], file_path="SYNTH/missing.jpg")
    (tmp_path / "missing.json").write_text(json.dumps([e for e in raw if e["split"] != "test"] + moved))
    message = error_of(["--checkpoint", str(our_checkpoint), f"data.annotation_file={tmp_path / 'missing.json'}",
                        f"--output-dir={tmp_path}"])
    assert "missing.jpg" in message
    assert not (tmp_path / "metrics_test.json").exists()


# ---------------------------------------------------------------------------------------- distributed
_SHARD_TOPK = torch.arange(19 * 3).reshape(19, 3) % 9  # distinct gallery indices per row


def _sharded_worker(rank: int, world: int, init_file: str, root: str, vocab: list, out: str) -> None:
    import torch.distributed as dist

    from datasets.readers import load_annotations
    from datasets.tokenizer import tokenizer_from_vocab
    from datasets.transforms import build_test_transform

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    cfg = tiny_cfg(Path(root), "model.fusion_layers=1")
    model = tiny_model(cfg)
    sets = build_eval_protocol(load_annotations("cuhkpedes", root).test)
    tok = tokenizer_from_vocab(vocab, True)
    transform = build_test_transform(cfg.input)
    img = encode_images(model, sets.image_paths[:9], transform, 4, "cpu", amp=False)
    txt = encode_texts(model, tok, sets.texts[:19], cfg.text.max_text_len, 4, "cpu", amp=False)
    itm = rerank_scores(model, tok, sets.texts[:19], sets.image_paths, _SHARD_TOPK, transform, 100, 8, "cpu", False)
    if rank == 0:
        torch.save({"img": img, "txt": txt, "itm": itm}, out)
    dist.destroy_process_group()


@pytest.mark.slow
def test_sharded_encoding_gathers_in_order(splits, synth_root, tokenizer, tmp_path):
    import torch.multiprocessing as mp

    from datasets.tokenizer import tokenizer_vocab
    from datasets.transforms import build_test_transform

    out = tmp_path / "gathered.pt"
    # 2 ranks over 9 images / 19 captions: uneven shards (5, 4) and (10, 9), so gathering must cut the padding
    mp.spawn(_sharded_worker, args=(2, str(tmp_path / "init"), str(synth_root), tokenizer_vocab(tokenizer), str(out)),
             nprocs=2, join=True)
    gathered = load_file(out)
    cfg = tiny_cfg(synth_root, "model.fusion_layers=1")
    model = tiny_model(cfg)
    sets = build_eval_protocol(splits.test)
    transform = build_test_transform(cfg.input)
    img = encode_images(model, sets.image_paths[:9], transform, 4, "cpu", amp=False)
    txt = encode_texts(model, tokenizer, sets.texts[:19], cfg.text.max_text_len, 4, "cpu", amp=False)
    itm = rerank_scores(model, tokenizer, sets.texts[:19], sets.image_paths, _SHARD_TOPK, transform, 100, 8, "cpu",
                        False)
    assert gathered["img"].shape == img.shape and gathered["txt"].shape == txt.shape
    assert gathered["itm"].shape == (19, 3)
    torch.testing.assert_close(gathered["itm"], itm, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gathered["img"], img, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(gathered["txt"], txt, atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------ fp32 ITM, ties
def test_itm_projection_runs_in_fp32_under_autocast(synth_root):
    cfg = tiny_cfg(synth_root, "model.fusion_layers=1")
    model = tiny_model(cfg)
    g = torch.Generator().manual_seed(0)
    text, image = torch.randn(5, 7, 32, generator=g), torch.randn(5, 9, 32, generator=g)
    mask = torch.ones(5, 7, dtype=torch.long)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model.itm_logits(text, mask, image)
        cls = model.fuse(text, mask, image)[:, 0]
        in_autocast = model.itm_head(cls)  # what the head alone gives inside autocast
    assert in_autocast.dtype == torch.bfloat16  # the premise: autocast would run the projection in bf16
    assert logits.dtype == torch.float32
    expected = torch.nn.functional.linear(cls.float(), model.itm_head.weight, model.itm_head.bias)
    assert torch.equal(logits, expected)
    assert not torch.equal(logits, in_autocast.float())


def test_rerank_ties_are_broken_by_cosine(splits, synth_root, tokenizer):
    """An ITM head that scores every pair the same leaves the cosine ranking exactly as it was (ties broken by
    gallery index instead would reorder the whole re-ranked gallery)."""
    cfg = tiny_cfg(synth_root, "model.fusion_layers=1", "eval.rerank_top_k=10")
    model = tiny_model(cfg)
    model.itm_logits = lambda text_tokens, *a, **k: torch.ones(text_tokens.shape[0], 2)
    results = evaluate_model(model, splits.test, tokenizer, cfg, "cpu", "test")
    for key in ("R1", "R5", "mAP", "mINP"):
        assert results["t2i_rerank"][key] == results["t2i"][key], key
    # the same scores tie-broken by gallery index give another ranking on this split
    sets = build_eval_protocol(splits.test)
    by_index = retrieval_metrics(torch.ones(20, 2), torch.ones(10, 2), sets.query_pids, sets.gallery_pids)
    assert by_index["mAP"] != pytest.approx(results["t2i"]["mAP"])


# ------------------------------------------------------------------------------------------ examples
def _ranked_case(tmp_path, monkeypatch, ranks: dict[int, int], n: int = 14):
    """n images of n persons (one caption each), features making query q's own image rank ranks.get(q, 0)
    (0-based); returns the records."""
    from PIL import Image

    import engine.evaluation as evaluation

    records = []
    for i in range(n):
        path = tmp_path / "imgs" / f"person_{i:02d}.jpg"
        path.parent.mkdir(exist_ok=True)
        Image.new("RGB", (16, 32), (20 * i % 255, 90, 255 - 15 * i)).save(path)
        records.append(Record(str(path), f"caption of person {i} <in a red coat>", i, i))
    base = [1.0 - 0.01 * j for j in range(n)]
    text = []
    for q in range(n):
        others = [base[j] for j in range(n) if j != q]
        r = ranks.get(q, 0)
        row = list(base)
        row[q] = 2.0 if r == 0 else (0.0 if r == n - 1 else (others[r - 1] + others[r]) / 2)
        text.append(row)
    monkeypatch.setattr(evaluation, "encode_images", lambda model, paths, *a, **k: torch.eye(n)[:len(paths)])
    monkeypatch.setattr(evaluation, "encode_texts", lambda model, tok, texts, *a, **k: torch.tensor(text))
    return records


def test_examples_pick_the_worst_and_show_the_first_true_match(tmp_path, monkeypatch, synth_root):
    from engine.evaluation import save_examples

    records = _ranked_case(tmp_path, monkeypatch, {0: 12, 9: 10, 3: 3, 5: 13})
    cfg = tiny_cfg(synth_root, "eval.save_examples=3", "eval.examples_pick=worst")
    results = evaluate_model(tiny_model(cfg), records, None, cfg, "cpu", "test")
    examples = results["examples"]
    assert examples["pick"] == "worst" and examples["query_indices"] == [5, 0, 9]
    assert examples["first_hit_rank"] == [14, 13, 11]
    assert examples["ap"] == pytest.approx([1 / 14, 1 / 13, 1 / 11])
    assert [m and (m["index"], m["rank"]) for m in examples["first_match"]] == [(5, 14), (0, 13), (9, 11)]
    assert all(len(row) == 10 and q not in row for q, row in zip([5, 0, 9], examples["indices"]))
    written = save_examples(tmp_path / "examples", results, records, cfg)
    assert [p.name for p in written] == ["query_00005.png", "query_00000.png", "query_00009.png", "index.html"]
    page = written[-1].read_text()
    assert "caption of person 5 &lt;in a red coat&gt;" in page and "<in a red" not in page
    assert "rank 14" in page and "rank 13" in page and "person_09.jpg" in page
    assert page.index("query_00005.png") < page.index("query_00000.png") < page.index("query_00009.png")

    # spread: evenly over the split; a query with its match in the top 10 gets no extra thumbnail
    cfg = tiny_cfg(synth_root, "eval.save_examples=3")
    examples = evaluate_model(tiny_model(cfg), records, None, cfg, "cpu", "test")["examples"]
    assert examples["query_indices"] == [0, 6, 13] and examples["first_hit_rank"] == [13, 1, 1]
    assert examples["first_match"][1:] == [None, None] and examples["first_match"][0]["rank"] == 13


def test_rerank_recipes_take_rasas_k():
    root = Path(__file__).resolve().parents[1] / "configs"
    for name in ("cuhkpedes", "icfg", "rstp"):
        assert load_config(root / f"{name}_rerank.yaml").eval.rerank_top_k == 128, name
        assert load_config(root / f"{name}_rerank.yaml", ["eval.rerank_top_k=64"]).eval.rerank_top_k == 64
    assert load_config(root / "demo_rerank.yaml").eval.rerank_top_k == 16
    assert load_config(root / "cuhkpedes.yaml").eval.rerank_top_k == 0
