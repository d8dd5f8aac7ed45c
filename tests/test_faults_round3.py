"""Faults of the third reliability round, as real processes meet them: --overwrite over a finished run, a loader
worker stopped or killed by a real signal, a second run while the first is inside its first save, SIGTERM during
the final test, a signal that lands inside a log flush, read-only outputs. Every test here is slow."""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import train_cuhkpedes
from engine.cli import EXIT_STALLED, EXIT_STOPPED
from tests.tiny import tiny_overrides
from utils.checkpoint import load_file
from utils.logging_utils import read_metrics

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def train(out: Path, data: Path, *extra: str, epochs: int = 1, steps: int = 2) -> dict:
    return train_cuhkpedes.main(["--output-dir", str(out), *tiny_overrides(data, epochs=epochs, steps=steps), *extra])


def spawn(args: list[str], **kwargs) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)


def read_until(proc: subprocess.Popen, words: str, timeout: float = 180.0) -> list[str]:
    """The process's output lines up to the first that holds ``words``."""
    deadline, lines = time.monotonic() + timeout, []
    while not lines or words not in lines[-1]:
        if time.monotonic() > deadline or proc.poll() is not None and not lines[-1:]:
            raise AssertionError(f"never printed {words!r}: {''.join(lines)[-2000:]}")
        lines.append(proc.stdout.readline())
    return lines


# ----------------------------------------------------------------------------------------- --overwrite
def test_overwrite_sets_the_previous_run_aside_and_starts_every_record_afresh(tmp_path):
    out, data = tmp_path / "run", tmp_path / "data"
    first = train(out, data, epochs=1, steps=2)
    old_records = read_metrics(out / "metrics.jsonl")
    old_test = (out / "metrics_test.json").read_text()
    second = train(out, data, "--overwrite", epochs=2, steps=3)
    records = read_metrics(out / "metrics.jsonl")
    # only the second run's records: 2 epochs x 3 steps of train records, its 2 evaluations and its test
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert [r["kind"] for r in records].count("eval") == 2 and [r["kind"] for r in records].count("test") == 1
    assert second["global_step"] == 6 and first["global_step"] == 2
    [aside] = (out / "replaced").iterdir()  # nothing of the first run is lost
    assert read_metrics(aside / "metrics.jsonl") == old_records
    assert (aside / "metrics_test.json").read_text() == old_test
    assert load_file(aside / "last.pth")["step"] == 2 and load_file(out / "last.pth")["step"] == 6
    assert "the previous run's files are now in" in (out / "log.txt").read_text()
    assert (aside / "log.txt").read_text().count("run directory") == 1  # each log holds one run


def test_the_learning_bench_reads_only_the_records_of_the_run_it_started(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_learning", ROOT / "bench" / "bench_learning.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out, data = tmp_path / "run", tmp_path / "data"
    train(out, data, "train.epochs=3", epochs=3, steps=2)  # a previous run, three evaluations
    started = time.time()
    train(out, data, "--overwrite", epochs=1, steps=2)
    got = bench.read_run(out, since=started)
    assert [epoch for epoch, _ in got["val_curve"]] == [0]  # this run's one evaluation, not four
    assert got["val_R1"] == read_metrics(out / "metrics.jsonl")[-2]["t2i/R1"]


# ------------------------------------------------------------------------------------ loader workers
def test_a_stopped_worker_ends_the_run_with_last_pth_and_its_name(tmp_path):
    out, data = tmp_path / "run", tmp_path / "data"
    args = ["--output-dir", str(out), *tiny_overrides(data, epochs=50, steps=20), "data.num_workers=2",
            "train.stall_stop_seconds=3", "train.stall_warning_seconds=1", "eval.selection_split=null"]
    proc = spawn(["tests/worker_fault_runner.py", "--worker-signal", "STOP", "5", *args])
    stopped_pid = int(read_until(proc, "signalling worker pid")[-1].split()[-1])
    output, _ = proc.communicate(timeout=180)
    assert proc.returncode == EXIT_STALLED, output[-3000:]
    [line] = [x for x in output.splitlines() if x.startswith("error:")]
    assert f"(pid {stopped_pid}) is stopped" in line and "train.stall_stop_seconds 3" in line
    assert "last.pth saved at epoch 0" in line and "Traceback" not in output
    with pytest.raises(ProcessLookupError):  # the stopped worker did not outlive its run
        os.kill(stopped_pid, 0)
    summary = train(out, data, "--resume", "auto", "eval.selection_split=null", epochs=1, steps=2)
    assert summary["global_step"] == 2 and summary["test"] is not None


def test_a_worker_killed_by_the_kernel_is_one_line_with_cause_and_remedy(tmp_path):
    out, data = tmp_path / "run", tmp_path / "data"
    args = ["--output-dir", str(out), *tiny_overrides(data, epochs=2, steps=3), "data.num_workers=2",
            "eval.selection_split=null"]
    proc = spawn(["tests/worker_fault_runner.py", "--worker-signal", "KILL", "5", *args])
    output, _ = proc.communicate(timeout=180)
    assert proc.returncode == 1, output[-3000:]
    assert "Traceback" not in output and "ConnectionResetError" not in output
    [line] = [x for x in output.splitlines() if x.startswith("error:")]
    assert "was killed by SIGKILL, most likely by the kernel's out-of-memory killer" in line
    assert "data.num_workers 2" in line and "--resume auto" in line
    assert load_file(out / "last.pth")["step"] == 0


# ------------------------------------------------------------------------------------------ signals
def test_a_second_run_during_the_first_save_is_told_the_first_is_still_running(tmp_path):
    out, data = tmp_path / "run", tmp_path / "data"
    # selection on val: epoch 0 saves best.pth (save 1), then last.pth (save 2), which hangs mid-write
    args = ["--output-dir", str(out), *tiny_overrides(data, epochs=3, steps=2)]
    proc = spawn(["tests/fault_runner.py", "--stall-save", "2", *args])
    try:
        read_until(proc, "stalling inside save")
        assert (out / "best.pth").is_file() and not (out / "last.pth").exists()
        for extra in ([], ["--resume", "auto"], ["--overwrite"]):
            with pytest.raises(SystemExit, match=f"in use by pid {proc.pid} .*still running") as caught:
                train(out, data, *extra, epochs=3)
            assert "stopped" not in str(caught.value)
        assert (out / "best.pth").is_file() and not (out / "replaced").exists()  # --overwrite moved nothing
    finally:
        proc.kill()
        proc.communicate(timeout=60)


def test_sigterm_during_the_final_test_exits_75_and_resume_auto_runs_the_test(tmp_path):
    out, data = tmp_path / "run", tmp_path / "data"
    script = ("import os, signal, sys; sys.argv[1:1] = []; import engine.training as t; real = t.test_selected_model\n"
              "def test(run):\n    print('final test starts', flush=True); os.kill(os.getpid(), signal.SIGTERM)\n"
              "    return real(run)\n"
              "t.test_selected_model = test\n"
              "import train_cuhkpedes; from engine.cli import exit_status\n"
              "raise SystemExit(exit_status(train_cuhkpedes.main(sys.argv[1:])))\n")
    proc = spawn(["-c", script, "--output-dir", str(out), *tiny_overrides(data, epochs=1, steps=2)])
    output, _ = proc.communicate(timeout=180)
    assert proc.returncode == EXIT_STOPPED, output[-3000:]
    assert "final test starts" in output and "received signal 15 during the final test" in output
    assert "--resume auto runs the test" in output and not (out / "metrics_test.json").exists()
    summary = train(out, data, "--resume", "auto", epochs=1, steps=2)
    assert summary["global_step"] == 2 and json.loads((out / "metrics_test.json").read_text())["t2i"]["R1"] >= 0


def test_the_signal_handler_never_logs_so_a_flush_it_interrupts_loses_nothing(capsys):
    from engine.training import StopRequest

    class FlushThenSignal(logging.StreamHandler):
        """A handler whose flush is where SIGTERM arrives (as it did once in five group SIGTERMs)."""

        def flush(self):
            if not fired:
                fired.append(1)
                signal.raise_signal(signal.SIGTERM)
            super().flush()

    fired: list[int] = []
    engine_logger = logging.getLogger("engine")
    handler = FlushThenSignal(sys.stderr)
    engine_logger.addHandler(handler)
    try:
        with StopRequest() as stop:
            engine_logger.warning("a line being flushed")
            assert fired and stop.requested
            # the handler wrote nothing: a write from inside a flush of the same stream is what raised "reentrant
            # call" and lost the line
            assert "received signal" not in capsys.readouterr().err
            assert stop.agreed(None)
    finally:
        engine_logger.removeHandler(handler)
    err = capsys.readouterr().err  # the loop's check said it, once
    assert "Logging error" not in err and "reentrant" not in err
    assert err.count("received signal 15: saving last.pth at the next step and stopping") == 1


# ------------------------------------------------------------------------------------ read-only outputs
def test_outputs_that_cannot_be_written_are_refused_before_the_evaluation_runs(tmp_path, read_only, monkeypatch):
    import engine.evaluate_run
    import evaluate
    from engine.export import main as export_main

    out, data = tmp_path / "run", tmp_path / "data"
    train(out, data, epochs=1, steps=1)
    checkpoint = out / "best.pth"

    def never(*args, **kwargs):
        raise AssertionError("the evaluation ran although its results could not be written")

    # where evaluate.py's run looks the name up (patching engine.evaluation would leave evaluate_run, if first
    # imported during this test, holding the stand-in for every later test)
    monkeypatch.setattr(engine.evaluate_run, "evaluate_model", never)
    read_only(out)
    for extra in ([], ["--save-examples", "2"]):  # next to a checkpoint in a read-only folder
        with pytest.raises(SystemExit, match=f"^error: the metrics file metrics_test_best.json \\(--output-dir\\): "
                                             f"cannot write in {out}: Read-only file system"):
            evaluate.main(["--checkpoint", str(checkpoint), *extra])
    mount = read_only(tmp_path / "ro")
    with pytest.raises(SystemExit, match=f"^error: the metrics file .*cannot write in {mount} \\(where "
                                         f"{mount / 'eval'} would be created\\): Read-only file system"):
        evaluate.main(["--checkpoint", str(checkpoint), "--output-dir", str(mount / "eval")])
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "examples_test").write_text("a file where the examples folder goes")
    with pytest.raises(SystemExit, match="^error: the example pictures' folder \\(--save-examples\\): .*examples_test "
                                         "is a file, not a folder"):
        evaluate.main(["--checkpoint", str(checkpoint), "--output-dir", str(tmp_path / "eval"),
                       "--save-examples", "2"])
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == ["examples_test"]
    with pytest.raises(SystemExit, match=f"^error: the model folder: cannot write in {mount} .*Read-only file system"):
        export_main([str(checkpoint), str(mount / "model")])
