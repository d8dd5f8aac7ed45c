"""Fault injection with real processes: kill -9 in the middle of a save, SIGTERM to a process group with its
loader workers and under torchrun, a second process on a run folder in use, failures inside worker processes, a
real full disk (a tmpfs), a file size limit, and the web page's real HTTP server. Each test states the fault, then
asserts the files left behind and the exit status. Marked slow: CI runs them in their own step
(``python -m pytest -m slow``); 1 to 50 s each on the 2 shared cores under load 10-18."""
from __future__ import annotations

import errno
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

from engine.cli import EXIT_STOPPED
from tests.test_faults import corrupt_scan_data, digest, search_gallery, temporaries, train
from tests.tiny import tiny_overrides
from utils.checkpoint import DiskFullError, load_file
from utils.logging_utils import read_metrics

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # every test here spawns processes, kills them, mounts a tmpfs or serves HTTP


def spawn(args: list[str], **kwargs) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)


def logged_steps(out: Path) -> int:
    """Training records in the run's metrics.jsonl so far (its environment record aside)."""
    path = out / "metrics.jsonl"
    return sum(r["kind"] == "train" for r in read_metrics(path)) if path.is_file() else 0


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
    wait_for(lambda: logged_steps(out) >= 3)
    os.killpg(proc.pid, signal.SIGTERM)  # main process and DataLoader workers alike (scancel, kill -- -PGID)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_STOPPED, output[-3000:]
    assert "received signal" in output and "Traceback" not in output
    saved = load_file(out / "last.pth")
    assert saved["step"] >= 3 and not temporaries(out)


def test_sigterm_as_an_epoch_starts_its_workers_saves_and_exits_75(tmp_path):
    # The group's SIGTERM can reach a new epoch's workers before their worker_init makes them ignore it; killed, torch
    # would raise their death from the making of the iterator (CI saw it once). Forked deaf, they live, and the run
    # stops as asked.
    out, data = tmp_path / "run", tmp_path / "data"
    args = ["--output-dir", str(out), *tiny_overrides(data, epochs=500, steps=2), "data.num_workers=2",
            "train.eval_every_epochs=1000"]
    proc = spawn(["tests/fault_runner.py", "--term-at-loader-start", "3", *args])  # as epoch 2 starts
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_STOPPED, output[-3000:]
    assert "received signal" in output and "Traceback" not in output
    saved = load_file(out / "last.pth")
    assert (saved["epoch"], saved["step"]) == (2, 5) and not temporaries(out)  # 1 step into epoch 2


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
        wait_for(lambda: logged_steps(out) >= 3)
        os.killpg(proc.pid, signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == EXIT_STOPPED, output[-3000:]
    assert load_file(out / "last.pth")["step"] >= 3 and not temporaries(out)


# ---------------------------------------------------------------------------- the web page's server (issue 20)
def test_the_web_server_serves_only_indexed_images_and_bounds_uploads(tmp_path):  # a real HTTP server
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
        # nothing of the gallery's folder is served (results travel inside the page as thumbnails)
        for name in (indexed.name, ".env", "notes.jpg.txt", "bomb.png"):
            assert status(f"{url}gradio_api/file={gallery / name}") == 403, name
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
