"""environment_record: library versions, Python, git commit and dirty flag, device, world size and thread counts."""
from __future__ import annotations

import json
import platform
import shutil
import subprocess
from pathlib import Path

import numpy
import PIL
import pytest
import timm
import torch

from utils.checkpoint import load_file
import torchvision
import transformers

from utils.environment import REPO_ROOT, environment_record, git_state, library_version

HAS_GIT = shutil.which("git") is not None


def _run_git(root: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=True).stdout.strip()


def test_record_names_versions_python_device_and_world_size():
    record = environment_record("cpu")
    assert record["torch"] == torch.__version__ and record["torchvision"] == torchvision.__version__
    assert record["timm"] == timm.__version__ and record["transformers"] == transformers.__version__
    assert record["numpy"] == numpy.__version__ and record["pillow"] == PIL.__version__
    assert record["python"] == platform.python_version()
    assert record["device"] == "cpu" and record["world_size"] == 1
    assert record["cuda"] == torch.version.cuda
    assert json.loads(json.dumps(record)) == record  # plain values only
    assert all(type(v) in (str, int, bool, type(None)) for v in record.values()), record


def test_record_states_the_thread_counts_as_they_are_now(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    try:
        torch.set_num_threads(2)
        record = environment_record("cpu")
        assert record["torch_threads"] == 2 and record["torch_interop_threads"] == torch.get_num_interop_threads()
        assert record["OMP_NUM_THREADS"] == "3" and record["MKL_NUM_THREADS"] is None  # as set; None when unset
        torch.set_num_threads(1)
        assert environment_record("cpu")["torch_threads"] == 1  # read when the record is made, not at import
    finally:
        torch.set_num_threads(before)


def test_record_is_loadable_from_a_weights_only_checkpoint(tmp_path):
    record = environment_record()
    torch.save({"environment": record}, tmp_path / "c.pth")
    assert load_file(tmp_path / "c.pth")["environment"] == record


def test_default_device_is_the_current_cuda_device_or_cpu():
    expected = torch.cuda.get_device_name(torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    assert environment_record()["device"] == expected
    assert environment_record(torch.device("cpu"))["device"] == "cpu"


def test_missing_library_is_none():
    assert library_version("no-such-distribution-xyz", "no_such_module_xyz") is None
    assert library_version("numpy", "numpy") == numpy.__version__


@pytest.mark.skipif(not HAS_GIT, reason="git is not installed")
def test_this_checkout_commit_matches_git():
    if git_state(REPO_ROOT) == (None, None):
        pytest.skip("the code under test is not a git checkout of its own")
    commit, dirty = environment_record()["git_commit"], environment_record()["git_dirty"]
    assert commit == _run_git(REPO_ROOT, "rev-parse", "--short", "HEAD")
    assert dirty == bool(_run_git(REPO_ROOT, "status", "--porcelain", "--untracked-files=no"))


@pytest.mark.skipif(not HAS_GIT, reason="git is not installed")
def test_git_state_clean_dirty_and_outside_a_repository(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    assert git_state(repo) == (None, None)  # not a repository (tmp_path lies outside any checkout)
    _run_git(repo, "init", "-q")
    assert git_state(repo) == (None, None)  # no commit yet
    (repo / "a.py").write_text("x = 1\n")
    _run_git(repo, "add", "a.py")
    _run_git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "first")
    head = _run_git(repo, "rev-parse", "--short", "HEAD")
    assert git_state(repo) == (head, False)
    (repo / "untracked.txt").write_text("run output\n")
    assert git_state(repo) == (head, False)  # untracked files do not make the code dirty
    (repo / "a.py").write_text("x = 2\n")
    assert git_state(repo) == (head, True)
    sub = repo / "pkg"
    sub.mkdir()
    assert git_state(sub) == (None, None)  # inside a repository, but not its top level


def test_git_state_without_git_executable(monkeypatch):
    monkeypatch.setenv("PATH", "")
    assert git_state(REPO_ROOT) == (None, None)
    record = environment_record("cpu")
    assert record["git_commit"] is None and record["git_dirty"] is None
