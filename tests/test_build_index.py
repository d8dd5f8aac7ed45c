"""python -m engine.build_index: two processes under torchrun (gloo) write the same index as one; a build killed with
SIGKILL resumes and encodes only the images that were missing. Both spawn processes: marked slow."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from engine.gallery_index import open_gallery
from tests.search_fixtures import copy_gallery, make_checkpoint

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from datasets.synthetic import make_synthetic

    root = tmp_path_factory.mktemp("build")
    synth = make_synthetic("cuhkpedes", root / "synth", num_ids=20, seed=3)
    checkpoint = make_checkpoint(root / "tiny.pth", synth, seed=0)
    gallery = root / "gallery"
    copy_gallery(synth, gallery, count=40)
    return checkpoint, gallery


def command(checkpoint: Path, gallery: Path, index: Path, *extra: str) -> list[str]:
    return ["-m", "engine.build_index", "--checkpoint", str(checkpoint), "--gallery", str(gallery), "--index",
            str(index), "--device", "cpu", "search.shard_images=3", *extra]


def encoded(output: str) -> int:
    """The images the ranks say they encoded, summed."""
    return sum(int(n) for n in re.findall(r"encoded (\d+) image", output))


def test_two_processes_write_the_same_index_as_one(setup, tmp_path):
    checkpoint, gallery = setup
    one = subprocess.run([sys.executable, *command(checkpoint, gallery, tmp_path / "one")], capture_output=True,
                         text=True, env=ENV, cwd=REPO, timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29561",
                          *command(checkpoint, gallery, tmp_path / "two")], capture_output=True, text=True,
                         env=ENV, cwd=REPO, timeout=600)
    assert two.returncode == 0, two.stderr[-2000:]
    assert encoded(one.stdout) == 40 and encoded(two.stdout) == 40
    assert re.search(r"rank 1/2: encoded (\d+)", two.stdout) and re.search(r"rank 0/2: encoded (\d+)", two.stdout)
    a, b = open_gallery(tmp_path / "one"), open_gallery(tmp_path / "two")
    assert list(a.paths) == list(b.paths) == sorted(str(p) for p in gallery.iterdir())
    assert (a.features - b.features).abs().max() <= 1e-6
    assert [s["name"] for s in a.manifest["shards"]] == [s["name"] for s in b.manifest["shards"]]


def test_a_killed_build_resumes_with_only_the_missing_images(setup, tmp_path):
    checkpoint, gallery = setup
    index = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, *command(checkpoint, gallery, index, "eval.batch_size=1")],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV, cwd=REPO)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and len(list((index / "shards").glob("*.json"))) < 3:
        assert process.poll() is None, "the build ended before it could be killed"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert process.returncode == -signal.SIGKILL
    assert not (index / "manifest.json").is_file()
    done = sum(len(json.loads(m.read_text())["paths"]) for m in (index / "shards").glob("*.json"))
    assert 0 < done < 40
    again = subprocess.run([sys.executable, *command(checkpoint, gallery, index)], capture_output=True, text=True,
                           env=ENV, cwd=REPO, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert encoded(again.stdout) == 40 - done
    resumed = open_gallery(index)
    fresh = subprocess.run([sys.executable, *command(checkpoint, gallery, tmp_path / "fresh")], capture_output=True,
                           text=True, env=ENV, cwd=REPO, timeout=600)
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    reference = open_gallery(tmp_path / "fresh")
    assert list(resumed.paths) == list(reference.paths)
    assert torch.allclose(resumed.features, reference.features, atol=1e-6, rtol=0)
