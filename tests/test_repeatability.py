"""Repeats bit for bit: two runs of the same tiny training (same code, versions and thread count, here in one
process) end with equal weights and optimizer state, and each says what it ran with (versions, thread counts) in
its checkpoint and as the first record of its metrics.jsonl."""
from __future__ import annotations

import pytest
import torch

import train_cuhkpedes
from tests.tiny import tiny_overrides
from utils.checkpoint import load_file
from utils.logging_utils import read_metrics

THREAD_KEYS = ("torch_threads", "torch_interop_threads", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


@pytest.mark.slow  # two trainings: 8.5 to 25 s on the 2 shared cores (load 10-18)
def test_two_runs_with_the_same_threads_end_with_equal_state_dicts(tmp_path):
    data = tmp_path / "data"
    # A loader worker as in the demo: items are functions of (seed, epoch, index), not of the worker's RNG.
    overrides = tiny_overrides(data, epochs=2, steps=3) + ["data.num_workers=1"]
    for name in ("a", "b"):
        train_cuhkpedes.main(["--output-dir", str(tmp_path / name), *overrides])
    a, b = load_file(tmp_path / "a" / "last.pth"), load_file(tmp_path / "b" / "last.pth")
    assert a["step"] == b["step"] == 6
    assert a["model"].keys() == b["model"].keys() and a["optimizer"]["state"]  # the optimizer did step
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for key, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(b["optimizer"]["state"][key][name])), name
    assert a["environment"] == b["environment"]
    assert a["environment"]["torch_threads"] == torch.get_num_threads()
    assert a["environment"]["torch_interop_threads"] == torch.get_num_interop_threads()


def test_metrics_jsonl_opens_with_the_environment_and_thread_counts(tmp_path):
    out = tmp_path / "run"
    train_cuhkpedes.main(["--output-dir", str(out), *tiny_overrides(tmp_path / "data", epochs=1, steps=1)])
    first = read_metrics(out / "metrics.jsonl")[0]
    assert first["kind"] == "environment" and first["step"] == 0
    assert set(THREAD_KEYS) <= set(first) and first["torch_threads"] == torch.get_num_threads()
    assert first["torch"] == load_file(out / "last.pth")["environment"]["torch"] == str(torch.__version__)
