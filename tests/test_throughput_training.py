"""Training through the engine with every throughput switch on (device augmentation from the image cache, foreach
SGD, padded texts, device-side ITM check): it trains, and a stopped and resumed run equals an uninterrupted one."""
from __future__ import annotations

import json
import math

import torch

import train_cuhkpedes
from tests.tiny import tiny_overrides
from utils.checkpoint import load_file


def test_stop_and_resume_with_the_throughput_switches_equals_uninterrupted(tmp_path, stop_after_steps):
    overrides = tiny_overrides(tmp_path / "data", epochs=2, steps=2) + [
        "data.augment_on=device", f"data.image_cache={tmp_path / 'cache'}", "train.optimizer=sgd",
        "train.optimizer_impl=foreach", "model.text_pad_multiple=8", "loss.itm_negative_check=device"]
    full = tmp_path / "full"
    train_cuhkpedes.main(["--output-dir", str(full)] + overrides)
    assert (tmp_path / "cache" / "index.json").is_file()
    parted = tmp_path / "parted"
    stop_after_steps(3)
    summary = train_cuhkpedes.main(["--output-dir", str(parted)] + overrides)
    assert summary["stopped"]
    train_cuhkpedes.main(["--output-dir", str(parted), "--resume", "auto"] + overrides)
    a, b = load_file(full / "last.pth"), load_file(parted / "last.pth")
    assert a["step"] == b["step"] == 4
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=0, atol=0, msg=key)
    losses = [json.loads(line)["loss"] for line in (full / "metrics.jsonl").read_text().splitlines()
              if json.loads(line)["kind"] == "train"]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
