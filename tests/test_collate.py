"""Collation (view-major images, level-major texts, one tokenizer call), MLM masking statistics and rules,
per-item determinism of TrainDataset, and the DataLoader built from a config (workers, resume, pretraining)."""
import itertools
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datasets.build import build_train_loader, set_train_epoch
from datasets.collate import IGNORE_INDEX, MlmSettings, TrainCollator, mask_tokens
from datasets.records import Record
from datasets.sampler import IdentitySampler, ShardedShuffleSampler
from datasets.tokenizer import build_tokenizer
from datasets.train_data import EvalImageDataset, TrainDataset
from datasets.transforms import build_train_transform
from utils.config import load_config

COLOURS = ["red", "black", "white", "blue", "grey", "yellow", "purple"]
ITEMS = ["jacket", "backpack", "trousers", "sneakers", "handbag", "umbrella", "skateboard"]


def captions(n):
    rng = random.Random(0)
    out = []
    for _ in range(n):
        words = [f"{rng.choice(COLOURS)} {rng.choice(ITEMS)}" for _ in range(rng.randint(1, 4))]
        out.append("A person with " + " and ".join(words) + rng.choice([".", ", walking.", " ok"]))
    return out


@pytest.fixture(scope="module")
def tok():
    # A small vocabulary, so that rarer words split into several '##' pieces.
    cfg = load_config(overrides=["text.tokenizer=train", "text.tokenizer_vocab_size=60"]).text
    return build_tokenizer(cfg, captions(300))


def fake_items(b=3, views=2, levels=3):
    items = []
    for i in range(b):
        images = torch.stack([torch.full((3, 4, 2), float(10 * i + v)) for v in range(views)])
        texts = [f"{COLOURS[lv]} {ITEMS[i]}" + " red" * (i + lv) for lv in range(levels)]
        items.append(
            {"images": images, "texts": texts, "caption": texts[-1], "pid": 100 + i, "index": 7 + i, "rng_seed": i}
        )
    return items


def decode(tok, ids):
    return tok.decode(ids, skip_special_tokens=True)


# ---------------------------------------------------------------- collation


def test_collate_orders_and_shapes(tok):
    items = fake_items()
    batch = TrainCollator(tok, 64, ("word", "phrase", "sentence"))(items)
    b, v, l = 3, 2, 3
    assert batch["images"].shape == (v * b, 3, 4, 2)
    for view, i in itertools.product(range(v), range(b)):  # view-major
        assert torch.all(batch["images"][view * b + i] == 10 * i + view)
    assert batch["image_pids"].tolist() == [100, 101, 102] * v
    assert batch["pids"].tolist() == [100, 101, 102] and batch["indices"].tolist() == [7, 8, 9]
    t = batch["text_ids"].shape[1]
    assert batch["text_ids"].shape == batch["text_mask"].shape == (l * b, t)
    for level, i in itertools.product(range(l), range(b)):  # level-major
        assert decode(tok, batch["text_ids"][level * b + i]) == items[i]["texts"][level]
    assert batch["text_pids"].tolist() == [100, 101, 102] * l
    # padding to the longest text of the whole call: the longest row has no padding
    assert batch["text_mask"].sum(1).max() == t
    assert torch.equal(batch["caption_ids"], batch["text_ids"][2 * b :])
    assert torch.equal(batch["caption_mask"], batch["text_mask"][2 * b :])
    assert "mlm_ids" not in batch


def test_collate_without_sentence_level_adds_captions_to_the_same_call(tok):
    items = fake_items(levels=2)
    for item in items:
        item["caption"] = "a person with a purple skateboard " + "blue " * 6
    batch = TrainCollator(tok, 64, ("word", "phrase"))(items)
    assert batch["text_ids"].shape[0] == 6
    assert batch["caption_ids"].shape[1] == batch["text_ids"].shape[1]  # one call, one T
    assert decode(tok, batch["caption_ids"][1]) == items[1]["caption"].strip()
    assert batch["text_mask"].sum(1).max() < batch["text_ids"].shape[1]  # texts padded to the caption length


def test_collate_truncates_at_max_text_len(tok):
    items = fake_items(levels=1)
    items[0]["texts"] = ["red " * 50]
    batch = TrainCollator(tok, 8, ("sentence",))(items)
    assert batch["text_ids"].shape == (3, 8)
    assert batch["text_ids"][0, -1].item() == tok.sep_token_id and batch["text_mask"][0].all()


def test_collate_rejects_wrong_level_count(tok):
    with pytest.raises(ValueError, match="expected 3"):
        TrainCollator(tok, 16, ("word", "phrase", "sentence"))(fake_items(levels=2))


# ---------------------------------------------------------------- MLM


def encode(tok, texts, max_len=40):
    enc = tok(texts, padding="longest", truncation=True, max_length=max_len, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"], [enc.word_ids(i) for i in range(len(texts))]


def run_mask(tok, settings, texts, seed=0):
    ids, mask, words = encode(tok, texts)
    gen = torch.Generator().manual_seed(seed)
    masked, labels = mask_tokens(
        ids, mask, words, settings, tok.mask_token_id, tok.all_special_ids, len(tok), gen
    )
    return ids, mask, words, masked, labels


def test_mask_hand_checked_single_choice(tok):
    settings = MlmSettings(mlm_prob=0.5, mlm_max_masks=8, mlm_ngram_prob=0.0, mlm_mask_token_prob=1.0,
                           mlm_random_token_prob=0.0)
    ids = torch.tensor([[2, 10, 11, 3, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    words = [[None, 0, 1, None, None]]
    for seed in range(10):
        masked, labels = mask_tokens(ids, mask, words, settings, 4, [0, 1, 2, 3, 4], 60,
                                     torch.Generator().manual_seed(seed))
        chosen = (labels != IGNORE_INDEX).nonzero()[:, 1].tolist()
        assert chosen in ([1], [2])  # round(0.5 * 2) = 1 of the two real tokens
        assert labels[0, chosen[0]] == ids[0, chosen[0]] and masked[0, chosen[0]] == 4
        keep = [p for p in range(5) if p != chosen[0]]
        assert torch.equal(masked[0, keep], ids[0, keep])


def test_mask_budget_counts_cls_as_the_authors():
    # [CLS] a b [SEP]: two real tokens. Ours: round(0.5 * 2) = 1. The authors' length counts [CLS] (their
    # captions have no [SEP]): round(0.5 * 3) = 2, i.e. both words, and [CLS] / [SEP] are still never masked.
    ids = torch.tensor([[2, 10, 11, 3, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    words = [[None, 0, 1, None, None]]
    for count_cls, expected in ((False, 1), (True, 2)):
        settings = MlmSettings(mlm_prob=0.5, mlm_max_masks=8, mlm_ngram_prob=0.0, mlm_count_cls=count_cls)
        for seed in range(5):
            _, labels = mask_tokens(ids, mask, words, settings, 4, [0, 1, 2, 3, 4], 60,
                                    torch.Generator().manual_seed(seed))
            chosen = (labels != IGNORE_INDEX).nonzero()[:, 1].tolist()
            assert len(chosen) == expected and set(chosen) <= {1, 2}


def test_mask_rate_counting_cls_is_exact(tok):
    settings = MlmSettings(mlm_prob=0.25, mlm_max_masks=8, mlm_whole_word=False, mlm_count_cls=True)
    ids, mask, _, _, labels = run_mask(tok, settings, captions(200))
    real = (mask.bool() & ~torch.isin(ids, torch.tensor(tok.all_special_ids))).sum(1)
    # the authors' n_pred = min(8, max(1, round(0.25 * len([CLS] + wordpieces))))
    expected = [min(8, max(1, round(0.25 * (1 + r)))) for r in real.tolist()]
    assert (labels != IGNORE_INDEX).sum(1).tolist() == expected
    assert expected != [min(8, max(1, round(0.25 * r))) for r in real.tolist()]  # the two counts differ here


def test_mask_never_touches_special_or_padding_and_respects_counts(tok):
    texts = captions(400)
    settings = MlmSettings(mlm_max_masks=8)
    ids, mask, words, masked, labels = run_mask(tok, settings, texts)
    special = torch.isin(ids, torch.tensor(tok.all_special_ids)) | (mask == 0)
    assert (labels[special] == IGNORE_INDEX).all()
    assert torch.equal(masked[special], ids[special])
    chosen = labels != IGNORE_INDEX
    assert torch.equal(labels[chosen], ids[chosen])
    assert (masked[~chosen] == ids[~chosen]).all()
    counts = chosen.sum(1)
    real = (~special).sum(1)
    assert (counts <= 8).all() and (counts >= 1).all()
    budget = torch.clamp(torch.round(0.25 * real.double()).clamp(min=1), max=8)
    assert (counts <= budget).float().mean() > 0.97  # only rows whose words are all longer than the budget exceed


def test_mask_rate_without_whole_word_is_exact(tok):
    settings = MlmSettings(mlm_prob=0.3, mlm_max_masks=100, mlm_whole_word=False)
    ids, mask, _, _, labels = run_mask(tok, settings, captions(200))
    real = (mask.bool() & ~torch.isin(ids, torch.tensor(tok.all_special_ids))).sum(1)
    expected = [min(100, max(1, round(0.3 * r))) for r in real.tolist()]
    assert (labels != IGNORE_INDEX).sum(1).tolist() == expected


def test_mask_rate_whole_word_within_tolerance(tok):
    settings = MlmSettings(mlm_prob=0.25, mlm_max_masks=100)
    ids, mask, _, _, labels = run_mask(tok, settings, captions(500), seed=1)
    real = (mask.bool() & ~torch.isin(ids, torch.tensor(tok.all_special_ids))).sum()
    rate = (labels != IGNORE_INDEX).sum().item() / real.item()
    assert abs(rate - 0.25) < 0.03


def test_mask_whole_words(tok):
    settings = MlmSettings(mlm_prob=0.25, mlm_max_masks=8, mlm_ngram_prob=0.3)
    ids, mask, words, _, labels = run_mask(tok, settings, captions(300), seed=2)
    pieces = sum(1 for row in words for a, b in zip(row, row[1:]) if a is not None and a == b)
    assert pieces > 100  # the tiny vocabulary splits words, so the test is meaningful
    chosen = (labels != IGNORE_INDEX).tolist()
    for row, flags in zip(words, chosen):
        hit = {row[p] for p, f in enumerate(flags) if f}
        for p, w in enumerate(row):
            if w in hit:
                assert flags[p], "a word was masked only partly"


def test_mask_replacement_proportions(tok):
    settings = MlmSettings(mlm_prob=0.5, mlm_max_masks=100, mlm_whole_word=False)
    ids, _, _, masked, labels = run_mask(tok, settings, captions(2000), seed=3)
    chosen = labels != IGNORE_INDEX
    n = chosen.sum().item()
    assert n > 5000
    as_mask = (masked[chosen] == tok.mask_token_id).sum().item() / n
    unchanged = (masked[chosen] == ids[chosen]).sum().item() / n
    randomised = 1 - as_mask - unchanged
    assert abs(as_mask - 0.8) < 0.02 and abs(randomised - 0.1) < 0.015 and abs(unchanged - 0.1) < 0.015
    swapped = masked[chosen & (masked != tok.mask_token_id) & (masked != ids)]
    assert not torch.isin(swapped, torch.tensor(tok.all_special_ids)).any()
    assert swapped.max() < len(tok) and swapped.min() >= 0


def test_ngram_spans_make_contiguous_runs(tok):
    texts = captions(300)

    def mean_runs(ngram):
        settings = MlmSettings(mlm_prob=0.3, mlm_max_masks=100, mlm_whole_word=False, mlm_ngram_prob=ngram)
        flags = (run_mask(tok, settings, texts, seed=4)[4] != IGNORE_INDEX).int()
        starts = flags[:, 0] + (flags[:, 1:] - flags[:, :-1]).clamp(min=0).sum(1)
        return starts.float().mean().item(), flags.sum().item()

    runs_single, n_single = mean_runs(0.0)
    runs_spans, n_spans = mean_runs(1.0)
    assert n_single == n_spans  # same number of masked tokens
    assert runs_spans < 0.75 * runs_single  # but grouped into fewer contiguous runs


def test_collator_mlm_is_deterministic_in_item_seeds(tok):
    collate = TrainCollator(tok, 64, ("sentence",), MlmSettings(mlm_prob=0.4))
    items = fake_items(b=4, levels=1)
    first, again = collate(items), collate(items)
    assert torch.equal(first["mlm_ids"], again["mlm_ids"]) and torch.equal(first["mlm_labels"], again["mlm_labels"])
    assert first["mlm_ids"].shape == first["caption_ids"].shape
    changed = [dict(item, rng_seed=item["rng_seed"] + 1000) for item in items]
    assert not torch.equal(collate(changed)["mlm_labels"], first["mlm_labels"])


def test_mlm_settings_from_config():
    cfg = load_config(overrides=["text.mlm_prob=0.3", "text.mlm_max_masks=5", "text.mlm_whole_word=false"]).text
    s = MlmSettings.from_config(cfg)
    assert (s.mlm_prob, s.mlm_max_masks, s.mlm_whole_word, s.mlm_ngram_prob) == (0.3, 5, False, 0.2)
    assert (s.mlm_mask_token_prob, s.mlm_random_token_prob) == (0.8, 0.1)
    assert not s.mlm_count_cls  # fine-tuning MLM (the re-ranking recipes) as before
    assert MlmSettings.from_config(load_config(Path(__file__).resolve().parents[1] / "configs" / "pretrain.yaml").text
                                   ).mlm_count_cls
    with pytest.raises(ValueError, match="mlm_mask_token_prob"):
        MlmSettings(mlm_mask_token_prob=0.95, mlm_random_token_prob=0.1)


# ---------------------------------------------------------------- datasets and loader


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    caps = captions(24)
    out = []
    for i in range(24):
        path = root / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (40, 20, 3), dtype=np.uint8)).save(path)
        phrases = ("red hat", "blue bag") if i % 3 == 0 else None
        out.append(Record(str(path), caps[i], pid=i // 4, image_id=i, phrases=phrases))
    return out


def small_cfg(*overrides):
    # P x K only exists in retrieval; pretraining batches are plain shuffles.
    pretrain = "task=pretrain" in overrides
    return load_config(
        overrides=[
            "input.image_size=[32,16]",
            "train.batch_size_per_gpu=4",
            *([] if pretrain else ["sampler.num_instances=2"]),
            "data.num_workers=0",
            "text.max_text_len=32",
            *overrides,
        ]
    )


def make_dataset(records, seed=0, erasing=1.0):
    transform = build_train_transform(small_cfg(f"input.random_erasing_prob={erasing}").input)
    return TrainDataset(records, transform, num_views=3, levels=("word", "phrase", "sentence"), seed=seed)


def test_train_item_is_a_pure_function_of_seed_epoch_index(records):
    ds = make_dataset(records)
    first = ds[5]
    assert first["images"].shape == (3, 3, 32, 16)
    assert not torch.equal(first["images"][0], first["images"][1])  # views are augmented independently
    assert first["caption"] == records[5].caption.lower() and first["texts"][2] == first["caption"]
    assert first["pid"] == 1 and first["index"] == 5
    # unrelated draws and other items in between change nothing, and the global RNG states are untouched
    torch.manual_seed(123)
    random.seed(123)
    torch_state, py_state = torch.get_rng_state(), random.getstate()
    _ = [ds[i] for i in range(8)]
    again = ds[5]
    assert torch.equal(torch.get_rng_state(), torch_state) and random.getstate() == py_state
    assert torch.equal(first["images"], again["images"]) and first["texts"] == again["texts"]
    assert first["rng_seed"] == again["rng_seed"]
    other = make_dataset(records)  # a fresh instance (another worker) gives the same item
    assert torch.equal(other[5]["images"], first["images"])
    ds.set_epoch(1)
    assert not torch.equal(ds[5]["images"], first["images"]) and ds[5]["rng_seed"] != first["rng_seed"]
    assert not torch.equal(make_dataset(records, seed=1)[5]["images"], first["images"])


def test_train_item_missing_image_names_record(records, tmp_path):
    broken = [Record(str(tmp_path / "gone.png"), "a man", 0, 0)]
    with pytest.raises(FileNotFoundError, match=r"training record 0: .*gone.png"):
        make_dataset(broken)[0]


def test_eval_image_dataset(records):
    ds = EvalImageDataset([r.image_path for r in records[:3]], build_train_transform(small_cfg().input))
    image, index = ds[2]
    assert image.shape == (3, 32, 16) and index == 2 and len(ds) == 3


def run_epoch(loader):
    return [{k: v.clone() for k, v in batch.items()} for batch in loader]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            assert torch.equal(x[key], y[key]), key


def test_loader_is_identical_across_workers_and_resumes_exactly(records, tok):
    cfg = small_cfg("loss.mlm_weight=1.0")
    loader, sampler, dataset = build_train_loader(cfg, records, tok)
    assert isinstance(sampler, IdentitySampler) and loader.batch_size == 4
    set_train_epoch(sampler, dataset, 2)
    epoch = run_epoch(loader)
    assert len(epoch) == len(loader) == sampler.num_batches() == 6
    batch = epoch[0]
    assert batch["images"].shape == (12, 3, 32, 16) and batch["text_ids"].shape[0] == 12
    assert batch["mlm_ids"].shape == batch["caption_ids"].shape
    assert batch["pids"].tolist()[0] == batch["pids"].tolist()[1]  # K = 2 records per identity
    # two worker processes produce the same batches
    loader2, sampler2, dataset2 = build_train_loader(small_cfg("loss.mlm_weight=1.0", "data.num_workers=2"),
                                                     records, tok)
    set_train_epoch(sampler2, dataset2, 2)
    assert_same_batches(run_epoch(loader2), epoch)
    # resuming after 4 batches reproduces the rest of the epoch
    set_train_epoch(sampler, dataset, 2, start_batch=4)
    assert_same_batches(run_epoch(loader), epoch[4:])
    set_train_epoch(sampler, dataset, 3)
    assert not torch.equal(run_epoch(loader)[0]["images"], epoch[0]["images"])


def test_pretrain_loader(records, tok):
    cfg = small_cfg("task=pretrain", "text.pretrain_max_words=4", "loss.mlm_weight=0.0")
    loader, sampler, dataset = build_train_loader(cfg, records, tok, rank=1, world_size=2)
    assert isinstance(sampler, ShardedShuffleSampler) and len(sampler) == 12  # 24 // (4 * 2) batches of 4
    batch = next(iter(loader))
    assert batch["images"].shape == (4, 3, 32, 16)
    assert batch["text_ids"].shape[0] == 4 and torch.equal(batch["text_ids"], batch["caption_ids"])
    assert "mlm_ids" not in batch
    for row, index in zip(batch["caption_ids"], batch["indices"].tolist()):
        words = records[index].caption.lower().replace(",", "").replace(".", "").split()[:4]
        assert decode(tok, row) == " ".join(words)
