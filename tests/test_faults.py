"""Fault injection: what a run keeps, and how it exits, when it is killed, signalled, or meets bad disks, data
and checkpoints. Each test states the fault, then asserts the files left behind and the exit status."""
from __future__ import annotations

import errno
import hashlib
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

import evaluate
import train_cuhkpedes
from engine.cli import EXIT_STOPPED
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


def spawn(args: list[str], **kwargs) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)


def wait_for(condition, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the fault's moment")
        time.sleep(0.2)


# ------------------------------------------------------------------------------------------- signals
def test_kill_9_in_the_middle_of_a_save_loses_nothing(tmp_path):
    out, data = tmp_path / "run", tmp_path / "data"
    # selection null: each epoch writes best.pth then last.pth; the 3rd save (epoch 1's best.pth) hangs mid-write.
    args = ["--output-dir", str(out), *tiny_overrides(data, epochs=3, steps=2), "eval.selection_split=null"]
    proc = spawn(["tests/fault_runner.py", "--stall-save", "3", *args])
    lines: list[str] = []
    wait_for(lambda: lines.append(proc.stdout.readline()) or "stalling inside save" in lines[-1])
    proc.kill()  # SIGKILL: no handler runs
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert len(temporaries(out)) == 1  # the interrupted write, never renamed into place
    assert load_file(out / "last.pth")["epoch"] == 1 and load_file(out / "best.pth")["best_epoch"] == 0

    summary = train(out, data, "--resume", "auto", "eval.selection_split=null", epochs=3)
    assert not temporaries(out)  # removed when the resumed run took the directory
    assert summary["best_epoch"] == 2 and load_file(out / "best.pth")["best_epoch"] == 2
    assert json.loads((out / "metrics_test.json").read_text())["t2i"]["R1"] == summary["test"]["t2i"]["R1"]


def test_sigterm_to_the_process_group_with_workers_saves_and_exits_75(tmp_path):
    out, data = tmp_path / "run", tmp_path / "data"
    args = ["train_cuhkpedes.py", "--output-dir", str(out), *tiny_overrides(data, epochs=500, steps=2),
            "data.num_workers=2", "train.eval_every_epochs=1000"]
    proc = spawn(args, start_new_session=True)  # its own process group, as under SLURM
    wait_for(lambda: (out / "metrics.jsonl").is_file() and len(read_metrics(out / "metrics.jsonl")) >= 3)
    os.killpg(proc.pid, signal.SIGTERM)  # main process and DataLoader workers alike (scancel, kill -- -PGID)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_STOPPED, output[-3000:]
    assert "received signal" in output and "Traceback" not in output
    saved = load_file(out / "last.pth")
    assert saved["step"] >= 3 and not temporaries(out)


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


def test_a_finished_run_exits_0_with_a_complete_log_and_shareable_files(tmp_path):
    out = tmp_path / "run"
    proc = spawn(["train_cuhkpedes.py", "--output-dir", str(out), *tiny_overrides(tmp_path / "data", epochs=1,
                                                                                    steps=2)],
                 preexec_fn=lambda: os.umask(0o022))
    output, _ = proc.communicate(timeout=300)  # stderr is a pipe, as under nohup or SLURM
    assert proc.returncode == 0, output[-3000:]
    assert (out / "metrics_test.json").is_file()
    assert "it/s]" not in output and "\r" not in output  # no progress-bar frames off a terminal
    log = (out / "log.txt").read_text().splitlines()
    assert "run directory" in log[0] and any(line.startswith("split  |") for line in log)  # from the first line
    assert log[0][:4].isdigit() and log[0][4] == "-"  # timestamps carry the date
    environment = load_file(out / "last.pth")["environment"]  # what produced it, for whoever reads it later
    assert environment["torch"] == torch.__version__ and environment["world_size"] == 1
    for name in ("last.pth", "best.pth", "metrics_test.json", "config.yaml"):
        assert (out / name).stat().st_mode & 0o777 == 0o644, name  # readable by colleagues under umask 022


# ------------------------------------------------------------------------------- worker failures (issue 20)
def corrupt_scan_data(path: str) -> None:
    """Garbage in the middle of a JPEG's entropy-coded data: header, verify() and end marker still pass."""
    raw = Path(path).read_bytes()
    Path(path).write_bytes(raw[:800] + bytes(range(256)) * 3 + raw[800 + 768:])


def run_to_the_end(args: list[str], timeout: float = 150.0) -> tuple[int, str, int]:
    """(exit status, output, process group id) of a script run in its own process group; fails on a hang."""
    proc = spawn(args, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise AssertionError(f"{args[0]} hung: no exit within {timeout} s")
    return proc.returncode, output, proc.pid


def group_is_gone(pgid: int, seconds: float = 10.0) -> bool:
    """Whether every process of the group (the DataLoader workers too) has exited within ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False


def test_a_broken_image_in_a_worker_ends_training_and_evaluation_with_one_line(tmp_path):
    from datasets.readers import load_annotations

    data, first = tmp_path / "data", tmp_path / "first"
    train(first, data, epochs=1, steps=1)
    splits = load_annotations("cuhkpedes", data)
    corrupt_scan_data(splits.val[0].image_path)
    Path(splits.test[0].image_path).write_bytes(b"a text file saved as .jpg\n")
    out = tmp_path / "run"
    # Past a start-up check that only looks for files, both bad images reach the evaluation's workers.
    status, output, pgid = run_to_the_end(["train_cuhkpedes.py", "--output-dir", str(out),
                                           *tiny_overrides(data, epochs=1, steps=2), "data.num_workers=2",
                                           "data.check_images=exists"])
    assert status == 1 and group_is_gone(pgid), output[-3000:]
    assert "Traceback" not in output and output.splitlines()[-1].startswith("error: evaluation image")
    assert Path(splits.val[0].image_path).name in output.splitlines()[-1]
    status, output, pgid = run_to_the_end(["evaluate.py", "--checkpoint", str(first / "best.pth"),
                                           "data.num_workers=2"])
    assert status == 1 and group_is_gone(pgid), output[-3000:]
    assert "Traceback" not in output and Path(splits.test[0].image_path).name in output.splitlines()[-1]


def test_a_worker_user_error_prints_its_own_message_as_one_line(tmp_path):
    from datasets.readers import load_annotations

    data = tmp_path / "data"
    train(tmp_path / "first", data, epochs=1, steps=1)
    for record in load_annotations("cuhkpedes", data).train[:2]:
        Path(record.image_path).write_bytes(b"not an image")
    status, output, pgid = run_to_the_end(["train_cuhkpedes.py", "--output-dir", str(tmp_path / "run"),
                                           *tiny_overrides(data, epochs=1, steps=2), "data.num_workers=2",
                                           "data.check_images=exists", "data.max_bad_images=0"])
    assert status == 1 and group_is_gone(pgid), output[-3000:]
    last = output.splitlines()[-1]
    assert last.startswith("error: 1 training images could not be loaded") and "Original Traceback" not in last


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


def test_a_second_process_cannot_take_a_run_folder_in_use(tmp_path):
    out, data = tmp_path / "run", tmp_path / "data"
    args = ["--output-dir", str(out), *tiny_overrides(data, epochs=3, steps=2), "eval.selection_split=null"]
    proc = spawn(["tests/fault_runner.py", "--stall-save", "3", *args])  # stalls inside epoch 1's save
    try:
        lines: list[str] = []
        wait_for(lambda: lines.append(proc.stdout.readline()) or "stalling inside save" in lines[-1])
        in_flight = temporaries(out)
        with pytest.raises(SystemExit, match=f"^error: .*run is in use by pid {proc.pid} on .*another --output-dir"):
            train(out, data, "--resume", "auto", "eval.selection_split=null", epochs=3)  # a double-submitted job
        assert len(in_flight) == 1 and temporaries(out) == in_flight  # the first run's save was left alone
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.communicate(timeout=60)
    # The lock died with its process (kill -9): the folder is free for the resumed run.
    summary = train(out, data, "--resume", "auto", "eval.selection_split=null", epochs=3)
    assert summary["global_step"] == 6 and not temporaries(out)


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


# ------------------------------------------------------------------------------ a real full disk (issue 20)
@pytest.fixture
def small_disk(tmp_path):
    """A 8 MiB tmpfs: writes there fail with the kernel's own ENOSPC, as on a full disk (needs root)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.decode().strip()}); "
                    "test_a_file_size_limit_is_reported_like_a_full_disk still makes a real write error")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def fill(disk: Path, keep_bytes: int) -> None:
    """Fill ``disk`` up to ``keep_bytes`` of free space (tmpfs counts whole 4 KiB pages)."""
    fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 65536)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    os.ftruncate(fd, max(0, os.lseek(fd, 0, os.SEEK_END) - keep_bytes))
    os.close(fd)


@pytest.mark.parametrize("free_kib", [16, 200, 600])  # torch's zip writer fails at different records of the file
def test_a_real_full_disk_at_the_save_keeps_the_checkpoints_and_says_so(tmp_path, small_disk, free_kib):
    out, data = small_disk / "run", tmp_path / "data"
    train(out, data, epochs=1, steps=2)
    kept = {name: digest(out / name) for name in ("last.pth", "best.pth")}
    fill(small_disk, free_kib * 1024)
    with pytest.raises(SystemExit, match=r"^error: disk full: could not write .*(best|last)\.pth \(the save "
                                         r"needed about 0.[0-9] MiB; 0.[0-9] MiB free.*intact"):
        train(out, data, "--resume", "auto", epochs=2, steps=2)
    assert {name: digest(out / name) for name in kept} == kept and not temporaries(out)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) > 4 and all(json.loads(line) for line in lines)


def test_a_disk_filling_up_while_logging_leaves_whole_lines_and_one_message(tmp_path, small_disk, capsys):
    import logging

    from utils.logging_utils import MetricsWriter, setup_logging

    setup_logging(small_disk, rank=0)
    writer = MetricsWriter(small_disk)
    writer.write("train", 0, {"loss": 1.0})
    fill(small_disk, 0)  # metrics.jsonl and log.txt can still fill their last page, then the kernel refuses
    try:
        for step in range(100):  # 15 kB: more than the page log.txt has left
            logging.getLogger("engine").info("step %d %s", step, "y" * 140)
        with pytest.raises(DiskFullError, match="^disk full: could not append a record to .*metrics.jsonl .*whole"):
            for step in range(1, 1000):
                writer.write("train", step, {"loss": 1.0, "note": "x" * 100})
    finally:
        setup_logging(None)
    records = read_metrics(writer.path)
    assert [r["step"] for r in records] == list(range(len(records))) and len(records) > 1
    assert writer.path.read_text().endswith("}\n")  # not a torn line
    err = capsys.readouterr().err
    assert "Logging error" not in err and err.count("log.txt: disk full, no further lines written there") == 1


def test_a_full_disk_at_the_start_of_a_run_leaves_no_empty_files(tmp_path, small_disk):
    data = tmp_path / "data"
    train(tmp_path / "first", data, epochs=1, steps=1)
    fill(small_disk, 0)
    out = small_disk / "run"
    with pytest.raises(SystemExit, match="^error: disk full: could not write .*config.yaml"):
        train(out, data, epochs=1, steps=1)
    assert not (out / "config.yaml").exists() and not (out / "log.txt").exists()


def test_a_file_size_limit_is_reported_like_a_full_disk(tmp_path):
    # RLIMIT_FSIZE makes the kernel refuse the write with EFBIG: a real write error, without root or a tmpfs.
    script = (
        "import resource, sys, torch\n"
        "from utils.checkpoint import atomic_save\n"
        "from utils.errors import user_errors_as_one_line\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))\n"
        "with user_errors_as_one_line():\n"
        f"    atomic_save({{'w': torch.zeros(200_000)}}, {str(tmp_path / 'big.pth')!r})\n"
    )
    target = tmp_path / "big.pth"
    target.write_bytes(b"previous")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 1, proc.stderr[-2000:]
    # torch's zip writer reports the refused write without its errno: named as a full disk, with the file
    assert re.match(r"error: (disk full|file size limit reached): could not write .*big\.pth",
                    proc.stderr.strip().splitlines()[-1])
    assert target.read_bytes() == b"previous" and not temporaries(tmp_path)


def test_a_stopped_run_under_torchrun_exits_75(tmp_path):
    out = tmp_path / "run"
    args = ["bash", "start.sh", "train_cuhkpedes.py", "2", "--output-dir", str(out),
            *tiny_overrides(tmp_path / "data", epochs=500, steps=2), "train.eval_every_epochs=1000"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHON=sys.executable, MASTER_PORT="29533")
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # as under SLURM: start.sh, torchrun and its ranks in one group
    try:
        wait_for(lambda: (out / "metrics.jsonl").is_file() and len(read_metrics(out / "metrics.jsonl")) >= 3)
        os.killpg(proc.pid, signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == EXIT_STOPPED, output[-3000:]
    assert load_file(out / "last.pth")["step"] >= 3 and not temporaries(out)


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


def test_the_web_server_serves_only_indexed_images_and_bounds_uploads(tmp_path):
    pytest.importorskip("gradio", reason="gradio is not installed: pip install -r requirements-serve.txt")
    import urllib.error
    import urllib.request
    import uuid

    import serve

    gallery = search_gallery(tmp_path / "gallery")
    (gallery / ".env").write_text("SECRET=1\n")
    (gallery / "notes.jpg.txt").write_text("private\n")
    app, url = serve.main(["--checkpoint", str(ROOT / "tests" / "fixtures" / "search_model"), "--gallery",
                           str(gallery), "--port", str(free_port())], block=False)
    try:
        def status(request) -> int:
            try:
                with urllib.request.urlopen(request, timeout=30) as answer:
                    return answer.status
            except urllib.error.HTTPError as refused:
                return refused.code

        indexed = sorted(gallery.glob("*.jpg"))[0]
        assert status(f"{url}gradio_api/file={indexed}") == 200
        for secret in (".env", "notes.jpg.txt", "bomb.png"):  # in the folder, not in the index
            assert status(f"{url}gradio_api/file={gallery / secret}") == 403, secret
        boundary = uuid.uuid4().hex
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a.jpg\"\r\n"
                "Content-Type: image/jpeg\r\n\r\n").encode() + b"x" * (21 << 20) + f"\r\n--{boundary}--\r\n".encode()
        upload = urllib.request.Request(f"{url}gradio_api/upload", data=body,
                                        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        assert status(upload) == 413  # 21 MB: over the page's 20 MB limit
    finally:
        app.close()


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


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
