"""evaluate.py on a finished training run: the run's own files stay as training wrote them, and the epoch it
reports is the one the training log names."""
from __future__ import annotations

import json
import re

import pytest

import evaluate
import train_cuhkpedes
from tests.tiny import tiny_overrides
from utils.checkpoint import load_file


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    out = tmp / "run"
    train_cuhkpedes.main(["--output-dir", str(out)] + tiny_overrides(tmp / "data", epochs=2, steps=2))
    return out


def test_evaluate_leaves_the_runs_metrics_untouched(run_dir):
    before = (run_dir / "metrics_test.json").read_bytes()
    results = evaluate.main(["--checkpoint", str(run_dir / "best.pth"), "--save-examples", "2"])
    assert (run_dir / "metrics_test.json").read_bytes() == before
    own = json.loads((run_dir / "metrics_test_best.json").read_text())
    trained = json.loads(before)
    assert own["t2i"]["R1"] == pytest.approx(trained["t2i"]["R1"], abs=1e-6) == results["t2i"]["R1"]
    assert own["t2i"]["mAP"] == pytest.approx(trained["t2i"]["mAP"], abs=1e-6)
    assert (run_dir / "examples_test_best" / "index.html").is_file()
    from PIL import Image

    from utils.visualize import THUMB_SIZE

    picture = Image.open(sorted((run_dir / "examples_test_best").glob("query_*.png"))[0])
    assert picture.height > 2 * THUMB_SIZE[1]  # each result drawn twice: as it is and with its "why" heatmap
    assert not (run_dir / "examples_test").exists()
    # --output-dir pointing at the run folder still keeps the checkpoint's name
    evaluate.main(["--checkpoint", str(run_dir / "last.pth"), "--output-dir", str(run_dir)])
    assert (run_dir / "metrics_test.json").read_bytes() == before
    assert (run_dir / "metrics_test_last.json").is_file()


def test_evaluate_reports_the_epoch_of_the_training_log(run_dir, caplog):
    best = load_file(run_dir / "best.pth")
    log = (run_dir / "log.txt").read_text()
    # the training log names the best epoch in its selection lines: "(best X at epoch E)"
    logged_best = int(re.findall(r"best [0-9.]+ at epoch (\d+)\)", log)[-1])
    assert best["best_epoch"] == logged_best == best["epoch"] - 1  # the checkpoint stores the next epoch
    with caplog.at_level("INFO", logger="evaluate"):
        evaluate.main(["--checkpoint", str(run_dir / "best.pth"), "--split", "val"])
    saved = json.loads((run_dir / "metrics_val_best.json").read_text())
    assert saved["epoch"] == logged_best
    assert f"epoch {logged_best} as in its training log" in caplog.text
    last = evaluate.main(["--checkpoint", str(run_dir / "last.pth"), "--output-dir", str(run_dir / "elsewhere")])
    assert last["epoch"] == 1 and "epoch 1 step" in log and "epoch 2 step" not in log  # epochs 0 and 1 in the log


def test_model_epoch_rule():
    from utils.checkpoint import model_epoch

    assert model_epoch({"epoch": 5}) == 4  # saved at the end of epoch 4: the next to run is 5
    assert model_epoch({"epoch": 5, "step_in_epoch": 0}) == 4
    assert model_epoch({"epoch": 6, "step_in_epoch": 7}) == 6  # stopped inside epoch 6
    assert model_epoch({"epoch": None}) is None and model_epoch({}) is None


def test_one_epoch_number_in_log_checkpoint_evaluate_page_and_model_card(run_dir, tmp_path):
    from engine.retrieval import Retriever
    from engine.webapp import gather_provenance, provenance_markdown
    from engine.export import main as export_main
    from utils.checkpoint import model_epoch

    best = load_file(run_dir / "best.pth")
    logged_best = int(re.findall(r"best [0-9.]+ at epoch (\d+)\)", (run_dir / "log.txt").read_text())[-1])
    assert best["best_epoch"] == model_epoch(best) == logged_best
    assert evaluate.main(["--checkpoint", str(run_dir / "best.pth"), "--output-dir", str(tmp_path / "ev")])[
        "epoch"] == logged_best
    folder = export_main([str(run_dir / "best.pth"), str(tmp_path / "folder")])
    assert f"epoch {logged_best} as numbered in the training log" in (folder / "README.md").read_text()
    for source in (run_dir / "best.pth", folder):
        retriever = Retriever.from_checkpoint(source, device="cpu") if source.is_file() else \
            Retriever.from_pretrained(source, device="cpu")
        panel = provenance_markdown(gather_provenance(retriever, str(source), "", None))
        assert re.findall(r"epoch (\d+) as numbered in the training log", panel) == [str(logged_best)], panel
