"""evaluate.py --save-features: the features it computed, with their captions, paths and person ids, in a file
beside the metrics that equals a fresh encoding of the same checkpoint."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import evaluate
from tests.tiny import tiny_overrides
from utils.checkpoint import load_file


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    import train_cuhkpedes

    root = tmp_path_factory.mktemp("features")
    train_cuhkpedes.main(["--output-dir", str(root / "run")] + tiny_overrides(root / "data", epochs=1, steps=1))
    return root / "run"


def test_saved_features_equal_a_fresh_encoding(run, tmp_path):
    from datasets.transforms import build_test_transform
    from engine.checkpoints import load_for_inference
    from engine.data import load_eval_splits
    from engine.encoding import encode_images, encode_texts

    results = evaluate.main(["--checkpoint", str(run / "best.pth"), "--split", "val", "--save-features",
                             "--output-dir", str(tmp_path)])
    saved = load_file(tmp_path / "features_val.pt")  # the project's one loader: weights_only, checksums verified
    assert json.loads((tmp_path / "metrics_val.json").read_text())["t2i"]["R1"] == pytest.approx(results["t2i"]["R1"])
    assert "features" not in results and saved["split"] == "val" and saved["format"] == "ivt-eval-features"
    model, cfg, tokenizer, _ = load_for_inference(run / "best.pth")
    records = load_eval_splits(cfg).split("val")
    paths = list(dict.fromkeys(r.image_path for r in records))  # the standard protocol: one entry per image
    assert saved["image_paths"] == paths and saved["texts"] == [r.caption for r in records]
    assert saved["query_pids"].tolist() == [r.pid for r in records]
    assert saved["gallery_pids"].tolist() == [next(r.pid for r in records if r.image_path == p) for p in paths]
    images = encode_images(model, paths, build_test_transform(cfg.input), 4, "cpu", False)
    texts = encode_texts(model, tokenizer, saved["texts"], cfg.text.max_text_len, 3, "cpu", False)
    assert saved["image_features"].shape == images.shape and saved["text_features"].shape == texts.shape
    assert (saved["image_features"] - images).abs().max().item() <= 1e-6
    assert (saved["text_features"] - texts).abs().max().item() <= 1e-6


def test_no_features_file_without_the_flag(run, tmp_path):
    evaluate.main(["--checkpoint", str(run / "best.pth"), "--split", "val", "--output-dir", str(tmp_path)])
    assert (tmp_path / "metrics_val.json").is_file() and not list(tmp_path.glob("features_*"))


def test_beside_the_checkpoint_the_file_is_named_after_it(run):
    evaluate.main(["--checkpoint", str(run / "best.pth"), "--split", "val", "--save-features"])
    assert (run / "features_val_best.pt").is_file() and (run / "metrics_val_best.json").is_file()
