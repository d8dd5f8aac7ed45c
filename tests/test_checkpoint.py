import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models.ivt import build_model
from tests.tiny import TINY_MODEL
from utils.checkpoint import CheckpointError, atomic_save, capture_rng_state, load_file, restore_rng_state
from utils.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def test_our_datasets_package_is_imported_not_huggingface():
    import datasets

    assert Path(datasets.__file__).resolve().parent == ROOT / "datasets"
    assert hasattr(datasets, "__path__") and (ROOT / "datasets" / "readers.py").is_file()
    # also from a fresh interpreter started in the repository, as the entry scripts are
    out = subprocess.run([sys.executable, "-c", "import datasets, sys; print(datasets.__file__)"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    assert Path(out.strip()).resolve().parent == ROOT / "datasets"


def test_atomic_save_round_trip(tmp_path):
    cfg = load_config(None, TINY_MODEL + ["model.fusion_layers=1"])
    model = build_model(cfg)
    path = tmp_path / "ck.pth"
    atomic_save({"format": "ivt-retrieval-checkpoint", "format_version": 1, "model": model.state_dict(),
                 "config": cfg.to_dict()}, path)
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pth"]  # no temporary file left behind
    loaded = load_file(path)  # weights_only=True inside
    again = build_model(cfg)
    again.load_state_dict(loaded["model"], strict=True)
    assert loaded["model"].keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded["model"][key], value, rtol=0, atol=0)


def test_atomic_save_leaves_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "last.pth"
    atomic_save({"a": torch.ones(2)}, path)
    with pytest.raises(Exception):
        atomic_save({"bad": lambda: None}, path)  # not picklable
    assert torch.equal(load_file(path)["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth"]


def test_unreadable_checkpoint_names_the_file(tmp_path):
    bad = tmp_path / "broken.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="broken.pth"):
        load_file(bad)
    with pytest.raises(CheckpointError, match="not found"):
        load_file(tmp_path / "missing.pth")


def test_rng_state_round_trip_through_a_checkpoint(tmp_path):
    import random

    import numpy as np

    state = capture_rng_state()
    atomic_save({"rng": state}, tmp_path / "rng.pth")
    expected = (random.random(), float(np.random.rand()), torch.rand(1).item())
    restore_rng_state(load_file(tmp_path / "rng.pth")["rng"])
    assert (random.random(), float(np.random.rand()), torch.rand(1).item()) == expected
