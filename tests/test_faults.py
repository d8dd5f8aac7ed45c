"""Fault injection inside one process: what a run keeps, and how it reports, when a save crashes, the disk is full
(simulated), data or checkpoints are bad, or a user makes a mistake. Each test states the fault, then asserts the
files left behind and the message. The faults that need real processes (kills, signals to process groups,
torchrun, a tmpfs, worker processes) are in tests/test_faults_process.py, marked slow."""
from __future__ import annotations

import errno
import hashlib
import json
import re
import signal
from pathlib import Path

import pytest
import torch

import evaluate
import train_cuhkpedes
from tests.tiny import tiny_overrides
from utils.checkpoint import DiskFullError, atomic_write, load_file
from utils.logging_utils import read_metrics

ROOT = Path(__file__).resolve().parents[1]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def train(out: Path, data: Path, *extra: str, epochs: int = 1, steps: int = 2) -> dict:
    argv = ["--output-dir", str(out), *tiny_overrides(data, epochs=epochs, steps=steps), *extra]
    return train_cuhkpedes.main(argv)


def temporaries(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.tmp"))


def test_nan_weights_are_never_saved_over_a_good_checkpoint(tmp_path, monkeypatch, stop_after_steps):
    from models.objectives import RetrievalObjective

    out, data = tmp_path / "run", tmp_path / "data"
    train(out, data, epochs=1, steps=2)
    good = digest(out / "last.pth")

    def poisoned(self, batch):  # the loss goes NaN; the log window that would notice it is far away
        return {"cmpm_loss": self.model.encoder.cls_token.sum() * float("nan")}

    monkeypatch.setattr(RetrievalObjective, "forward", poisoned)
    with pytest.raises(SystemExit, match="^error: .*not finite.*last.pth keeps the last good state"):
        stop_after_steps(3)  # the SIGTERM that arrives after the weights went NaN
        train(out, data, "--resume", "auto", "train.log_every_steps=100", epochs=2)
    assert digest(out / "last.pth") == good


# ---------------------------------------------------------------------------------------------- disk
def test_a_full_disk_keeps_the_previous_checkpoint_and_whole_metric_lines(tmp_path, monkeypatch):
    out, data = tmp_path / "run", tmp_path / "data"
    train(out, data, epochs=1, steps=2)
    good = digest(out / "last.pth")
    real_save = torch.save

    def full_disk(obj, handle, *args, **kwargs):
        handle.write(b"x" * 100)  # torch's zip writer reports ENOSPC like this, not as an OSError
        raise RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file "
                           "data/3: file write failed")

    monkeypatch.setattr(torch, "save", full_disk)
    good_best = digest(out / "best.pth")
    with pytest.raises(SystemExit, match=r"^error: disk full: could not write .*(best|last)\.pth \(the save needed "
                                         r"about [0-9.]+ MiB; [0-9.]+ MiB free"):
        train(out, data, "--resume", "auto", epochs=2, steps=2)
    monkeypatch.setattr(torch, "save", real_save)
    assert digest(out / "last.pth") == good and digest(out / "best.pth") == good_best and not temporaries(out)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert lines and all(json.loads(line) for line in lines)


def test_atomic_write_names_a_full_disk_and_leaves_the_old_file(tmp_path):
    target = tmp_path / "metrics_test.json"
    target.write_text("old")

    def enospc(handle):
        handle.write(b"new")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(DiskFullError, match="metrics_test.json .*about 0.0 MiB"):
        atomic_write(target, enospc, expected_bytes=1000)
    assert target.read_text() == "old" and not temporaries(tmp_path)


def test_torn_last_line_of_metrics_jsonl_is_skipped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"kind": "train", "step": 1}\n{"kind": "train", "st')
    assert read_metrics(path) == [{"kind": "train", "step": 1}]


# ------------------------------------------------------------------------------------ best and last
@pytest.mark.parametrize("selection", ["null", "val"])
def test_a_crash_between_best_and_last_leaves_a_consistent_pair(tmp_path, monkeypatch, selection):
    import engine.training

    out, data = tmp_path / "run", tmp_path / "data"
    real_save, saves = engine.training.save_checkpoint, []
    scores = iter(range(100))

    def crash_between_the_final_pair(obj, path):
        saves.append(path.name)
        if len(saves) == 4:  # the 2nd file of the last epoch's pair
            raise RuntimeError("simulated crash")
        real_save(obj, path)

    monkeypatch.setattr(engine.training, "save_checkpoint", crash_between_the_final_pair)
    monkeypatch.setattr(engine.training, "selection_score", lambda results, metric: float(next(scores)))
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(out, data, f"eval.selection_split={selection}", epochs=2)
    monkeypatch.setattr(engine.training, "save_checkpoint", real_save)
    assert saves == ["best.pth", "last.pth", "best.pth", "last.pth"]
    # best.pth of the last epoch is on disk, last.pth still from the epoch before: resuming redoes that epoch.
    assert load_file(out / "best.pth")["best_epoch"] == 1 and load_file(out / "last.pth")["epoch"] == 1

    summary = train(out, data, "--resume", "auto", f"eval.selection_split={selection}", epochs=2)
    assert summary["best_epoch"] == load_file(out / "best.pth")["best_epoch"] == 1
    assert json.loads((out / "metrics_test.json").read_text())["t2i"] == summary["test"]["t2i"]


def test_resume_into_a_new_directory_carries_the_best_model_over(tmp_path, monkeypatch):
    import engine.training

    first, second, data = tmp_path / "first", tmp_path / "second", tmp_path / "data"
    train(first, data, epochs=1)
    # The resumed epoch never beats the first one on val, so nothing writes a new best.pth into the new folder.
    monkeypatch.setattr(engine.training, "selection_score", lambda results, metric: -1.0)
    summary = train(second, data, "--resume", str(first / "last.pth"), epochs=2)
    assert summary["best_epoch"] == 0 and (second / "best.pth").is_file()
    assert digest(second / "best.pth") == digest(first / "best.pth")
    assert (second / "metrics_test.json").is_file()


def test_a_new_run_never_overwrites_a_previous_one(tmp_path):
    out, data = tmp_path / "run", tmp_path / "data"
    train(out, data, epochs=1)
    best = digest(out / "best.pth")
    with pytest.raises(SystemExit, match="holds a previous run's last.pth and best.pth.*--overwrite"):
        train(out, data, epochs=1)
    (out / "last.pth").unlink()
    with pytest.raises(SystemExit, match="holds a previous run's best.pth"):
        train(out, data, "--resume", "auto", epochs=1)  # no last.pth to resume: not a licence to start over
    assert digest(out / "best.pth") == best
    summary = train(out, data, "--overwrite", epochs=1)
    assert summary["test"] is not None


def test_metrics_jsonl_after_a_resume_holds_each_step_once(tmp_path, stop_after_steps):
    out, data = tmp_path / "run", tmp_path / "data"
    stop_after_steps(4)
    train(out, data, epochs=2, steps=3)  # last.pth at step 4 ...
    resumed_from = load_file(out / "last.pth")["step"]
    with (out / "metrics.jsonl").open("a") as handle:  # ... and a record of a step after it, as after a kill -9
        handle.write(json.dumps({"kind": "train", "step": resumed_from + 1, "loss": 1.0}) + "\n")
    train(out, data, "--resume", "auto", epochs=2, steps=3)
    steps = [r["step"] for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]
    assert steps == sorted(set(steps)) and steps[-1] == 6


# ------------------------------------------------------------------------------------ data and files
def _corrupt_one_train_image(data: Path) -> str:
    from datasets.readers import load_annotations

    path = load_annotations("cuhkpedes", data).train[0].image_path
    Path(path).write_bytes(b"this is not a JPEG")
    return path


def test_undecodable_images_at_start_up_and_at_run_time(tmp_path):
    data = tmp_path / "data"
    train(tmp_path / "clean", data, epochs=1, steps=1)  # writes the synthetic dataset
    bad = _corrupt_one_train_image(data)
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match="cannot be decoded") as err:
        train(out, data, epochs=1)
    assert Path(bad).name in str(err.value) and not out.exists()  # caught before the run took the folder
    # Past a start-up check that only looks for files, the bad image is skipped (and named) instead of crashing.
    summary = train(out, data, "data.check_images=exists", epochs=1, steps=3)
    assert summary["test"] is not None and Path(bad).name in (out / "log.txt").read_text()


def test_corrupt_and_bit_flipped_checkpoints_are_refused(tmp_path):
    out, data = tmp_path / "run", tmp_path / "data"
    train(out, data, epochs=1)
    raw = bytearray((out / "last.pth").read_bytes())
    raw[len(raw) // 2] ^= 0x08  # one bit inside the tensor data: torch.load alone would not notice
    (out / "last.pth").write_bytes(bytes(raw))
    with pytest.raises(SystemExit, match="checksum of .* does not match"):
        train(out, data, "--resume", "auto", epochs=2)
    (out / "best.pth").write_bytes((out / "best.pth").read_bytes()[:5000])  # a partial copy
    with pytest.raises(SystemExit, match=r"^error: .*best\.pth"):
        evaluate.main(["--checkpoint", str(out / "best.pth")])


def test_an_empty_test_split_is_an_error_not_a_silent_success(tmp_path):
    data = tmp_path / "data"
    train(tmp_path / "first", data, epochs=1, steps=1)
    records = json.loads((data / "reid_raw.json").read_text())
    (data / "no_test.json").write_text(json.dumps([r for r in records if r["split"] != "test"]))
    with pytest.raises(SystemExit, match="'test' split .* is empty"):
        train(tmp_path / "run", data, "data.annotation_file=no_test.json", epochs=1, steps=1)


# ------------------------------------------------------------------------------- worker failures (issue 20)
def corrupt_scan_data(path: str) -> None:
    """Garbage in the middle of a JPEG's entropy-coded data: header, verify() and end marker still pass."""
    raw = Path(path).read_bytes()
    Path(path).write_bytes(raw[:800] + bytes(range(256)) * 3 + raw[800 + 768:])


def test_the_default_check_decodes_the_evaluated_images(tmp_path):
    from datasets.readers import load_annotations

    data = tmp_path / "data"
    train(tmp_path / "first", data, epochs=1, steps=1)
    bad = load_annotations("cuhkpedes", data).val[0].image_path
    corrupt_scan_data(bad)
    with pytest.raises(SystemExit, match=f"cannot be decoded.*{Path(bad).name}"):
        train(tmp_path / "run", data, epochs=1)
    assert not (tmp_path / "run").exists()  # refused before the run took the folder, not at the first evaluation


# ----------------------------------------------------------------------------------- resume (issue 20)
def scheduled_lr(config_path: Path, epoch: int) -> float:
    """The lr a fresh run of the config at ``config_path`` uses in ``epoch`` (schedule_unit epoch)."""
    from utils.config import load_config
    from utils.optim import build_optimizer, build_scheduler, set_schedule

    cfg = load_config(str(config_path))
    optimizer = build_optimizer(torch.nn.Linear(2, 2), cfg.train)
    set_schedule(build_scheduler(optimizer, cfg.train, 2), cfg.train, epoch, epoch * 2)
    return optimizer.param_groups[0]["lr"]


def test_schedule_overrides_on_resume_apply_from_the_resumed_step(tmp_path, caplog):
    out, data = tmp_path / "run", tmp_path / "data"
    train(out, data, epochs=1, steps=2)  # a finished 1-epoch run: its schedule ended at min_lr
    with caplog.at_level("WARNING"):
        train(out, data, "--resume", "auto", "train.lr=0.01", epochs=3, steps=2)
    assert "train.lr 0.001 -> 0.01" in caplog.text and "train.epochs 1 -> 3" in caplog.text
    assert "from global step 2" in caplog.text
    lrs = {r["epoch"]: r["lr"] for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"}
    assert lrs[0] == pytest.approx(1e-5)  # epoch 0 ran under the old schedule's warmup start
    for epoch in (1, 2):  # config.yaml holds what ran, and the lr is that config's
        assert lrs[epoch] == pytest.approx(scheduled_lr(out / "config.yaml", epoch), rel=1e-6)
    assert lrs[1] > 1e-3  # above the old peak, not at the old schedule's floor (1e-5)
    with pytest.raises(SystemExit, match="^error: train.optimizer is 'sgd' but the resumed run trained with 'adamw'"):
        train(out, data, "--resume", "auto", "train.optimizer=sgd", epochs=4, steps=2)


def test_resuming_into_another_runs_folder_needs_overwrite(tmp_path):
    first, second, data = tmp_path / "first", tmp_path / "second", tmp_path / "data"
    train(first, data, epochs=1)
    train(second, data, epochs=1)
    kept = {name: digest(second / name) for name in ("best.pth", "last.pth", "metrics.jsonl")}
    with pytest.raises(SystemExit, match="^error: .*second holds another run's last.pth and best.pth; resuming "
                                         ".*first/last.pth there would replace them.*--overwrite"):
        train(second, data, "--resume", str(first / "last.pth"), epochs=2)
    assert {name: digest(second / name) for name in kept} == kept
    summary = train(second, data, "--resume", str(first / "last.pth"), "--overwrite", epochs=2)
    assert summary["global_step"] == 4 and load_file(second / "last.pth")["epoch"] == 2


def test_a_crash_inside_the_first_last_pth_save_points_to_best_pth(tmp_path, monkeypatch):
    import engine.training

    out, data = tmp_path / "run", tmp_path / "data"
    real_save = engine.training.save_checkpoint

    def crash_in_last(obj, path):
        if path.name == "last.pth":
            raise RuntimeError("simulated crash")
        real_save(obj, path)

    monkeypatch.setattr(engine.training, "save_checkpoint", crash_in_last)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(out, data, epochs=2)
    monkeypatch.setattr(engine.training, "save_checkpoint", real_save)
    assert (out / "best.pth").is_file() and not (out / "last.pth").exists()
    advice = f"best.pth but no last.pth .*saved after epoch 0.*continue from it with --resume {out / 'best.pth'}"
    with pytest.raises(SystemExit, match=advice):
        train(out, data, "--resume", "auto", epochs=2)
    resumed = train(out, data, "--resume", str(out / "best.pth"), epochs=2)
    uninterrupted = train(tmp_path / "whole", data, epochs=2)
    assert resumed["test"]["t2i"] == uninterrupted["test"]["t2i"] and resumed["global_step"] == 4
    recovered, whole = load_file(out / "last.pth")["model"], load_file(tmp_path / "whole" / "last.pth")["model"]
    assert all(torch.equal(recovered[name], whole[name]) for name in whole)  # bit-identical weights


# ---------------------------------------------------------------------------- images and the web page (issue 20)
def search_gallery(folder: Path, count: int = 6) -> Path:
    """``count`` synthetic person crops, a 200-megapixel PNG of 194 KB and a 60-megapixel one, in ``folder``."""
    from PIL import Image

    from datasets.synthetic import make_synthetic

    root = make_synthetic("cuhkpedes", folder.parent / "synth", num_ids=4, seed=0)
    folder.mkdir()
    for path in sorted((root / "imgs").rglob("*.jpg"))[:count]:
        (folder / path.name).write_bytes(path.read_bytes())
    Image.new("L", (20000, 10000)).save(folder / "bomb.png")  # above Pillow's own refusal (179 MP)
    Image.new("L", (10000, 6000)).save(folder / "large.png")  # below it: Pillow would decode it, with a warning
    return folder


def test_decompression_bombs_are_skipped_in_a_gallery_and_refused_as_queries(tmp_path):
    from datasets.transforms import load_image
    from engine.retrieval import QueryError, Retriever
    from engine.webapp import SearchPage

    gallery = search_gallery(tmp_path / "gallery")
    retriever = Retriever.from_pretrained(str(ROOT / "tests" / "fixtures" / "search_model"), device="cpu")
    index = retriever.index(str(gallery))
    assert len(index) == 6 and sorted(Path(p).name for p, _ in index.skipped) == ["bomb.png", "large.png"]
    assert all("megapixels" in why for _, why in index.skipped)
    with pytest.raises(QueryError, match="large.png: 10000x6000 pixels \\(60 megapixels\\), more than the limit of 50"):
        retriever.search_image(str(gallery / "large.png"))
    shown = SearchPage(retriever, provenance={}).search_image(str(gallery / "bomb.png"))
    assert shown.message.startswith("**Cannot search:**") and "megapixels" in shown.message
    with pytest.raises(OSError, match="60 megapixels"):  # training skips and counts it like any unreadable image
        load_image(gallery / "large.png")


# ------------------------------------------------------------------------------- one-line errors (issue 20)
@pytest.mark.parametrize("override, expected", [
    ("train.epochs=null", "'train.epochs' must be a number >= 1, got None"),
    ("data.max_bad_images=-1", "'data.max_bad_images' must be a number >= 0 \\(or null\\), got -1"),
    ("input.image_size=[32,abc]", "'input.image_size' must be \\[height, width\\], two positive integers"),
    ("sampler.num_instances=3", "train.batch_size_per_gpu 8 is not a multiple of sampler.num_instances 3"),
    ("train.lr=null", "'train.lr' must be a number > 0, got None"),
])
def test_bad_config_values_are_one_line_before_the_run_folder_is_touched(tmp_path, override, expected):
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match=f"^error: .*{expected}"):
        train(out, tmp_path / "data", override, epochs=1, steps=1)
    assert not out.exists()


def test_user_mistakes_around_runs_are_one_line(tmp_path):
    out, data = tmp_path / "run", tmp_path / "data"
    train(out, data, epochs=1, steps=1)
    with pytest.raises(SystemExit, match="^error: the checkpoint being resumed: tensor .* has shape .* in the "
                                         "checkpoint but .* in the model built from the config"):
        train(out, data, "--resume", "auto", "model.embed_dim=64", epochs=2, steps=1)  # another architecture
    records = json.loads((data / "reid_raw.json").read_text())
    (data / "no_train.json").write_text(json.dumps([r for r in records if r["split"] != "train"]))
    with pytest.raises(SystemExit, match="^error: the train split of .*no_train.json is empty"):
        train(tmp_path / "empty", data, "data.annotation_file=no_train.json", epochs=1, steps=1)
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SystemExit, match="^error: --output-dir .*a_file is a file, not a folder"):
        evaluate.main(["--checkpoint", str(out / "best.pth"), "--output-dir", str(tmp_path / "a_file")])
    with pytest.raises(SystemExit, match="^error: nothing to evaluate on: --config .*pretrain.yaml has task=pretrain"):
        evaluate.main(["--checkpoint", str(out / "best.pth"), "--config", str(ROOT / "configs" / "pretrain.yaml")])


def test_serve_with_an_impossible_port_is_one_line(tmp_path):
    import serve

    with pytest.raises(SystemExit, match="^error: --port 99999 is not a TCP port"):
        serve.main(["--checkpoint", str(tmp_path / "x.pth"), "--gallery", str(tmp_path), "--port", "99999"],
                   block=False)


def test_bench_learning_refuses_what_would_fail_after_its_first_run(tmp_path, capsys):
    from bench import bench_learning

    (tmp_path / "a_file").write_text("")
    for argv, said in ((["--num-ids", "0"], "--num-ids must be at least 3"),
                       (["--data-dir", str(tmp_path / "a_file")], "--data-dir .*a_file is a file"),
                       (["--out", str(tmp_path / "missing" / "x.jsonl")], "--out .*the folder .*missing does not")):
        with pytest.raises(SystemExit) as stopped:
            bench_learning.main([*argv, "--runs-dir", str(tmp_path / "runs"), "--dry-run"])
        assert stopped.value.code == 2 and re.search(said, capsys.readouterr().err.splitlines()[-1]), argv


def test_a_queries_file_that_is_not_utf8_is_one_line(tmp_path):
    from engine.search_session import read_queries_file
    from utils.errors import UserError

    (tmp_path / "queries.txt").write_bytes("a man in a caf\u00e9 jacket\n".encode("latin-1"))
    with pytest.raises(UserError, match="queries.txt: not UTF-8 text \\(byte 14\\)"):
        read_queries_file(tmp_path / "queries.txt")


class _BlockedSignals(torch.utils.data.Dataset):
    """One item: the signals blocked in the process that loads it."""

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.tensor(sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, [])))


@pytest.mark.skipif(not hasattr(signal, "pthread_sigmask"), reason="no signal masks on this OS")
def test_workers_start_deaf_to_a_group_sigterm_and_the_main_process_does_not():
    # A process-group SIGTERM between a worker's fork and its worker_init would kill it; start_workers forks it with
    # SIGTERM/SIGINT blocked, and the main process gets them again as soon as the workers have started.
    from datasets.build import worker_init
    from datasets.workers import closing_workers, start_workers

    loader = torch.utils.data.DataLoader(_BlockedSignals(), batch_size=None, num_workers=1, worker_init_fn=worker_init)
    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    with closing_workers(start_workers(loader)) as items:
        in_worker = set(next(items).tolist())
    assert {signal.SIGTERM, signal.SIGINT} <= in_worker
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before
    assert signal.SIGTERM not in before
    with closing_workers(iter(loader)) as items:  # forked the plain way: open to the signal until worker_init
        assert signal.SIGTERM not in set(next(items).tolist())
