"""The training captions' words: recorded by training, carried by checkpoints and model folders, and used to flag
typed words the model never read ("poncho" is cut into known WordPiece pieces, yet no caption held it)."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from datasets.tokenizer import caption_word_list
from engine.retrieval import Retriever
from tests.search_fixtures import make_checkpoint, synthetic_captions
from tests.tiny import tiny_overrides
from utils.checkpoint import atomic_save, load_file

QUERY = "a child on a bicycle in a red poncho and a blue scarf"


def test_caption_word_list_counts_filters_and_caps():
    captions = ["A man in a red coat.", "a woman, a red bag", "the man's coat"]
    # a: 4, red: 2, man: 2, coat: 2, in/woman/bag/the/s: 1; punctuation is never a word
    assert caption_word_list(captions) == ["a", "bag", "coat", "in", "man", "red", "s", "the", "woman"]
    assert caption_word_list(captions, min_count=2) == ["a", "coat", "man", "red"]
    assert caption_word_list(captions, max_words=3) == ["a", "coat", "man"]  # ties go to the alphabetically first


def test_run_caption_words_join_the_checkpoint_s_words():
    from engine.data import run_caption_words
    from utils.config import load_config

    cfg = load_config(None, ["text.caption_words_max=2"])
    records = [type("R", (), {"caption": c})() for c in ("a red coat", "a red bag", "a coat")]
    assert run_caption_words(cfg, records, None) == ["a", "coat"]  # a: 3; coat and red: 2, the tie to "coat"
    assert run_caption_words(cfg, records, {"caption_words": ["poncho", "red"]}) == ["a", "coat", "poncho", "red"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny fine-tuning run on synthetic captions (its last.pth is written by the real training path)."""
    import train_cuhkpedes

    root = tmp_path_factory.mktemp("caption_words")
    train_cuhkpedes.main(["--output-dir", str(root / "run")] + tiny_overrides(root / "data", epochs=1, steps=1))
    return root


def test_training_records_its_captions_words(trained):
    obj = load_file(trained / "run" / "last.pth")
    words = obj["caption_words"]
    assert words == caption_word_list(synthetic_captions(trained / "data"))
    assert {"red", "coat", "backpack"} <= set(words) and not {"child", "bicycle", "poncho", "scarf"} & set(words)


def test_unknown_words_are_flagged_from_checkpoint_and_folder(trained, caplog):
    from engine.exporting import export_model_folder

    checkpoint = trained / "run" / "last.pth"
    retriever = Retriever.from_checkpoint(checkpoint, device="cpu")
    # every word here is cut into known pieces: only the caption record can tell them apart
    assert retriever.out_of_vocabulary(QUERY) == ["child", "bicycle", "poncho", "scarf"]
    with caplog.at_level(logging.WARNING, logger="engine.retrieval"):
        retriever.encode_texts([QUERY])
    assert "never in the model's training captions" in caplog.text and "poncho" in caplog.text
    folder = export_model_folder(checkpoint, trained / "folder")
    meta = json.loads((folder / "config.json").read_text())
    assert meta["caption_words"]["count"] == len(load_file(checkpoint)["caption_words"])
    assert "caption_words.txt" in meta["files_sha256"]
    exported = Retriever.from_pretrained(folder, device="cpu")
    assert exported.caption_words == retriever.caption_words
    assert exported.out_of_vocabulary("A Child in a RED coat") == ["child"]  # as the tokenizer lower-cases


def test_checkpoints_without_the_record_keep_pieces_only_flagging(tmp_path):
    from datasets.synthetic import make_synthetic

    root = make_synthetic("cuhkpedes", tmp_path / "cuhk", num_ids=4, seed=2)
    old = Retriever.from_checkpoint(make_checkpoint(tmp_path / "old.pth", root, seed=0), device="cpu")
    assert old.caption_words == frozenset()
    before = old.out_of_vocabulary("a red coat")  # the tiny 200-token vocabulary may spell "coat" letter by letter
    assert old.out_of_vocabulary("a zqxv coat")[0] == "zqxv" and "red" not in before
    obj = load_file(tmp_path / "old.pth")
    obj["caption_words"] = ["a", "coat"]
    atomic_save(obj, tmp_path / "new.pth")
    new = Retriever.from_checkpoint(tmp_path / "new.pth", device="cpu")
    assert new.out_of_vocabulary("a red coat") == ["red"] + before  # "red": in no recorded caption


def test_search_records_carry_the_flagged_words(trained, tmp_path):
    from engine.search_session import record

    retriever = Retriever.from_checkpoint(trained / "run" / "last.pth", device="cpu")
    line = record("text", QUERY, [], tmp_path / "sheet.jpg", retriever.out_of_vocabulary(QUERY))
    assert line["out_of_vocabulary"] == ["child", "bicycle", "poncho", "scarf"]


def test_the_web_page_names_the_words_the_captions_never_held(trained):
    from engine.webapp import SearchPage

    retriever = Retriever.from_checkpoint(trained / "run" / "last.pth", device="cpu")
    retriever.index(sorted(str(p) for p in (trained / "data").rglob("*.jpg"))[:4])
    message = SearchPage(retriever, provenance={}, default_k=2).search_text(QUERY).message
    assert "never in the model's training captions" in message
    assert "child, bicycle, poncho, scarf." in message
    assert "Not in the model's vocabulary" not in SearchPage(retriever, {}, 2).search_text("a red coat").message
