"""End-to-end training tests on synthetic data with the tiny model (CPU)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import evaluate
import train_cuhkpedes
import train_icfg
import train_pretrain
import train_rstp
from tests.tiny import tiny_overrides
from utils.checkpoint import load_file
from utils.config import load_config
from engine.training import NonFiniteLossError
from utils.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def _metrics(path: Path) -> dict:
    return json.loads(path.read_text())


def test_one_step_lowers_the_loss_on_a_repeated_batch(tmp_path):
    from datasets.build import build_train_loader
    from models.ivt import build_model
    from models.objectives import RetrievalObjective
    from engine.data import build_run_tokenizer, load_data
    from utils.optim import build_optimizer

    cfg = load_config(None, tiny_overrides(tmp_path / "data") + ["model.bmm_ratio=0", "model.text_dropout=0"])
    torch.manual_seed(0)
    records, _ = load_data(cfg)
    tokenizer = build_run_tokenizer(cfg, records, None)
    loader, sampler, dataset = build_train_loader(cfg, records, tokenizer)
    sampler.set_epoch(0)
    dataset.set_epoch(0)
    batch = next(iter(loader))
    objective = RetrievalObjective(build_model(cfg), cfg.loss)
    optimizer = build_optimizer(objective.model, cfg.train)
    before = objective(batch)["cmpm_loss"]
    before.backward()
    optimizer.step()
    after = objective(batch)["cmpm_loss"]
    assert torch.isfinite(before) and after.item() < before.item()


@pytest.mark.parametrize("module, fmt", [
    (train_cuhkpedes, "cuhkpedes"), (train_icfg, "icfg"), (train_rstp, "rstp"),
])
def test_each_fine_tuning_script_then_evaluate(tmp_path, module, fmt):
    out = tmp_path / "run"
    summary = module.main(["--output-dir", str(out)] + tiny_overrides(tmp_path / "data", fmt))
    for name in ("config.yaml", "log.txt", "metrics.jsonl", "last.pth", "best.pth", "metrics_test.json",
                 "tokenizer/vocab.txt"):
        assert (out / name).is_file(), name
    written = _metrics(out / "metrics_test.json")
    assert written["t2i"]["R1"] == pytest.approx(summary["test"]["t2i"]["R1"])
    checkpoint = load_file(out / "last.pth")
    assert checkpoint["epoch"] == 2 and checkpoint["step"] == 6
    assert fmt == load_config(out / "config.yaml").data.format
    # The stored checkpoint alone rebuilds everything; evaluation reproduces the training run's test numbers.
    results = evaluate.main(["--checkpoint", str(out / "best.pth"), "--output-dir", str(tmp_path / "eval")])
    assert results["t2i"]["R1"] == pytest.approx(written["t2i"]["R1"], abs=1e-6)
    assert results["t2i"]["mAP"] == pytest.approx(written["t2i"]["mAP"], abs=1e-6)
    assert (tmp_path / "eval" / "metrics_test.json").is_file()


def test_pretrain_then_rerank_fine_tune(tmp_path):
    from datasets.synthetic import make_synthetic

    eval_root = tmp_path / "cuhk"
    make_synthetic("cuhkpedes", eval_root, num_ids=12, seed=1)
    pre_out = tmp_path / "pre"
    losses = {}
    train_pretrain.main(["--output-dir", str(pre_out)] + tiny_overrides(tmp_path / "pretrain", "pretrain")
                        + ["model.fusion_layers=1", f"data.eval_root={eval_root}"])
    for line in (pre_out / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["kind"] == "train":
            for key in ("itc_loss", "itm_loss", "mlm_loss"):
                losses.setdefault(key, []).append(record[key])
    assert set(losses) == {"itc_loss", "itm_loss", "mlm_loss"}
    zero_shot = json.loads((pre_out / "metrics_test.json").read_text())  # on the retrieval dataset's test split
    # evaluate.py finds the evaluation set in the pretraining checkpoint itself, no --config needed.
    again = evaluate.main(["--checkpoint", str(pre_out / "best.pth"), "--output-dir", str(tmp_path / "zs")])
    assert again["t2i"]["R1"] == pytest.approx(zero_shot["t2i"]["R1"], abs=1e-6)
    pretrained = load_file(pre_out / "last.pth")["model"]

    ft_out = tmp_path / "ft"
    summary = train_cuhkpedes.main(
        ["--config", str(ROOT / "configs" / "cuhkpedes_rerank.yaml"), "--output-dir", str(ft_out),
         "--init-from", str(pre_out / "last.pth")]
        + tiny_overrides(eval_root, "cuhkpedes", epochs=1, steps=1)
        + ["model.fusion_layers=1", "eval.rerank_top_k=4", "train.lr=1e-30", "train.warmup_lr_init=0",
           "train.min_lr=0"])
    # lr=1e-30: after one step the fusion weights are still exactly the pretrained ones (below an fp32 ulp).
    fine_tuned = load_file(ft_out / "last.pth")["model"]
    fusion_keys = [k for k in pretrained if k.startswith("fusion.")]
    assert fusion_keys
    for key in fusion_keys:
        torch.testing.assert_close(fine_tuned[key], pretrained[key])
    assert "t2i_rerank" in summary["test"] and "t2i" in summary["test"]
    # the fine-tuned model's known words: its pretraining's and its own captions'
    from datasets.readers import load_annotations
    from datasets.tokenizer import caption_word_list

    words = {name: load_file(out / "last.pth")["caption_words"] for name, out in (("pre", pre_out), ("ft", ft_out))}
    own = caption_word_list(r.caption for r in load_annotations("cuhkpedes", eval_root).train)
    assert words["ft"] == sorted(set(words["pre"]) | set(own)) and len(words["ft"]) > len(own)
    again = evaluate.main(["--checkpoint", str(ft_out / "best.pth"), "--output-dir", str(tmp_path / "ev")])
    assert again["t2i_rerank"]["R1"] == pytest.approx(summary["test"]["t2i_rerank"]["R1"], abs=1e-6)
    # best.pth carries the blend weight and "no good match" rule chosen on val; test and evaluate.py apply them
    carried = load_file(ft_out / "best.pth")["calibration"]
    assert carried["split"] == "val" and str(carried["rerank_blend_weight"]) in summary["test"]["rerank_blend"]["grid"]
    assert summary["test"]["calibration"] == carried == again["calibration"]
    # with the rule, how far it moved on val's held-out people: what a test evaluation sets its own rates against
    assert carried["no_match"]["held_out"]["splits"] == 10  # tiny_overrides
    assert summary["test"]["no_match"]["held_out"] == carried["no_match"]["held_out"]
    assert again["t2i_blend"]["R1"] == pytest.approx(summary["test"]["t2i_blend"]["R1"], abs=1e-6)


@pytest.mark.parametrize("neighbour_batches", [False, True])
def test_stop_and_resume_equals_uninterrupted(tmp_path, stop_after_steps, neighbour_batches):
    data = tmp_path / "data"
    overrides = tiny_overrides(data, epochs=2, steps=3) + [f"sampler.neighbour_batches={neighbour_batches}"]
    full = tmp_path / "full"
    train_cuhkpedes.main(["--output-dir", str(full)] + overrides)
    # neighbour lists are made anew at the start of each epoch, from that epoch's weights
    assert (full / "log.txt").read_text().count("neighbour batches: the ") == (2 if neighbour_batches else 0)

    parted = tmp_path / "parted"
    stop_after_steps(4)
    summary = train_cuhkpedes.main(["--output-dir", str(parted)] + overrides)
    assert summary["stopped"]
    stopped = load_file(parted / "last.pth")
    assert (stopped["epoch"], stopped["step_in_epoch"], stopped["step"]) == (1, 1, 4)
    # the neighbours epoch 1 drew its batches from (the weights at its start) travel with the checkpoint
    assert ("identity_neighbours" in stopped) == neighbour_batches
    if neighbour_batches:
        assert stopped["identity_neighbours"]["epoch"] == 1
        assert "neighbour batches: the " in (parted / "log.txt").read_text()
    train_cuhkpedes.main(["--output-dir", str(parted), "--resume", "auto"] + overrides)

    a, b = load_file(full / "last.pth"), load_file(parted / "last.pth")
    assert a["step"] == b["step"] == 6
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=0, atol=0, msg=key)
    assert _metrics(full / "metrics_test.json")["t2i"] == _metrics(parted / "metrics_test.json")["t2i"]


def test_sigterm_saves_last_and_stops(tmp_path, monkeypatch):
    from models.objectives import RetrievalObjective

    calls = {"n": 0}
    original = RetrievalObjective.forward

    def forward(self, batch):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, batch)

    monkeypatch.setattr(RetrievalObjective, "forward", forward)
    out = tmp_path / "run"
    summary = train_cuhkpedes.main(["--output-dir", str(out)] + tiny_overrides(tmp_path / "data"))
    assert summary["stopped"]
    assert load_file(out / "last.pth")["step"] == 2
    assert not (out / "metrics_test.json").exists()


def test_non_finite_loss_names_the_loss(tmp_path, monkeypatch):
    from models.objectives import RetrievalObjective

    def forward(self, batch):
        nan = self.model.encoder.cls_token.sum() * float("nan")
        return {"cmpm_loss": nan}

    monkeypatch.setattr(RetrievalObjective, "forward", forward)
    with pytest.raises(SystemExit, match="^error: cmpm_loss is nan"):  # one line, no traceback
        train_cuhkpedes.main(["--output-dir", str(tmp_path / "run")] + tiny_overrides(tmp_path / "data"))
    assert issubclass(NonFiniteLossError, UserError)


@pytest.mark.slow  # two spawned ranks under torchrun: 32 s on 2 shared cores (load 12)
def test_two_process_gloo_run_keeps_ranks_identical(tmp_path):
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
           str(ROOT / "tests" / "ddp_worker.py"), str(out)] + tiny_overrides(tmp_path / "data", epochs=1, steps=2)
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rank0 = load_file(out / "rank0.pt")
    rank1 = load_file(out / "rank1.pt")
    assert rank0["step"] == rank1["step"] == 2
    for key in rank0["model"]:
        torch.testing.assert_close(rank0["model"][key], rank1["model"][key], rtol=0, atol=0, msg=key)
    # The two ranks saw different records: their first batches' pids differ.
    assert rank0["first_pids"] != rank1["first_pids"]
    assert (out / "metrics_test.json").is_file()
    # recipe warnings come from rank 0, once: the batch (2 x 8 records against the reference 112) and the warmup
    # (tiny runs train 1 epoch with 1 warmup epoch)
    logs = result.stdout + result.stderr
    assert logs.count("global batch 16 (2 process(es) x") == 1, logs[-3000:]
    assert "the linear rule gives lr 0.0001429" in logs
    assert logs.count("never leaves warmup") == 1, logs[-3000:]


@pytest.mark.slow  # an end-to-end pretraining of 48 steps: 14 s on 2 shared cores (load 12)
def test_tiny_pretraining_lowers_all_three_losses(tmp_path):
    out = tmp_path / "pre"
    train_pretrain.main(["--output-dir", str(out)]
                        + tiny_overrides(tmp_path / "pretrain", "pretrain", num_ids=40, steps=8, epochs=6)
                        + ["model.fusion_layers=1", "train.lr=0.002", "data.check_images=none"])
    history = {key: [] for key in ("itc_loss", "itm_loss", "mlm_loss")}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["kind"] == "train":
            for key in history:
                history[key].append(record[key])
    for key, values in history.items():
        assert len(values) >= 40, key
        first, last = sum(values[:8]) / 8, sum(values[-8:]) / 8
        assert last < first, f"{key}: first 8 steps {first:.3f}, last 8 steps {last:.3f}"


def test_start_sh_prints_and_runs_the_torchrun_command():
    env = dict(os.environ, PYTHON="echo", NNODES="2", NODE_RANK="1", MASTER_ADDR="node0", MASTER_PORT="29555")
    result = subprocess.run(["bash", str(ROOT / "start.sh"), "train_icfg.py", "4", "--resume", "auto",
                             "train.epochs=3"], capture_output=True, text=True, env=env, check=True)
    printed, ran = result.stdout.splitlines()
    expected = ("-m torch.distributed.run --nproc_per_node=4 --nnodes=2 --node_rank=1 --master_addr=node0 "
                "--master_port=29555 train_icfg.py --resume auto train.epochs=3")
    assert printed == "+ echo " + expected and ran == expected
    usage = subprocess.run(["bash", str(ROOT / "start.sh")], capture_output=True, text=True)
    assert usage.returncode == 2 and "usage" in usage.stderr


def test_user_mistakes_end_with_one_line_and_leave_the_run_directory_alone(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("previous run\n")
    missing = tmp_path / "no-such-dataset"
    with pytest.raises(SystemExit) as err:
        train_cuhkpedes.main(["--output-dir", str(out)] + tiny_overrides(missing)
                             + ["data.synthesize_if_missing=false"])
    assert str(err.value).startswith("error: ") and str(missing) in str(err.value)
    assert (out / "config.yaml").read_text() == "previous run\n"
    with pytest.raises(SystemExit, match="data.format"):
        train_cuhkpedes.main(["--output-dir", str(out), "data.format=cuhk"])
    with pytest.raises(SystemExit, match="nope.yaml"):
        train_cuhkpedes.main(["--config", str(tmp_path / "nope.yaml")])
    # neighbour-batch and ITM-objective settings the run cannot use stop before the folder is taken
    for setting, says in (("sampler.neighbour_share=1.5", r"sampler.neighbour_share must be in \[0, 1\], got 1.5"),
                          ("sampler.neighbours_listed=0", "sampler.neighbours_listed must be >= 1, got 0"),
                          ("loss.itm_objective=listwise", "loss.itm_objective must be one of match | rank, got"),
                          ("loss.itm_negatives=0", r"loss.itm_negatives must be at least 1 \(ITM negatives per")):
        with pytest.raises(SystemExit, match=f"^error: {says}"):
            train_cuhkpedes.main(["--output-dir", str(out)] + tiny_overrides(tmp_path / "data") + [setting])
    with pytest.raises(SystemExit, match="^error: sampler.neighbour_batches groups persons in P x K batches, but"):
        train_pretrain.main(["--output-dir", str(out)] + tiny_overrides(tmp_path / "pre", "pretrain")
                            + ["sampler.neighbour_batches=true"])
    assert (out / "config.yaml").read_text() == "previous run\n"


@pytest.mark.slow  # spawns start.sh and a Python that imports torch: 13 s on 2 shared cores (load 12)
def test_start_sh_picks_a_python_that_has_torch(tmp_path):
    # A python3 without torch earlier on PATH (a pyenv shim, the system one) must not be chosen.
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "python3").write_text("#!/bin/sh\nexit 1\n")
    (fake / "python3").chmod(0o755)
    # A wrapper that runs this interpreter by its own path, not a symlink to it: a symlink to a virtualenv's
    # python placed outside the virtualenv does not find the virtualenv's packages.
    (fake / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (fake / "python").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "PYTHON"}
    env["PATH"] = f"{fake}:/usr/bin:/bin"
    result = subprocess.run(["bash", str(ROOT / "start.sh"), "--version-only-not-a-script.py", "1"],
                            capture_output=True, text=True, env=env)
    assert result.stdout.startswith("+ python -m torch.distributed.run"), result.stdout + result.stderr


@pytest.mark.parametrize("script", ["train_cuhkpedes.py", "train_icfg.py", "train_rstp.py", "train_pretrain.py",
                                    "evaluate.py", "retrieve.py"])
def test_help_answers_without_importing_torch(script):
    code = (f"import sys, runpy; sys.argv = [{script!r}, '--help']\n"
            f"try:\n    runpy.run_path({script!r}, run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\nprint('ok')")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.stdout.strip().endswith("ok"), result.stderr[-2000:]
