"""ITM negatives made by exchanging two attribute words of a caption (loss.itm_swap_words): the swap itself, the
collator's swapped captions, their weight in the ITM loss, the config's checks, and bench/bench_word_swaps."""
from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import train_cuhkpedes
from bench import bench_word_swaps
from bench.bench_word_swaps import preference, word_list
from datasets.build import build_train_loader, swap_words_of
from datasets.collate import TrainCollator, swap_two_words
from datasets.tokenizer import build_tokenizer
from engine.data import build_run_tokenizer, load_data, load_eval_splits
from models.config import ModelConfigError
from models.losses import itc_loss
from models.ivt import build_model
from models.objectives import RetrievalObjective
from tests.tiny import tiny_overrides
from utils.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
COLOURS = ("black", "white", "red", "blue", "green", "pink")


@pytest.mark.parametrize("caption, swapped", [
    ("a pink short-sleeved shirt, green shorts.", "a green short-sleeved shirt, pink shorts."),
    # the first colour and the next *different* one; a repeat of the first is passed over
    ("black hair, black shoes and a red bag", "red hair, black shoes and a black bag"),
    ("Pink shirt and GREEN shorts", "GREEN shirt and Pink shorts"),  # case-insensitive, each word as written
    ("a blue coat", None),                      # one colour: nothing to exchange
    ("a blue coat and blue jeans", None),       # two, but the same
    ("a redhead in a whitewashed blue coat", None),  # whole words only: "redhead" is no "red"
    ("a pink white skirt", None),                # one compound colour is no pair, with a space
    ("a blue-green coat", None),                 # or a hyphen between its words
    ("a pink white skirt and green shoes", "a green white skirt and pink shoes"),  # pink's partner: green, not white
])
def test_two_different_words_are_exchanged(caption, swapped):
    assert swap_two_words(caption, frozenset(COLOURS)) == swapped


def first_batch(cfg):
    """The first training batch the loader of ``cfg`` gives."""
    records, _ = load_data(cfg)
    loader, sampler, dataset = build_train_loader(cfg, records, build_run_tokenizer(cfg, records, None))
    sampler.set_epoch(0)
    dataset.set_epoch(0)
    return next(iter(loader))


def _items(captions):
    return [{"images": torch.zeros(1, 3, 4, 2), "texts": [c], "caption": c, "pid": i, "index": i, "rng_seed": i}
            for i, c in enumerate(captions)]


def test_the_collator_tokenizes_the_swapped_captions_beside_the_captions():
    captions = ["a pink shirt and green shorts", "a blue coat", "red shoes and a black bag"]
    cfg = load_config(overrides=["text.tokenizer=train", "text.tokenizer_vocab_size=80"]).text
    tokenizer = build_tokenizer(cfg, captions * 20)
    plain = TrainCollator(tokenizer, 32, ("sentence",))(_items(captions))
    batch = TrainCollator(tokenizer, 32, ("sentence",), swap_words=COLOURS)(_items(captions))
    assert "swap_ids" not in plain
    assert torch.equal(batch["caption_ids"], plain["caption_ids"])  # the swaps change nothing else
    assert batch["swap_rows"].tolist() == [0, 2]  # "a blue coat" has no two colours to exchange
    assert batch["swap_ids"].shape == (2, batch["caption_ids"].shape[1])
    decoded = [tokenizer.decode(ids, skip_special_tokens=True) for ids in batch["swap_ids"]]
    assert decoded == ["a green shirt and pink shorts", "black shoes and a red bag"]
    none = TrainCollator(tokenizer, 32, ("sentence",), swap_words=COLOURS)(_items(["a blue coat"]))
    assert none["swap_rows"].shape == (0,) and none["swap_ids"].shape[0] == 0


def test_the_loader_makes_swaps_only_when_a_loss_reads_them(tmp_path):
    base = tiny_overrides(tmp_path / "data") + [f"loss.itm_swap_words=[{','.join(COLOURS)}]"]
    cfg = load_config(None, base)
    assert swap_words_of(cfg) == ()  # itm_weight 0: no ITM, no swapped captions to tokenize
    itc = ["loss.itc_weight=1", "loss.itc_normalize=true"]
    assert swap_words_of(load_config(None, base + itc)) == ()  # ITC alone reads them only when told to
    assert swap_words_of(load_config(None, base + itc + ["loss.itc_swap_negatives=true"])) == COLOURS
    cfg = load_config(None, base + ["model.fusion_layers=1", "loss.itm_weight=1"])
    batch = first_batch(cfg)
    rows = batch["swap_rows"]
    assert 0 < rows.numel() <= batch["caption_ids"].shape[0] and batch["swap_ids"].shape[0] == rows.numel()
    assert (batch["swap_ids"] != batch["caption_ids"][rows]).any(dim=1).all()  # every row is a real swap
    with pytest.raises(ConfigError, match="expects list"):  # the config loader's own type check
        load_config(None, base + ["loss.itm_weight=1", "loss.itm_swap_words=red"])
    with pytest.raises(ConfigError, match=r"loss.itm_swap_words must be a list of words, got \('red', 3\)"):
        swap_words_of(load_config(None, base + ["loss.itm_weight=1", "loss.itm_swap_words=[red,3]"]))


@pytest.mark.parametrize("reading", [[], ["model.fusion_reads_block=1", "model.itm_residual=true"]],
                         ids=["output-tokens", "block-1-residual"])
def test_each_swapped_caption_is_one_more_negative_of_the_itm_cross_entropy(tmp_path, reading):
    """The loss over 3B + S pairs is the pairs' mean: (3B * the loss without swaps + S * the swapped pairs'
    cross-entropy against 'no match') / (3B + S), the swapped pairs scored by the same head on their own (from
    the tokens the fusion stack reads, with each pair's own cosine as the residual head's prior)."""
    overrides = tiny_overrides(tmp_path / "data") + [
        "model.fusion_layers=1", "loss.itm_weight=1", "loss.cmpm_weight=0", "model.bmm_ratio=0",
        f"loss.itm_swap_words=[{','.join(COLOURS)}]", *reading]
    cfg = load_config(None, overrides)
    batch = first_batch(cfg)
    torch.manual_seed(0)
    objective = RetrievalObjective(build_model(cfg), cfg.loss).eval()  # eval: no dropout, so passes compare
    torch.manual_seed(1)
    with_swaps = objective(batch)["itm_loss"]
    torch.manual_seed(1)  # the same hard negatives
    without = objective({k: v for k, v in batch.items() if not k.startswith("swap_")})["itm_loss"]
    model, rows = objective.model, batch["swap_rows"]
    b, s = batch["pids"].shape[0], rows.numel()
    assert 0 < s <= b
    with torch.no_grad():
        image_tokens, image_feats = model.encode_image(batch["images"][:b], for_fusion=True)
        swap_tokens, swap_feats = model.encode_text(batch["swap_ids"], batch["swap_mask"], bmm=False, for_fusion=True)
        logits = model.itm_logits(swap_tokens, batch["swap_mask"], image_tokens[rows],
                                  features=(swap_feats, image_feats[rows]))
    swapped = F.cross_entropy(logits, torch.zeros(s, dtype=torch.long))
    torch.testing.assert_close(with_swaps, (3 * b * without + s * swapped) / (3 * b + s), rtol=1e-5, atol=1e-6)


def test_the_residual_prior_of_every_itm_pair_is_that_pairs_own_cosine(tmp_path):
    """The objective hands itm_logits each pair's global features beside its tokens (positives, both kinds of hard
    negatives, swaps): read from the output tokens, a feature is the pooled tokens of the same row."""
    cfg = load_config(None, tiny_overrides(tmp_path / "data") + [
        "model.fusion_layers=1", "loss.itm_weight=1", "loss.cmpm_weight=0", "model.itm_residual=true",
        "loss.itc_weight=1", "loss.itc_normalize=true", f"loss.itm_swap_words=[{','.join(COLOURS)}]"])
    batch = first_batch(cfg)
    objective = RetrievalObjective(build_model(cfg), cfg.loss)
    model, calls = objective.model, []
    original = model.itm_logits
    model.itm_logits = lambda *args, **kw: (calls.append((args, kw)), original(*args, **kw))[1]
    objective(batch)
    (text_tokens, text_mask, image_tokens), kw = calls[0]
    b, s = batch["pids"].shape[0], batch["swap_rows"].numel()
    assert text_tokens.shape[0] == 3 * b + s > 3 * b
    text_feats, image_feats = (F.normalize(f.detach(), dim=-1) for f in kw["features"])
    torch.testing.assert_close(text_feats, F.normalize(model.global_feature(text_tokens, text_mask).detach(), dim=-1))
    torch.testing.assert_close(image_feats, F.normalize(model.global_feature(image_tokens, None).detach(), dim=-1))


def test_swaps_need_the_match_objective(tmp_path):
    cfg = load_config(None, tiny_overrides(tmp_path / "data") + [
        "model.fusion_layers=1", "loss.itm_weight=1", "loss.itm_objective=rank", "loss.itm_swap_words=[red,blue]"])
    with pytest.raises(ModelConfigError, match="itm_swap_words .* needs loss.itm_objective match"):
        RetrievalObjective(build_model(cfg), cfg.loss)


def test_a_random_pair_over_the_draws_covers_every_pair_of_different_words():
    # four colour words, two of them "black": 6 pairs of places, 5 of them two different words
    caption = "black hair, a red coat, black shoes and a blue bag"
    draws = {swap_two_words(caption, frozenset(COLOURS), random.Random(seed)) for seed in range(200)}
    assert draws == {"red hair, a black coat, black shoes and a blue bag",
                     "blue hair, a red coat, black shoes and a black bag",
                     "black hair, a blue coat, black shoes and a red bag",
                     "black hair, a black coat, red shoes and a blue bag",
                     "black hair, a red coat, blue shoes and a black bag"}


def test_preference_counts_ties_half():
    own, swapped = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([0.0, 2.0, 5.0, 3.0])
    assert preference(own, swapped) == 62.5  # (1 + 0.5 + 0 + 1) / 4


def test_a_run_with_swaps_trains_and_the_bench_scores_each_caption_against_its_swap(tmp_path):
    """End to end: a tiny re-rank run with swapped-caption negatives, then bench/bench_word_swaps on its
    checkpoint, which reads the words from the checkpoint and counts every caption with two different ones."""
    data, run = tmp_path / "data", tmp_path / "run"
    words = f"loss.itm_swap_words=[{','.join(COLOURS)}]"
    train_cuhkpedes.main(["--config", str(ROOT / "configs" / "demo_rerank.yaml"), "--output-dir", str(run)]
                         + tiny_overrides(data, epochs=1, steps=2) + ["model.fusion_layers=1", "eval.rerank_top_k=4",
                                                                      words])
    assert "itm_loss=" in (run / "log.txt").read_text()
    record = bench_word_swaps.main(["--checkpoint", str(run / "best.pth"), "--data-root", str(data),
                                    "--splits", "test", "--out", str(tmp_path / "swaps.json")])
    cfg = load_config(None, tiny_overrides(data))
    test = load_eval_splits(cfg).split("test")
    swappable = sum(swap_two_words(r.caption.lower(), frozenset(COLOURS)) is not None for r in test)
    assert record["words"] == sorted(COLOURS)
    assert record["test"]["captions"] == len(test) and record["test"]["swappable"] == swappable > 0
    assert set(record["test"]["prefers_caption"]) == {"cosine", "itm", "itm_head_alone"}  # demo_rerank: residual
    assert all(0 <= share <= 100 for share in record["test"]["prefers_caption"].values())
    caption, swapped = record["test"]["example"].values()
    assert swapped == swap_two_words(caption, frozenset(COLOURS)) != caption
    # the list as a config writes it measures the same; words no caption holds are an error, not a record
    same = bench_word_swaps.main(["--checkpoint", str(run / "best.pth"), "--data-root", str(data), "--splits", "test",
                                  "--words", f"[{','.join(COLOURS)}]"])
    assert same["test"] == record["test"]
    with pytest.raises(SystemExit, match="no test caption holds two different of the 2 words .*nothing measured"):
        bench_word_swaps.main(["--checkpoint", str(run / "best.pth"), "--data-root", str(data), "--splits", "test",
                               "--words", "mauve", "taupe", "--out", str(tmp_path / "none.json")])
    assert not (tmp_path / "none.json").exists()


@pytest.mark.parametrize("arguments, words", [
    (["red", "Blue"], ["red", "blue"]),
    (["[red,blue,navy-blue]"], ["red", "blue", "navy-blue"]),  # as loss.itm_swap_words=[...] is written
    (["red,", "blue"], ["red", "blue"]),
])
def test_the_word_list_is_read_in_either_form(arguments, words):
    assert word_list(arguments) == words


def test_a_word_list_with_something_not_a_word_is_an_error():
    with pytest.raises(SystemExit, match=r"--words: 'red;blue' is not a word"):
        word_list(["red;blue"])


def test_swapped_captions_join_the_image_to_text_softmax_only():
    images = texts = torch.eye(2)
    negatives = torch.tensor([[1.0, 0.0]])  # as close to image 0 as its own caption
    loss = itc_loss(images, texts, torch.tensor([0, 1]), torch.tensor([0, 1]), torch.tensor(1.0),
                    negative_texts=negatives)
    e = math.e
    i2t = (-math.log(e / (2 * e + 1)) - math.log(e / (e + 2))) / 2  # rows [1, 0, 1] and [0, 1, 0]
    t2i = -math.log(e / (e + 1))  # unchanged: a swapped caption has no image of its own
    assert loss.item() == pytest.approx(0.5 * (i2t + t2i), rel=1e-6)
    plain = itc_loss(images, texts, torch.tensor([0, 1]), torch.tensor([0, 1]), torch.tensor(1.0))
    assert plain.item() == pytest.approx(t2i, rel=1e-6)


def test_the_objective_hands_the_swapped_captions_to_itc_when_told(tmp_path):
    """Each extra negative adds to the image-to-text softmax's denominator, so the ITC loss of the same batch
    rises with them, and only with loss.itc_swap_negatives."""
    overrides = tiny_overrides(tmp_path / "data") + [
        "loss.itc_weight=1", "loss.itc_normalize=true", "loss.cmpm_weight=0", "model.bmm_ratio=0",
        "loss.itc_swap_negatives=true", f"loss.itm_swap_words=[{','.join(COLOURS)}]"]
    cfg = load_config(None, overrides)
    batch = first_batch(cfg)
    torch.manual_seed(0)
    model = build_model(cfg)
    with_swaps = RetrievalObjective(model, cfg.loss).eval()(batch)["itc_loss"]
    told_not = load_config(None, overrides + ["loss.itc_swap_negatives=false"]).loss
    without = RetrievalObjective(model, told_not).eval()(batch)["itc_loss"]
    stripped = RetrievalObjective(model, cfg.loss).eval()({k: v for k, v in batch.items() if not k.startswith("swap_")})
    assert with_swaps.item() > without.item() == pytest.approx(stripped["itc_loss"].item(), rel=1e-6)


def test_the_mlm_verdict_masks_both_exchanged_words_and_reads_each_at_its_place(tmp_path):
    """bench_word_swaps.mlm_scores in batches of padded captions equals the same sum of log-probabilities taken
    one pair at a time; a swap that changes the token count is skipped and counted."""
    from datasets.synthetic import make_synthetic
    from engine.explanation import pixels_of

    root = make_synthetic("cuhkpedes", tmp_path / "data", num_ids=6, seed=0)
    cfg = load_config(None, tiny_overrides(root) + ["model.fusion_layers=1"])
    test = load_eval_splits(cfg).split("test")[:5]
    captions = [r.caption.lower() for r in test]
    tokenizer = build_tokenizer(cfg.text, captions * 20)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    swaps = [swap_two_words(c, frozenset(COLOURS)) for c in captions]
    kept = [i for i, s in enumerate(swaps) if s is not None][:4]
    assert len(kept) >= 3
    texts, swapped = [captions[i] for i in kept], [swaps[i] for i in kept]
    swapped[-1] = swapped[-1] + " and more words"  # another length: not a two-word exchange
    paths = [test[i].image_path for i in kept]
    with torch.inference_mode():
        own, other, skipped = bench_word_swaps.mlm_scores(model, cfg, tokenizer, texts, swapped, paths, batch_size=2)
        assert skipped == 1 and own.shape == other.shape == (len(kept) - 1,)
        for row in range(len(kept) - 1):
            ids = torch.tensor([tokenizer(texts[row])["input_ids"]])
            places = (ids[0] != torch.tensor(tokenizer(swapped[row])["input_ids"])).nonzero().squeeze(1)
            a, b = ids[0, places].tolist()
            masked = ids.clone()
            masked[0, places] = tokenizer.mask_token_id
            at = torch.zeros_like(ids, dtype=torch.bool)
            at[0, places] = True
            image_tokens, _ = model.encode_image(pixels_of(cfg, [paths[row]], "cpu"), bmm=False)
            text_tokens, _ = model.encode_text(masked, torch.ones_like(ids), bmm=False)
            logp = torch.log_softmax(model.mlm_logits(text_tokens, torch.ones_like(ids), image_tokens, positions=at),
                                     dim=-1)
            torch.testing.assert_close(own[row], logp[0, a] + logp[1, b], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(other[row], logp[0, b] + logp[1, a], rtol=1e-4, atol=1e-5)
