import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.checkpoints import checkpoint_dict
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


@pytest.mark.parametrize("reads_block", [0, 1])
def test_atomic_save_round_trip(tmp_path, reads_block):
    cfg = load_config(None, TINY_MODEL + ["model.fusion_layers=1", f"model.fusion_reads_block={reads_block}"])
    model = build_model(cfg)
    path = tmp_path / "ck.pth"
    atomic_save(checkpoint_dict(model.state_dict(), cfg.to_dict()), path)
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pth"]  # no temporary file left behind
    loaded = load_file(path)  # weights_only=True inside
    again = build_model(cfg)
    again.load_state_dict(loaded["model"], strict=True)
    assert loaded["model"].keys() == model.state_dict().keys()
    assert ("fusion_input_norm.weight" in loaded["model"]) == bool(reads_block)  # the authors' keys otherwise
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


def test_the_one_loader_refuses_pickled_code_unless_trusted_and_checks_crcs_when_mapping(tmp_path):
    from collections import OrderedDict

    from utils.checkpoint import UnsafePickleError

    code = tmp_path / "code.pth"
    torch.save({"step": 3, "odd": _Custom()}, code)  # a class reference: loading it would run the file's code
    with pytest.raises(UnsafePickleError, match="code.pth: holds objects other than tensors"):
        load_file(code)
    assert load_file(code, trust_pickle=True)["step"] == 3
    with pytest.raises(CheckpointError) as garbage:
        (tmp_path / "text.pth").write_text("not a checkpoint")
        load_file(tmp_path / "text.pth")
    assert not isinstance(garbage.value, UnsafePickleError)  # damaged, not unsafe: no --trust-pickle advice
    mapped = tmp_path / "mapped.pth"
    atomic_save(OrderedDict(w=torch.arange(4096.0)), mapped)
    assert torch.equal(load_file(mapped, mmap=True)["w"], torch.arange(4096.0))
    raw = bytearray(mapped.read_bytes())
    raw[raw.find(torch.arange(4096.0).numpy().tobytes()[8:16]) + 1] ^= 0x01  # one bit of the tensor data
    mapped.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="checksum"):
        load_file(mapped, mmap=True)


class _Custom:
    pass


def test_rng_state_round_trip_through_a_checkpoint(tmp_path):
    import random

    import numpy as np

    state = capture_rng_state()
    atomic_save({"rng": state}, tmp_path / "rng.pth")
    expected = (random.random(), float(np.random.rand()), torch.rand(1).item())
    restore_rng_state(load_file(tmp_path / "rng.pth")["rng"])
    assert (random.random(), float(np.random.rand()), torch.rand(1).item()) == expected
