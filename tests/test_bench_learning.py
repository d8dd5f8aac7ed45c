"""bench.bench_learning without training: its variants are valid configs, it reads a run's files right, and the
table shows the spread over seeds."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from utils.config import load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    from bench import bench_learning

    return bench_learning


def test_every_ablation_variant_is_a_valid_config(bench) -> None:
    demo_epochs = load_config(ROOT / "configs" / "demo.yaml").train.epochs
    for name, extra in bench.ABLATION.values():
        config = ROOT / "configs" / "demo.yaml"
        if extra and extra[0].startswith("@"):
            config, extra = ROOT / extra[0][1:], extra[1:]
        cfg = load_config(config, extra)
        if "BMM" in name and name.startswith("without"):
            assert cfg.model.bmm_ratio == 0
        if "MLA" in name and name.startswith("without"):
            assert list(cfg.text.levels) == ["sentence"] and cfg.input.num_views == 1
        assert cfg.train.epochs == demo_epochs, name  # one change per row, not a longer schedule
    rerank = load_config(ROOT / "configs" / "demo_rerank.yaml")
    assert rerank.model.fusion_layers > 0 and rerank.eval.rerank_top_k > 0


def _fake_run(run_dir: Path, val: list[tuple[int, float, float]], test: tuple[float, float]) -> None:
    run_dir.mkdir(parents=True)
    lines = [{"kind": "train", "step": 1, "loss": 3.0}]
    lines += [{"kind": "eval", "step": 10 * e, "epoch": e, "score": r1, "t2i/R1": r1, "t2i/mAP": ap}
              for e, r1, ap in val]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (run_dir / "metrics_test.json").write_text(json.dumps(
        {"t2i": {"R1": test[0], "R5": 80.0, "mAP": test[1]}, "chance_R1": 1.79}))


def test_reads_the_selected_epoch_and_the_test_metrics(bench, tmp_path: Path) -> None:
    _fake_run(tmp_path / "run", [(4, 20.0, 25.0), (9, 41.5, 44.0), (14, 39.0, 45.0)], (47.0, 50.5))
    got = bench.read_run(tmp_path / "run")
    assert (got["val_R1"], got["val_mAP"], got["best_epoch"]) == (41.5, 44.0, 9)
    assert (got["test_R1"], got["test_mAP"], got["chance_R1"]) == (47.0, 50.5, 1.79)
    assert got["val_curve"] == [(4, 20.0), (9, 41.5), (14, 39.0)] and "test_R1_rerank" not in got
    test_file = tmp_path / "run" / "metrics_test.json"
    test_file.write_text(json.dumps({**json.loads(test_file.read_text()), "t2i_rerank": {"R1": 30.0, "mAP": 41.0}}))
    got = bench.read_run(tmp_path / "run")
    assert (got["test_R1"], got["test_R1_rerank"], got["test_mAP_rerank"]) == (47.0, 30.0, 41.0)


def test_table_shows_mean_spread_and_marks_the_held_out_style(bench) -> None:
    rows = [{"variant": "v", "style": "cctv", "val_R1": r, "val_mAP": r, "test_R1": r + 1, "test_mAP": r,
             "chance_R1": 1.8, "wall_s": 300.0} for r in (40.0, 44.0, 48.0)]
    rows.append({"variant": "v", "style": "street", "val_R1": 50.0, "val_mAP": 51.0, "test_R1": 52.0,
                 "test_mAP": 53.0, "chance_R1": 1.8, "wall_s": 240.0})
    text = bench.table(rows, "variant")
    cctv = next(line for line in text.splitlines() if "cctv" in line)
    assert "cctv (held out)" in cctv and "| 3 |" in cctv
    assert "45.0 ± 4.0 (41.0-49.0)" in cctv  # test R@1: mean ± sample std (min-max)
    assert "5.0 min" in cctv
    street = next(line for line in text.splitlines() if "street" in line)
    assert "| 1 |" in street and "52.0" in street
    assert "re-ranked" not in text
    rows[-1].update(test_R1_rerank=30.5, test_mAP_rerank=40.25)
    reranked = bench.table(rows, "variant").splitlines()[-1]
    assert reranked.startswith("| v, ITM re-ranked | street | 1 |") and "| 30.5 | 40.2 |" in reranked


def test_ablation_runs_the_named_variants_or_all(bench, tmp_path: Path, capsys) -> None:
    common = ["--dry-run", "--num-ids", "6", "--seeds", "0", "--styles", "classic",
              "--data-dir", str(tmp_path / "data"), "--runs-dir", str(tmp_path / "runs")]
    bench.main([*common, "--ablation", "no-bmm", "rerank"])
    commands = [line for line in capsys.readouterr().out.splitlines() if line.startswith("$ ")]
    assert len(commands) == 2
    assert "model.bmm_ratio=0" in commands[0] and "configs/demo.yaml" in commands[0]
    assert "configs/demo_rerank.yaml" in commands[1] and "model.bmm_ratio=0" not in commands[1]
    bench.main([*common, "--ablation"])
    assert sum(line.startswith("$ ") for line in capsys.readouterr().out.splitlines()) == len(bench.ABLATION)


def test_dry_run_prints_one_command_per_style_and_seed(bench, tmp_path: Path, capsys) -> None:
    rows = bench.main(["--dry-run", "--num-ids", "6", "--seeds", "0", "1", "--styles", "classic", "cctv",
                       "--data-dir", str(tmp_path / "data"), "--runs-dir", str(tmp_path / "runs"),
                       "train.epochs=2", "--name", "variant", "train.lr=0.002"])  # overrides around an option
    assert rows == []
    commands = [line for line in capsys.readouterr().out.splitlines() if line.startswith("$ ")]
    assert len(commands) == 4
    assert all("train.epochs=2" in c and "train.lr=0.002" in c and "data.synthesize_if_missing=false" in c
               for c in commands)
    assert sum("seed=1" in c.split() for c in commands) == 2
    assert json.loads((tmp_path / "data" / "cctv-6-seed0" / "SYNTHETIC.json").read_text())["style"] == "cctv"


def test_the_pretrained_checkpoint_is_cached_by_config_digest(bench, tmp_path, monkeypatch) -> None:
    """--pretrain runs the pretraining once per resolved config; a changed override pretrains anew."""
    children = []

    def fake_child(command, log_path):
        run_dir = Path(command[command.index("--output-dir") + 1])
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "metrics.jsonl").write_text(json.dumps(
            {"kind": "eval", "step": 4, "time": time.time(), "epoch": 0, "t2i/R1": 12.5, "t2i/mAP": 20.0,
             "score": 12.5}) + "\n")
        (run_dir / "last.pth").write_bytes(b"weights")
        children.append(command)
        return 42.0

    monkeypatch.setattr(bench, "run_child", fake_child)
    config = str(ROOT / "configs" / "demo_pretrain.yaml")
    first, record = bench.pretrain_once(config, ["train.epochs=2"], tmp_path, dry_run=False)
    again, cached = bench.pretrain_once(config, ["train.epochs=2"], tmp_path, dry_run=False)
    assert len(children) == 1 and again == first and cached == record
    assert record["zero_shot_val_curve"] == [[0, 12.5]] and record["wall_s"] == 42.0
    assert first.parent.name == f"pretrain-{load_config(config, ['train.epochs=2']).digest()}"
    changed, _ = bench.pretrain_once(config, ["train.epochs=3"], tmp_path, dry_run=False)
    assert len(children) == 2 and changed.parent != first.parent
    # an unfinished run (no marker: the child failed or was killed) is not taken for a cached one
    (changed.parent / "PRETRAINED.json").unlink()
    bench.pretrain_once(config, ["train.epochs=3"], tmp_path, dry_run=False)
    assert len(children) == 3


def test_pretrained_json_holds_the_finished_attempt_alone(bench, tmp_path, monkeypatch) -> None:
    """A pretraining killed mid-way left its evaluations in metrics.jsonl; the attempt that finishes is the only
    one PRETRAINED.json's curve comes from, even if its records land in the same file."""
    config = str(ROOT / "configs" / "demo_pretrain.yaml")
    run_dir = bench.pretrain_run_dir(config, ["train.epochs=2"], tmp_path)
    run_dir.mkdir(parents=True)
    killed = [{"kind": "eval", "step": 4 * e, "time": time.time() - 600 + e, "epoch": e, "t2i/R1": 5.0 + e}
              for e in range(2)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in killed))

    def appending_child(command, log_path):  # as a run that kept the old file would write
        with open(run_dir / "metrics.jsonl", "a") as handle:
            for epoch in range(2):
                handle.write(json.dumps({"kind": "eval", "step": 4 * epoch, "time": time.time(), "epoch": epoch,
                                         "t2i/R1": 12.5 + epoch}) + "\n")
        return 7.0

    monkeypatch.setattr(bench, "run_child", appending_child)
    _, record = bench.pretrain_once(config, ["train.epochs=2"], tmp_path, dry_run=False)
    assert record["zero_shot_val_curve"] == [[0, 12.5], [1, 13.5]]
    assert json.loads((run_dir / "PRETRAINED.json").read_text())["zero_shot_val_curve"] == [[0, 12.5], [1, 13.5]]


def test_init_from_fine_tunes_every_run_from_the_checkpoint_given(bench, tmp_path: Path, capsys) -> None:
    checkpoint = tmp_path / "earlier" / "last.pth"
    common = ["--dry-run", "--num-ids", "6", "--seeds", "0", "--styles", "classic", "street",
              "--data-dir", str(tmp_path / "data"), "--runs-dir", str(tmp_path / "runs")]
    with pytest.raises(SystemExit):
        bench.main([*common, "--init-from", str(checkpoint)])
    assert f"--init-from {checkpoint}: no such file" in capsys.readouterr().err
    checkpoint.parent.mkdir()
    checkpoint.write_bytes(b"weights")
    with pytest.raises(SystemExit):
        bench.main([*common, "--init-from", str(checkpoint), "--pretrain", "configs/demo_pretrain.yaml"])
    assert "not both" in capsys.readouterr().err
    bench.main([*common, "--init-from", str(checkpoint)])
    commands = [line for line in capsys.readouterr().out.splitlines() if line.startswith("$ ")]
    assert len(commands) == 2 and all(f"--init-from {checkpoint}" in c and "-pretrained-" in c for c in commands)
