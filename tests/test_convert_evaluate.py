"""Converting an authors' fine-tuned checkpoint, then evaluating the converted file, gives the same metrics as
evaluating the authors' file directly (python -m engine.convert_official, then evaluate.py)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from utils.checkpoint import load_file
import yaml

AUTHORS_TEMP = 0.3125  # a value no model initialises to, so the test sees where the converted one came from


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory) -> Path:
    from datasets.synthetic import make_synthetic

    return make_synthetic("cuhkpedes", tmp_path_factory.mktemp("synth") / "cuhk", num_ids=20, seed=0)


@pytest.fixture(scope="module")
def bert_folder(synth_root, tmp_path_factory) -> Path:
    """A BERT-style vocabulary folder (1000 tokens) covering the synthetic captions; the authors' checkpoints
    carry no tokenizer, so evaluating one needs a vocabulary folder."""
    from datasets.readers import load_annotations
    from datasets.tokenizer import SPECIAL_TOKENS, save_tokenizer, tokenizer_from_vocab

    captions = [r.caption for r in load_annotations("cuhkpedes", synth_root).train]
    words = sorted({w for c in captions for w in c.lower().replace(",", " , ").replace(".", " . ").split()})
    chars = sorted({ch for w in words for ch in w})
    tokens = list(SPECIAL_TOKENS) + chars + ["##" + ch for ch in chars] + [w for w in words if w not in chars]
    assert len(tokens) <= 1000
    tokens += [f"[unused{i}]" for i in range(1000 - len(tokens))]
    return save_tokenizer(tokenizer_from_vocab(tokens, lowercase=True), tmp_path_factory.mktemp("bert") / "vocab")


def authors_finetuned_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """A tiny fine-tuned checkpoint laid out as the authors' training saves it: DDP 'module.' names, encoder_vl at
    their 384x128 input (stride 16: 24x8 patches + CLS), their unused temp, classifier and bottleneck, the legacy
    (non-zip) serialisation, and the {state_dict, optimizer, epoch, best_acc} container."""
    from models.config import IVTConfig
    from models.ivt import IVT

    torch.manual_seed(0)
    encoder = IVT(IVTConfig(img_size=(384, 128), patch_size=16, stride=16, embed_dim=64, depth=2, num_heads=1,
                            vocab_size=1000, max_text_positions=128)).encoder.state_dict()
    state = {"module.encoder_vl." + k: v.clone() for k, v in encoder.items()}
    state.update({
        "module.temp": torch.tensor(AUTHORS_TEMP),
        "module.encoder_vl.embeddings.position_ids": torch.arange(128)[None],
        "module.classifier_img.weight": torch.randn(7, 64),
        "module.bottleneck_img.weight": torch.ones(64), "module.bottleneck_img.bias": torch.zeros(64),
        "module.bottleneck_img.running_mean": torch.zeros(64), "module.bottleneck_img.running_var": torch.ones(64),
        "module.bottleneck_img.num_batches_tracked": torch.tensor(0),
    })
    assert state["module.encoder_vl.pos_embed"].shape == (1, 193, 64)
    torch.save({"state_dict": state, "optimizer": {"state": {}, "param_groups": []}, "epoch": 61, "best_acc": 0.52},
               path, _use_new_zipfile_serialization=False)
    return state


def test_converted_finetuned_checkpoint_evaluates_like_the_original(synth_root, bert_folder, tmp_path):
    import evaluate
    from engine.convert_official import main as convert_main

    original = tmp_path / "authors" / "checkpoint_best.pth"
    original.parent.mkdir()
    state = authors_finetuned_checkpoint(original)
    converted = tmp_path / "converted" / "out.pth"
    convert_main([str(original), str(converted)])

    saved = load_file(converted)
    assert saved["model"]["temperature"].item() == AUTHORS_TEMP  # kept, so the file is complete
    assert torch.equal(saved["model"]["encoder.pos_embed"], state["module.encoder_vl.pos_embed"])

    # A tiny recipe: the synthetic CUHK-PEDES-format data, small batches, no workers, at the checkpoint's 384x128.
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({
        "data": {"format": "cuhkpedes", "root": str(synth_root), "num_workers": 0, "pin_memory": False},
        "text": {"tokenizer": str(bert_folder), "max_text_len": 64},
        "eval": {"batch_size": 8, "amp": False},
    }))
    # The converted file carries its own config (base + the architecture), of which --config replaces data and eval
    # only; the overrides make the text settings the same for both.
    overrides = [f"data.root={synth_root}", f"text.tokenizer={bert_folder}", "text.max_text_len=64"]
    results = {}
    for name, checkpoint in (("original", original), ("converted", converted)):
        out = tmp_path / f"metrics_{name}"
        results[name] = evaluate.main(["--checkpoint", str(checkpoint), "--config", str(config),
                                       "--output-dir", str(out), "--device", "cpu", *overrides])
        on_disk = json.loads((out / "metrics_test.json").read_text())
        assert on_disk["t2i"] == pytest.approx(results[name]["t2i"])

    a, b = results["original"], results["converted"]
    assert a["counts"] == b["counts"] == {"queries": 20, "gallery_images": 10, "identities": 3}
    for direction in ("t2i", "i2t"):
        assert a[direction] == b[direction], direction
    assert 0.0 < a["t2i"]["mAP"] < 100.0
