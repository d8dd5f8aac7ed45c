"""Webdataset shards: writing, exactly-once streaming over ranks and workers, resuming, bad input (datasets.shards)."""
from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

pytest.importorskip("webdataset", reason="the shard path needs webdataset (pip install -r requirements-pretrain.txt)")

from datasets import shards  # noqa: E402
from datasets.shards import ShardError, ShardManifest, ShardStream, StreamSettings, delivered_batches  # noqa: E402


def _corpus(tmp_path: Path, n: int = 23) -> list[dict]:
    """``n`` captions over images of two per image, plus one empty caption and one missing image."""
    root = tmp_path / "images"
    root.mkdir()
    items = []
    for i in range(n):
        name = f"{i // 2}.png" if i % 4 else f"{i // 2}.jpg"
        if not (root / name).exists():
            Image.new("RGB", (6, 12), (i * 9 % 255, 40, 90)).save(root / name)
        items.append({"image": name, "caption": f"person {i} in a coat", "identity": f"id{i // 2}"})
    items += [{"image": "0.jpg", "caption": "  "}, {"image": "gone.jpg", "caption": "nobody"}]
    (tmp_path / "corpus.json").write_text(json.dumps(items), encoding="utf-8")
    return [{"annotation": str(tmp_path / "corpus.json"), "image_root": str(root)}]


def _stream(manifest: ShardManifest, batch: int, workers: int, rank: int = 0, world: int = 1, seed: int = 3,
            buffer: int = 4, epoch_samples: int = 0) -> ShardStream:
    settings = StreamSettings(batch_size=batch, seed=seed, rank=rank, world_size=world, workers=workers,
                              shuffle_buffer=buffer, epoch_samples=epoch_samples)
    return ShardStream(manifest, settings, _index_item)


def _index_item(image, caption: str, index: int, epoch: int) -> dict:
    return {"index": index, "caption": caption, "size": image.size}


def _indices(batch: list[dict]) -> list[int]:
    return [item["index"] for item in batch]


def _loader(stream: ShardStream, workers: int) -> DataLoader:
    return DataLoader(stream, batch_size=None, num_workers=workers, collate_fn=_indices)


def test_write_read_and_verify(tmp_path: Path, capsys) -> None:
    manifest = shards.main(["--corpora", str(_write_corpora(tmp_path)), "--out", str(tmp_path / "s"),
                            "--samples-per-shard", "5"])
    assert [s["samples"] for s in manifest["shards"]] == [5, 5, 5, 5, 3]
    assert manifest["samples"] == 23 and manifest["skipped"] == {"empty_caption": 1, "missing_or_unreadable_image": 1}
    loaded = ShardManifest.load(tmp_path / "s" / "manifest.json")
    first = list(shards.read_shard(loaded.folder / "shard-000000.tar", 5))
    assert [s["__key__"] for s in first] == [f"{i:09d}" for i in range(5)]
    assert json.loads(first[1]["json"]) == {"caption": "person 1 in a coat", "identity": "id0", "index": 1}
    assert first[1]["png"] == (tmp_path / "images" / "0.png").read_bytes()  # as stored
    records = json.loads((tmp_path / "s" / "records.json").read_text())
    assert len(records) == 23 and records[22] == {"image": "000000022", "caption": "person 22 in a coat",
                                                  "identity": "id11"}
    shards.main(["--out", str(tmp_path / "s"), "--verify"])
    assert "checksums match" in capsys.readouterr().out
    resized = shards.write_shards(_corpora_list(tmp_path), tmp_path / "r", 50, resize=(8, 4))
    sample = next(shards.read_shard(tmp_path / "r" / "shard-000000.tar", 23))
    assert Image.open(io.BytesIO(sample["jpg"])).size == (4, 8) and resized["resize"] == [8, 4]


def _write_corpora(tmp_path: Path) -> Path:
    path = tmp_path / "corpora.json"
    path.write_text(json.dumps(_corpus(tmp_path)), encoding="utf-8")
    return path


def _corpora_list(tmp_path: Path) -> list[dict]:
    return json.loads((tmp_path / "corpora.json").read_text())


def _written(tmp_path: Path, per_shard: int = 5) -> ShardManifest:
    shards.write_shards(_corpus(tmp_path), tmp_path / "s", per_shard)
    return ShardManifest.load(tmp_path / "s" / "manifest.json")


def test_round_robin_position_of_each_worker() -> None:
    assert delivered_batches([2, 2], 3) == [2, 1]
    assert delivered_batches([1, 3], 3) == [1, 2]  # worker 0 runs out after one batch; worker 1 goes on alone
    assert delivered_batches([1, 3], 10) == [1, 3]
    assert delivered_batches([0, 2, 1], 2) == [0, 1, 1]


@pytest.mark.parametrize("workers", [0, 2])
def test_one_rank_reads_every_sample_once_per_epoch(tmp_path: Path, workers: int) -> None:
    manifest = _written(tmp_path)
    orders = []
    for epoch in (0, 1):
        stream = _stream(manifest, batch=1, workers=max(1, workers))
        stream.set_epoch(epoch)
        orders.append([i for batch in _loader(stream, workers) for i in batch])
        assert sorted(orders[-1]) == list(range(23)) and len(stream) == 23
    assert orders[0] != orders[1]  # the shard order and the shuffle buffer change with the epoch


def test_resume_mid_epoch_neither_loses_nor_repeats(tmp_path: Path) -> None:
    manifest = _written(tmp_path, per_shard=4)  # 6 shards: 4,4,4,4,4,3 -> the two workers hold 12 and 11
    stream = _stream(manifest, batch=3, workers=2)
    stream.set_epoch(1)
    assert sorted(stream.worker_batches(0)) == [3, 4] and len(stream) == 7
    full = list(_loader(stream, 2))
    for consumed in (1, 4, 6):  # 6: the worker with 3 batches is done and the other finishes alone
        first = _stream(manifest, batch=3, workers=2)
        first.set_epoch(1)
        head = [b for _, b in zip(range(consumed), _loader(first, 2))]
        resumed = _stream(manifest, batch=3, workers=2)
        resumed.set_epoch(1)
        resumed.set_start_batch(consumed)
        rest = list(_loader(resumed, 2))
        assert len(head) + len(rest) == len(full)  # the loader starts again at worker 0: the same batches, not
        assert sorted(head + rest) == sorted(full)  # in the same order
    trained = sorted(i for batch in full for i in batch)
    assert len(trained) == len(set(trained)) == 21  # 7 full batches of 3; the 2 left over are in the epoch report
    assert "23 samples read" in stream.epoch_report() and "2 sample(s) fall outside" in stream.epoch_report()


def test_resampled_epochs_have_the_stated_size(tmp_path: Path) -> None:
    manifest = _written(tmp_path)
    stream = _stream(manifest, batch=2, workers=2, epoch_samples=40)
    seen = [i for batch in _loader(stream, 2) for i in batch]
    per_worker = [stream.worker_samples(0, w) for w in range(2)]
    assert all(n >= 20 for n in per_worker) and len(seen) == 2 * sum(n // 2 for n in per_worker)
    assert len(seen) > len(set(seen))  # drawn with replacement


def test_bad_input_gets_one_line_and_loses_nothing(tmp_path: Path) -> None:
    manifest = _written(tmp_path)
    tar = manifest.folder / "shard-000001.tar"
    data = tar.read_bytes()
    tar.write_bytes(data[: len(data) // 2])
    with pytest.raises(ShardError, match=r"shard-000001.tar: expected \d+ bytes as the manifest says"):
        manifest.verify_files()
    with pytest.raises(ShardError, match=r"shard-000001.tar: unreadable after \d samples .* manifest says 5"):
        list(shards.read_shard(tar, 5))
    tar.write_bytes(data)
    with pytest.raises(ShardError, match=r"shard-000001.tar: 5 samples but the manifest says 6"):
        list(shards.read_shard(tar, 6))
    with pytest.raises(ShardError, match="another corpus"):
        _stream(manifest, 1, 1).check_resume({"corpus_sha256": "0" * 64, "world_size": 1, "workers": 1})
    (manifest.folder / "manifest.json").unlink()
    with pytest.raises(ShardError, match="no shard manifest there"):
        ShardManifest.load(manifest.folder / "manifest.json")


def test_a_corrupt_image_or_a_sample_without_caption_is_skipped_and_counted(tmp_path: Path) -> None:
    manifest = _written(tmp_path)
    tar = manifest.folder / "shard-000000.tar"
    members = []
    with tarfile.open(tar) as source:
        for info in source.getmembers():
            data = source.extractfile(info).read()
            if info.name == "000000004.jpg":
                data = b"\xff\xd8 not a jpeg"
            if info.name != "000000003.json":
                members.append((info.name, data))
    with tarfile.open(tar, "w") as out:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            out.addfile(info, io.BytesIO(data))
    stream = _stream(manifest, batch=23, workers=1, buffer=1)
    (batch,) = list(_loader(stream, 0))
    assert len(batch) == 23 and 4 not in batch and 3 not in batch  # both replaced by samples of the batch
    assert sorted(stream.bad_images) == ["000000003", "000000004"]


def test_webdataset_and_the_loader_must_agree_on_the_rank(tmp_path: Path, monkeypatch) -> None:
    manifest = _written(tmp_path)
    monkeypatch.setitem(os.environ, "RANK", "1")
    monkeypatch.setitem(os.environ, "WORLD_SIZE", "2")
    with pytest.raises(ShardError, match="set RANK and WORLD_SIZE"):
        list(_loader(_stream(manifest, 1, 1, rank=0, world=1), 0))


def _rank_reads(rank: int, world: int, init: str, manifest_path: str, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world))
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        stream = _stream(ShardManifest.load(manifest_path), batch=1, workers=2, rank=rank, world=world)
        seen = [i for batch in _loader(stream, 2) for i in batch]
        Path(out).write_text(json.dumps(seen))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_by_two_workers_read_every_sample_exactly_once(tmp_path: Path) -> None:
    manifest = _written(tmp_path, per_shard=2)  # 12 shards over 4 readers
    outs = [tmp_path / f"rank{r}.json" for r in range(2)]
    torch.multiprocessing.spawn(_spawned, args=(2, f"file://{tmp_path / 'store'}", str(manifest.path),
                                                [str(o) for o in outs]), nprocs=2)
    seen = [json.loads(o.read_text()) for o in outs]
    assert sorted(seen[0] + seen[1]) == list(range(23)) and not set(seen[0]) & set(seen[1])


def _spawned(rank: int, world: int, init: str, manifest_path: str, outs: list[str]) -> None:
    _rank_reads(rank, world, init, manifest_path, outs[rank])


# ----------------------------------------------------------------------------------------------- training

def _synthetic_shards(tmp_path: Path, per_shard: int = 4) -> tuple[Path, Path]:
    from datasets.synthetic import make_synthetic
    root = tmp_path / "pretrain"
    make_synthetic("pretrain", root, num_ids=12, seed=0, style="mixed")
    shards.main(["--root", str(root), "--out", str(tmp_path / "shards"), "--samples-per-shard", str(per_shard)])
    return root, tmp_path / "shards" / "manifest.json"


def _train_args(tmp_path: Path, root: Path, manifest: Path, out: Path, workers: int = 2) -> list[str]:
    from tests.tiny import tiny_overrides
    return (["--output-dir", str(out)] + tiny_overrides(root, "pretrain", steps=3)
            + [f"data.pretrain_shards={manifest}", f"data.num_workers={workers}", "model.fusion_layers=1",
               "data.shards_shuffle_buffer=8", "train.batch_size_per_gpu=4"])


@pytest.mark.slow
def test_the_miniature_pretraining_runs_from_shards_and_resumes_inside_an_epoch(tmp_path, stop_after_steps) -> None:
    import train_pretrain
    from utils.checkpoint import load_file
    root, manifest = _synthetic_shards(tmp_path)
    out = tmp_path / "run"
    stop_after_steps(2)
    summary = train_pretrain.main(_train_args(tmp_path, root, manifest, out))
    assert summary["stopped"] and load_file(out / "last.pth")["step_in_epoch"] == 2
    assert load_file(out / "last.pth")["shard_stream"]["corpus_sha256"] == ShardManifest.load(manifest).corpus_sha256
    train_pretrain.main(_train_args(tmp_path, root, manifest, out) + ["--resume", "auto"])
    log = (out / "log.txt").read_text()
    assert "rank 0 resumes epoch 0 at batch 2" in log and "0 samples are seen twice" in log
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert steps == list(range(1, 7))  # 2 epochs x 3 steps, none lost or run twice across the stop
    other_root = tmp_path / "other"
    from datasets.synthetic import make_synthetic
    make_synthetic("pretrain", other_root, num_ids=12, seed=5, style="mixed")
    shards.main(["--root", str(other_root), "--out", str(tmp_path / "other-shards"), "--samples-per-shard", "4"])
    with pytest.raises(SystemExit, match="trained on shards of another corpus"):
        train_pretrain.main(_train_args(tmp_path, root, tmp_path / "other-shards" / "manifest.json", out)
                            + ["--resume", "auto", "train.epochs=3"])


@pytest.mark.slow
def test_kill_9_mid_epoch_then_resume_covers_the_epoch(tmp_path) -> None:
    import signal
    import subprocess
    import sys
    import time
    import train_pretrain
    root, manifest = _synthetic_shards(tmp_path, per_shard=3)
    out = tmp_path / "run"
    args = _train_args(tmp_path, root, manifest, out) + ["train.max_steps_per_epoch=0", "train.epochs=2",
                                                         "train.eval_every_epochs=5"]
    proc = subprocess.Popen([sys.executable, "train_pretrain.py", *args], cwd=Path(__file__).resolve().parents[1],
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not _epoch_one_started(out):
            time.sleep(0.2)
        assert _epoch_one_started(out), "the run did not reach epoch 1"
        os.killpg(proc.pid, signal.SIGKILL)  # main process and loader workers, no handler runs
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    train_pretrain.main(args + ["--resume", "auto"])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epoch_one = [r for r in records if r["kind"] == "train" and r["epoch"] == 1]
    report = [line for line in (out / "log.txt").read_text().splitlines() if "shards epoch 1:" in line][-1]
    read = int(report.split("samples read")[0].split()[-1])
    untrained = int(report.split("sample(s) fall outside")[0].split()[-1])
    steps = int(report.split(" steps of")[0].split()[-1])
    # the resumed epoch covers the corpus: every sample is read, and trained or reported outside the steps
    assert read == ShardManifest.load(manifest).samples
    assert len(epoch_one) == steps and steps * 4 + untrained == read


def _epoch_one_started(out: Path) -> bool:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return False
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("epoch") == 1:
                return True
        except json.JSONDecodeError:  # the line being written right now
            continue
    return False


def test_corpora_and_shards_together_are_refused(tmp_path: Path) -> None:
    from engine.data import pretrain_train_records
    from utils.config import ConfigError, load_config
    manifest = _written(tmp_path)
    cfg = load_config("configs/demo_pretrain.yaml", [f"data.pretrain_shards={manifest.path}"])
    assert len(pretrain_train_records(cfg)) == 23  # the captions listed beside the shards
    (tmp_path / "corpora.json").write_text(json.dumps(_corpus_entries(tmp_path)), encoding="utf-8")
    both = load_config("configs/demo_pretrain.yaml", [f"data.pretrain_shards={manifest.path}",
                                                      f"data.pretrain_corpora={tmp_path / 'corpora.json'}"])
    with pytest.raises(ConfigError, match="both set"):
        pretrain_train_records(both)


def _corpus_entries(tmp_path: Path) -> list[dict]:
    return [{"annotation": str(tmp_path / "corpus.json"), "image_root": str(tmp_path / "images")}]
