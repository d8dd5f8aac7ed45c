"""python -m engine.export: the model folder round-trips through every loader with identical features, its files
are checked against their sha256; ONNX encoders match PyTorch; hubconf.py loads a retriever from another working
directory."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.retrieval import Retriever
from tests.search_fixtures import QUERY, copy_gallery, make_checkpoint, synthetic_captions
from utils.checkpoint import load_file

REPO = Path(__file__).resolve().parents[1]
TEXTS = [QUERY, "a man in a blue jacket and gray shorts carrying a black backpack", "a girl"]


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory) -> Path:
    from datasets.synthetic import make_synthetic

    return make_synthetic("cuhkpedes", tmp_path_factory.mktemp("synth") / "cuhk", num_ids=8, seed=2)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, synth_root) -> Path:
    """A tiny checkpoint in a run folder with the metrics_test.json training writes beside best.pth; it pools the
    mean of the tokens as the demo does, so every loader and the ONNX encoders must carry that setting."""
    run = tmp_path_factory.mktemp("run")
    path = make_checkpoint(run / "best.pth", synth_root, seed=5, extra=["model.feature_pool=mean"])
    metrics = {"checkpoint": str(path), "config_digest": "x", "split": "test", "counts": {"queries": 10,
               "gallery_images": 5, "identities": 2}, "chance_R1": 40.0,
               "t2i": {"R1": 50.0, "R5": 100.0, "R10": 100.0, "mAP": 61.5, "mINP": 40.0},
               "i2t": {"R1": 60.0, "R5": 100.0, "R10": 100.0, "mAP": 55.0, "mINP": 30.0}}
    (run / "metrics_test.json").write_text(json.dumps(metrics))
    (run / "metrics_val.json").write_text(json.dumps({**metrics, "checkpoint": str(run / "last.pth")}))
    return path


@pytest.fixture(scope="module")
def folder(checkpoint, tmp_path_factory) -> Path:
    from engine.export import main

    return main([str(checkpoint), str(tmp_path_factory.mktemp("export") / "ivt-tiny")])


def images_of(synth_root: Path, n: int = 6) -> list[str]:
    return sorted(str(p) for p in (synth_root / "imgs").rglob("*.jpg"))[:n]


def test_folder_layout_config_and_model_card(folder, checkpoint):
    names = {p.name for p in folder.iterdir()}
    assert {"model.safetensors", "config.json", "README.md", "vocab.txt", "tokenizer.json"} <= names
    meta = json.loads((folder / "config.json").read_text())
    assert meta["format"] == "ivt-model-folder" and meta["architecture"]["embed_dim"] == 32
    assert meta["architecture"]["feature_pool"] == "mean"
    assert meta["config"]["model"]["depth"] == 2 and meta["config"]["text"]["tokenizer"] == "train"
    assert meta["tokenizer"]["kind"] == "learnt" and meta["training"]["epoch"] == 3
    # the test metrics name this checkpoint and are taken; the val metrics are of last.pth and are not
    assert list(meta["metrics"]) == ["test"] and meta["metrics"]["test"]["t2i"]["R1"] == 50.0
    assert meta["export_environment"]["torch"] and meta["export_environment"]["python"]
    assert len(meta["source_checkpoint"]["sha256"]) == 64
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as weights:
        assert set(weights.keys()) == set(load_file(checkpoint)["model"])  # weights only
    card = (folder / "README.md").read_text()
    for part in ("## Training", "## Evaluation", "| test | text-to-image | 50.00 | 100.00", "## How to load",
                 "torch.hub.load", "## Licence", "## Citation", "cosine similarities"):
        assert part in card


def test_folder_gives_identical_features_through_every_loader(folder, checkpoint, synth_root, tmp_path):
    from engine.checkpoints import init_from_checkpoint, load_for_inference
    from models.ivt import build_model

    original = Retriever.from_checkpoint(checkpoint, device="cpu")
    exported = Retriever.from_pretrained(folder, device="cpu")
    paths = images_of(synth_root)
    assert (original.encode_images(paths) - exported.encode_images(paths)).abs().max().item() == 0.0
    assert (original.encode_texts(TEXTS) - exported.encode_texts(TEXTS)).abs().max().item() == 0.0
    assert original.tokenizer.get_vocab() == exported.tokenizer.get_vocab()

    # load_for_inference (evaluate.py's loader) and init_from_checkpoint (--init-from) read the folder
    model, cfg, _, _ = load_for_inference(folder)
    reference = load_file(checkpoint)["model"]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in reference.items())
    fresh = build_model(cfg)
    init_from_checkpoint(fresh, str(folder))
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in reference.items())


def test_evaluate_and_retrieve_accept_the_folder(folder, checkpoint, synth_root, tmp_path):
    import evaluate
    import retrieve

    def metrics(source: Path) -> dict:
        out = tmp_path / source.name
        results = evaluate.main(["--checkpoint", str(source), "--output-dir", str(out), f"data.root={synth_root}",
                                 "data.check_images=none"])
        return {k: results[k] for k in ("t2i", "i2t")}

    assert metrics(folder) == metrics(checkpoint)
    gallery = tmp_path / "gallery"
    copy_gallery(synth_root, gallery)

    def ranking(source: Path) -> list[tuple[str, float]]:
        records = retrieve.main(["--checkpoint", str(source), "--gallery", str(gallery), "--query", QUERY,
                                 "--out", str(tmp_path / f"{source.name}.png")])
        return [(hit.path, hit.score) for hit in records[0]["results"]]

    assert ranking(folder) == ranking(checkpoint)


def test_training_initialises_from_the_folder(folder, synth_root, tmp_path):
    from engine.checkpoints import initialise_weights
    from models.ivt import build_model
    from utils.config import load_config
    from tests.search_fixtures import TINY

    cfg = load_config(None, TINY + [f"model.init_from={folder}"])
    model = build_model(cfg)
    initialise_weights(model, cfg, None)
    reference = Retriever.from_pretrained(folder, device="cpu").model.state_dict()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in reference.items())


def bert_style_vocab(synth_root: Path, folder: Path) -> Path:
    """A 1000-token BERT-style vocabulary folder covering the synthetic captions (as a hub tokenizer would be)."""
    from datasets.tokenizer import SPECIAL_TOKENS, save_tokenizer, tokenizer_from_vocab

    captions = synthetic_captions(synth_root)
    words = sorted({w for c in captions for w in c.lower().replace(",", " , ").replace(".", " . ").split()})
    chars = sorted({ch for w in words for ch in w})
    tokens = list(SPECIAL_TOKENS) + chars + ["##" + ch for ch in chars] + [w for w in words if w not in chars]
    tokens += [f"[unused{i}]" for i in range(1000 - len(tokens))]
    return save_tokenizer(tokenizer_from_vocab(tokens, lowercase=True), folder)


def test_pretrained_tokenizer_travels_in_the_folder(synth_root, tmp_path):
    """A named (BERT-style) tokenizer is written into the folder and read from there, not from its source."""
    import shutil

    from datasets.tokenizer import build_tokenizer
    from engine.exporting import export_model_folder
    from utils.config import load_config

    vocab_dir = bert_style_vocab(synth_root, tmp_path / "bert")
    named = [f"text.tokenizer={vocab_dir}", "model.vocab_size=1000"]
    checkpoint = make_checkpoint(tmp_path / "named.pth", synth_root, seed=6, extra=named,
                                 tokenizer=build_tokenizer(load_config(None, named).text))
    out = export_model_folder(checkpoint, tmp_path / "named")
    assert json.loads((out / "config.json").read_text())["tokenizer"]["kind"] == "pretrained"
    expected = Retriever.from_checkpoint(checkpoint, device="cpu").encode_texts(TEXTS)
    shutil.rmtree(vocab_dir)  # the folder must not need the tokenizer's original location
    exported = Retriever.from_pretrained(out, device="cpu")
    assert exported.cfg.text.tokenizer == str(out.resolve())
    assert (exported.encode_texts(TEXTS) - expected).abs().max().item() == 0.0


def test_export_mistakes_are_one_line(checkpoint, folder, tmp_path, monkeypatch):
    from engine.export import main

    def error(*argv: str) -> str:
        with pytest.raises(SystemExit) as info:
            main(list(argv))
        message = str(info.value.code)
        assert message.startswith("error: ") and "\n" not in message
        return message

    torch.save({"state_dict": {}}, tmp_path / "other.pth")
    assert "neither one of our checkpoints" in error(str(tmp_path / "other.pth"), str(tmp_path / "o"))
    assert "already a model folder" in error(str(folder), str(tmp_path / "o"))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "thesis.tex").write_text("mine")
    assert "not empty and not a model folder" in error(str(checkpoint), str(tmp_path / "busy"))
    assert "checkpoint not found" in error(str(tmp_path / "nope.pth"), str(tmp_path / "o"))
    hub = pytest.importorskip("huggingface_hub", reason="huggingface_hub is not installed")
    monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", True)
    message = error(str(checkpoint), str(tmp_path / "up"), "--push-to-hub", "someone/ivt-tiny")
    assert "HF_HUB_OFFLINE" in message and (tmp_path / "up" / "model.safetensors").is_file()


def flip_byte(path: Path, offset_from_end: int) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_flipped_byte_in_the_weights_is_a_one_line_error(folder, checkpoint, tmp_path, caplog):
    import hashlib
    import shutil

    import evaluate
    from engine.checkpoints import load_for_inference
    from utils.checkpoint import CheckpointError, load_file

    meta = json.loads((folder / "config.json").read_text())
    recorded = meta["files_sha256"]
    assert {"model.safetensors", "vocab.txt", "tokenizer.json"} <= set(recorded)
    assert recorded["model.safetensors"] == hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    copy = Path(shutil.copytree(folder, tmp_path / "copy"))
    flip_byte(copy / "model.safetensors", 100)  # inside the last tensor's data: safetensors alone would load it
    with pytest.raises(CheckpointError, match=r"copy/model.safetensors: sha256 \w+\.\.\. differs"):
        load_for_inference(copy)
    with pytest.raises(SystemExit) as info:
        evaluate.main(["--checkpoint", str(copy), "--device", "cpu"])
    assert str(info.value.code).startswith("error: ") and "model.safetensors" in str(info.value.code)
    assert "\n" not in str(info.value.code)

    # the tokenizer files are read too, and checked the same way
    vocab = Path(shutil.copytree(folder, tmp_path / "vocab"))
    (vocab / "vocab.txt").write_text((folder / "vocab.txt").read_text().replace("\n", "\nextra\n", 1))
    with pytest.raises(CheckpointError, match=r"vocab/vocab.txt: sha256"):
        load_for_inference(vocab)

    # a folder exported before the checksums were recorded loads as before, saying that it was not verified
    old = Path(shutil.copytree(folder, tmp_path / "old"))
    meta.pop("files_sha256")
    meta["format_version"] = 1
    (old / "config.json").write_text(json.dumps(meta))
    with caplog.at_level("INFO"):
        model, _, _, _ = load_for_inference(old)
    assert "no checksum recorded for model.safetensors" in caplog.text
    reference = load_file(checkpoint)["model"]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in reference.items())


def test_folder_files_have_plain_permissions_and_no_selection_metrics_line(checkpoint, tmp_path, caplog):
    from engine.export import main

    run = tmp_path / "run"
    run.mkdir()
    (run / "best.pth").write_bytes(checkpoint.read_bytes())
    # what training writes for its selection evaluations: no checkpoint named
    (run / "metrics_val.json").write_text(json.dumps({"checkpoint": None, "split": "val", "t2i": {"R1": 1.0}}))
    previous = os.umask(0o022)
    try:
        with caplog.at_level("INFO"):
            out = main([str(run / "best.pth"), str(tmp_path / "plain")])
    finally:
        os.umask(previous)
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in out.iterdir()}
    assert set(modes.values()) == {"0o644"}, modes
    assert "None" not in caplog.text and "metrics_val" not in caplog.text
    assert json.loads((out / "config.json").read_text())["metrics"] == {}


@pytest.mark.parametrize("module", ["engine.export", "engine.convert_official", "evaluate"])
def test_module_help_answers_at_once(module):
    import time

    code = (f"import runpy, sys; sys.argv = [{module!r}, '--help']\n"
            f"try:\n    runpy.run_module({module!r}, run_name='__main__', alter_sys=True)\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\nprint('ok')")
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    elapsed = time.perf_counter() - started
    assert result.stdout.strip().endswith("ok"), result.stderr[-2000:]
    assert result.stdout.startswith("usage: ") and elapsed < 2.0, elapsed


def test_a_broken_folder_is_a_user_error(folder, tmp_path):
    import shutil

    from engine.checkpoints import load_for_inference
    from utils.checkpoint import CheckpointError

    broken = Path(shutil.copytree(folder, tmp_path / "broken"))
    (broken / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing model.safetensors"):
        load_for_inference(broken)
    with pytest.raises(CheckpointError, match="not a model folder"):
        load_for_inference(tmp_path)


@pytest.mark.slow  # exports and runs two ONNX encoders: 20 s on 2 shared cores (load 10-12)
def test_onnx_encoders_match_pytorch(checkpoint, synth_root, tmp_path, capfd, caplog):
    for module in ("onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(module, reason=f"{module} is not installed (pip install -r requirements-onnx.txt)")
    import numpy as np
    import onnxruntime

    from engine.encoding import tokenize
    from engine.export import main

    capfd.readouterr()
    with caplog.at_level("INFO"):  # the command's level: the exporter's passes log at INFO
        out = main([str(checkpoint), str(tmp_path / "with-onnx"), "--onnx"])
    console = capfd.readouterr()
    # the exporter's chatter (~100 lines) is in the log file; the console has the command's own few lines
    exporter_log = (out / "onnx_export.log").read_text()
    assert len(exporter_log.splitlines()) > 20 and "initializer" in exporter_log
    shown = (console.out + console.err).splitlines() + caplog.text.splitlines()
    assert len(shown) <= 4 and "onnx_export.log" in caplog.text, shown
    meta = json.loads((out / "config.json").read_text())
    assert meta["files"]["text_encoder_onnx"] == "text_encoder.onnx"
    assert {"image_encoder.onnx", "text_encoder.onnx", "onnx_export.log"} <= set(meta["files_sha256"])
    assert "## ONNX" in (out / "README.md").read_text()
    retriever = Retriever.from_pretrained(out, device="cpu")
    model = retriever.model
    options = {"providers": ["CPUExecutionProvider"]}
    images = torch.stack([retriever.transform(retriever_image(p)) for p in images_of(synth_root, 3)])  # batch 3
    session = onnxruntime.InferenceSession(str(out / "image_encoder.onnx"), **options)
    got = session.run(None, {"images": images.numpy()})[0]
    with torch.no_grad():
        want = model.encode_image(images, bmm=False)[1].numpy()
    assert got.shape == want.shape and np.abs(got - want).max() <= 1e-4
    # texts of another batch size and length than at export time, padded with a mask
    ids, mask = tokenize(retriever.tokenizer, TEXTS + ["a woman in a long pink dress with white shoes"] * 2,
                         retriever.cfg.text.max_text_len, "cpu")
    assert ids.shape[0] == 5 and ids.shape[1] > 8 and (mask == 0).any()
    session = onnxruntime.InferenceSession(str(out / "text_encoder.onnx"), **options)
    got = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
    with torch.no_grad():
        want = model.encode_text(ids, mask, bmm=False)[1].numpy()
    assert got.shape == want.shape and np.abs(got - want).max() <= 1e-4


def retriever_image(path: str):
    from datasets.transforms import load_image

    return load_image(path)


@pytest.mark.slow  # a spawned Python process: 17 s on 2 shared cores (load 10-12)
def test_hubconf_loads_a_retriever_from_another_working_directory(folder, checkpoint, synth_root, tmp_path):
    gallery = tmp_path / "photos"
    copy_gallery(synth_root, gallery)
    script = (
        "import json, sys, torch\n"
        "for source in sys.argv[1:]:\n"
        f"    r = torch.hub.load({str(REPO)!r}, 'retriever', checkpoint=source, gallery='photos', source='local')\n"
        f"    print(json.dumps([[h.path, h.score, h.rank] for h in r.search({QUERY!r}, k=3)]))\n"
    )
    env = {**os.environ, "PYTHONPATH": ""}  # the repository is not importable from here except through the hub
    done = subprocess.run([sys.executable, "-c", script, str(folder), str(checkpoint)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    from_folder, from_checkpoint = (json.loads(line) for line in done.stdout.strip().splitlines()[-2:])
    expected = Retriever.from_checkpoint(checkpoint, device="cpu")
    expected.index(gallery)
    assert from_folder == from_checkpoint
    assert [(Path(p).name, rank) for p, _, rank in from_folder] == [
        (Path(h.path).name, h.rank) for h in expected.search(QUERY, k=3)]
