"""The training benches on CPU at CI size (bench.train_step, bench.train_epoch, bench.train_memory): the step
mode's FLOPs, FLOP/s and phase breakdown, the end-to-end and memory modes the GPU script runs, the summary it
writes, the one machine record every bench writes, and the script itself (syntax)."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
from pathlib import Path

import pytest
import torch

from bench import base, summarize, train_epoch, train_memory, train_step
from models.config import IVTConfig
from models.flops import expected_step_flops
from utils.config import load_config

ROOT = Path(__file__).resolve().parents[1]
MICRO = ["--device", "cpu", "--sizes", "tiny", "--batch", "4", "--steps", "1", "--warmup", "1", "--threads", "1"]


@pytest.fixture(autouse=True)
def micro_size(monkeypatch):
    # The tiny bench size, smaller still: the test checks the plumbing, bench runs give the figures.
    monkeypatch.setitem(base.SIZES, "tiny", [
        "model.embed_dim=32", "model.depth=2", "model.num_heads=2", "input.image_size=[32,16]",
        "model.patch_size=8", "model.stride=8", "model.vocab_size=400", "model.max_text_positions=64",
        "text.max_text_len=48"])


def test_step_mode_prints_flops_flop_rate_mfu_and_phases(tmp_path, capsys):
    out = tmp_path / "step.json"
    rows = train_step.main(MICRO + ["--profile-steps", "1", "--peak-tflops", "2.0", "--json", str(out),
                                     "--variants", "baseline,pad16"])
    printed = capsys.readouterr().out
    for text in ("model FLOPs/step", "achieved", "TFLOP/s", "MFU", "phases ms/step", "forward", "backward",
                 "optimizer", "host syncs/step"):
        assert text in printed, text
    baseline, pad16 = rows
    # FLOPs: the mean of the formula over the bench's four batches, at their padded text lengths.
    cfg = load_config(None, base.SIZES["tiny"] + ["train.batch_size_per_gpu=4"])
    config = IVTConfig.from_config(cfg)
    lengths = [base.make_batch(cfg, 4, (8, 58), seed, False)["text_ids"].shape[1] for seed in range(4)]
    want = statistics.mean(expected_step_flops(config, 12, 12, n).train for n in lengths)
    assert baseline["TFLOP_per_step"] * 1e12 == pytest.approx(want)
    assert pad16["TFLOP_per_step"] > baseline["TFLOP_per_step"]  # padded texts cost more FLOPs
    assert baseline["TFLOPs"] == pytest.approx(baseline["TFLOP_per_step"] / baseline["step_s"])
    assert baseline["MFU"] == pytest.approx(baseline["TFLOPs"] / 2.0)
    phases = baseline["phases"]
    assert set(phases["host_ms"]) == {"data", "forward", "backward", "optimizer"}
    assert phases["host_ms"]["forward"] > 0 and phases["host_ms"]["backward"] > 0
    assert phases["wall_ms"]["forward"] > 0
    assert all("_drop_tokens" in site for site in baseline["host_sync_sites"])
    record = json.loads(out.read_text())
    assert record["rows"][0]["variant"] == "baseline"
    machine = record["machine"]  # --threads 1 is applied before the record states it
    assert machine["torch_threads"] == 1 and machine["torch"] == torch.__version__ and machine["device"] == "cpu"
    assert {"torch_interop_threads", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "git_commit", "loadavg"} <= set(machine)


def test_one_machine_record_built_on_the_environment_record():
    from utils.environment import environment_record

    record, environment = base.machine_record("cpu"), environment_record("cpu")
    assert {k: record[k] for k in environment} == environment
    assert record["nproc"] == os.cpu_count() and len(record["loadavg"]) == 3
    assert json.loads(json.dumps(record)) == record  # plain values: it goes into JSON files as it is
    # No bench keeps a record of its own.
    for path in sorted((ROOT / "bench").glob("*.py")):
        assert "def machine_state" not in path.read_text(), path.name


def test_end_to_end_and_memory_modes_and_the_summary(tmp_path, capsys):
    counts = ["--train-ids", "6", "--train-images", "12", "--train-captions", "24", "--eval-ids", "3",
              "--eval-images", "4", "--eval-captions", "8"]
    data = tmp_path / "data"
    results = tmp_path / "results"
    for name, extra in (("e2e_cpu_augment", []),
                        ("e2e_device_augment", ["--set", "data.augment_on=device",
                                                "--set", f"data.image_cache={tmp_path / 'cache'}"])):
        rows = train_epoch.main(MICRO + counts + ["--data-dir", str(data), "--max-steps", "2",
                                                  "--data-workers", "0", "--set", "data.num_workers=0",
                                                  "--json", str(results / f"{name}.json")] + extra)
        r = rows[0]
        assert r["steps_per_epoch"] == 6 and r["steps_run"] == 2  # 24 records, 4 per batch
        assert r["epoch_s"] > 0 and r["projected_total_h"] > 0 and r["loader_alone_batches_per_s"] > 0
        assert r["eval"]["test"]["counts"]["queries"] == 8
    assert (tmp_path / "cache" / "index.json").is_file()
    rows = train_memory.main(MICRO + ["--memory-budgets", "12", "--json", str(results / "memory.json")])
    assert [r["variant"] for r in rows[:-1]] == ["4x1", "4x1 ckpt", "2x2", "2x2 ckpt", "1x4 ckpt"]
    assert [r["exact"] for r in rows[:-1]] == [True, True, False, False, False]  # accumulation changes CMPM
    assert rows[-1] == {"memory_table": []}  # no memory cap on a CPU
    assert "end-to-end" in capsys.readouterr().out
    text = summarize.summarize(results)
    assert "## End to end: e2e_device_augment" in text and "## Memory budgets" in text


def test_the_gpu_script_parses_and_names_every_stage():
    script = ROOT / "bench" / "gpu_checks.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    text = script.read_text()
    for stage in ("-m bench.train_step", "--variants", "-m bench.train_epoch", "-m bench.e2e_data",
                  "-m bench.train_memory", "--memory-budgets 12,16,24,40,80", "-m bench.bench_eval", "--cpu-smoke",
                  "-m bench.summarize"):
        assert stage in text, stage


def test_every_variant_is_a_setting_a_recipe_can_select():
    # A variant is config overrides only: an unknown key or value is a ConfigError here, as in a recipe.
    assert set(train_step.VARIANTS) >= {"baseline", "compile", "after"}
    for name, overrides in train_step.VARIANTS.items():
        data = load_config(None, overrides).to_dict()
        for override in overrides:
            section, key = override.split("=")[0].split(".")
            assert str(data[section][key]).lower() == override.split("=")[1].lower(), (name, override)
    assert load_config(None, train_step.VARIANTS["compile"]).train.compile is True


def test_the_step_is_built_by_the_engine_phases(monkeypatch):
    from engine import training

    called = []
    for phase in ("build_network", "new_run", "set_train_module", "set_optimizer"):
        real = getattr(training, phase)
        monkeypatch.setattr(training, phase, lambda *a, _real=real, _name=phase, **k: called.append(_name)
                            or _real(*a, **k))
    cfg = load_config(None, base.SIZES["tiny"] + base.NO_WEIGHTS)
    run = base.build_step(cfg, base.torch.device("cpu"))
    assert called == ["build_network", "new_run", "set_train_module", "set_optimizer"]
    assert run.train_module is run.objective and run.optimizer is not None


@pytest.mark.slow  # four child processes (store, build, two query phases), ~30 s
def test_the_search_scale_bench_reports_every_key_the_issue_names(tmp_path):
    pytest.importorskip("faiss", reason="faiss is optional (pip install -r requirements-search.txt)")
    import numpy as np

    from bench import search_scale

    result = search_scale.run_scale([20_000], [32], tmp_path / "work", tmp_path / "out", 1, {}, "test")
    rows = {r["backend"]: r for r in result["rows"]}
    keys = {"num_gallery", "dim", "backend", "index_type", "recall_at_1", "recall_at_10", "p50_ms", "p95_ms",
            "batch64_ms_per_query", "peak_rss_gib", "bytes_on_disk", "build_s"}
    assert set(rows) == {"exact", "faiss"} and all(keys <= set(r) for r in rows.values())
    assert rows["faiss"]["index_type"] == "PQ32x4fs"  # 2 x 48 sub-quantizers, lowered to a divisor of 32
    assert rows["exact"]["recall_at_10"] == 1.0 and rows["faiss"]["recall_at_10"] >= 0.95
    assert json.loads((tmp_path / "out.json").read_text())["rows"][1]["num_gallery"] == 20_000
    # the ground truth is the brute-force top 10 of the stored float16 features
    folder = tmp_path / "work" / "n20000_d32"
    truth = np.load(folder.parent / "n20000_d32_truth.npy")
    from engine.gallery_index import open_gallery
    feats = open_gallery(folder, 0).features
    queries = torch.from_numpy(np.load(folder.parent / "n20000_d32_queries.npy"))
    assert np.array_equal(truth, torch.topk(queries @ feats.t(), 10, dim=1).indices.numpy())
    sweep = search_scale.nprobe_sweep(tmp_path / "work", 20_000, 32, [1], rescore=[10, 1000])
    assert sweep[0]["recall_at_10"] <= sweep[1]["recall_at_10"] and sweep[1]["rescore_candidates"] == 1000
