"""The pipeline in miniature: a fine-tuning run initialised from a pretraining checkpoint keeps its vocabulary,
beats the same run from random weights, and the bench caches the pretrained checkpoint by config."""
from __future__ import annotations

import pytest

from engine.checkpoints import checkpoint_dict, init_tokenizer
from utils.checkpoint import CheckpointError
from utils.config import Config

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "coat", "##s", "man", "wear"]


def text_cfg(tokenizer: str) -> Config:
    return Config({"tokenizer": tokenizer, "lowercase": True})


def ours(record: dict | None) -> dict:
    return checkpoint_dict({}, {}, record)


def test_a_learnt_vocabulary_comes_from_the_checkpoint_not_from_the_new_captions():
    tokenizer = init_tokenizer(ours({"vocab": VOCAB, "lowercase": True}), "pre/last.pth", text_cfg("train"))
    assert [tokenizer.convert_ids_to_tokens(i) for i in range(len(VOCAB))] == VOCAB
    # a word the vocabulary lacks is cut into the pieces it holds, never given another word's id
    assert tokenizer.tokenize("A man wears red coats") == ["a", "man", "wear", "##s", "red", "coat", "##s"]


@pytest.mark.parametrize("record, tokenizer, says", [
    ({"vocab": VOCAB, "lowercase": True}, "bert-base-uncased", "set text.tokenizer=train"),
    ({"name": "bert-base-uncased"}, "train", "set text.tokenizer=bert-base-uncased"),
    (None, "train", "set text.tokenizer=bert-base-uncased"),
])
def test_a_vocabulary_mismatch_is_refused_with_the_setting_to_use(record, tokenizer, says):
    with pytest.raises(CheckpointError, match="pre/last.pth") as error:
        init_tokenizer(ours(record), "pre/last.pth", text_cfg(tokenizer))
    assert says in str(error.value)


def test_a_named_tokenizer_matching_the_checkpoint_is_built_as_usual():
    assert init_tokenizer(ours({"name": "bert-base-uncased"}), "x.pth", text_cfg("bert-base-uncased")) is None


@pytest.mark.parametrize("hardness", [1.0, 0.5, 0.0])
def test_itm_negative_hardness_scales_the_sampling_logits(monkeypatch, hardness):
    """Negatives are drawn from softmax(hardness * ITC logits): 1 the authors' hard negatives, 0 uniform."""
    import torch

    import models.objectives as objectives
    from models.ivt import build_model
    from utils.config import load_config
    from tests.tiny import TINY_MODEL

    cfg = load_config("configs/base.yaml").replace(TINY_MODEL + ["model.fusion_layers=1", "loss.cmpm_weight=0",
                                                                 "loss.itm_weight=1", "loss.itc_normalize=true",
                                                                 f"loss.itm_negative_hardness={hardness}"])
    objective = objectives.RetrievalObjective(build_model(cfg), cfg.loss)
    seen = {}

    def recording(sim, image_pids, text_pids, **kwargs):
        seen["sim"] = sim
        return torch.tensor([1, 0, 0]), torch.tensor([2, 2, 1])

    monkeypatch.setattr(objectives, "sample_hard_negatives", recording)
    torch.manual_seed(0)
    tokens, feats = torch.randn(3, 5, 32), torch.nn.functional.normalize(torch.randn(3, 32), dim=-1)
    objective._itm(tokens, feats, tokens[:, :4], feats.flip(0), torch.ones(3, 4), torch.arange(3),
                   torch.tensor(0.25))
    expected = feats @ feats.flip(0).t() / 0.25 * hardness
    torch.testing.assert_close(seen["sim"], expected)
    if hardness == 0.0:
        assert not seen["sim"].any()  # softmax of zeros: every other identity equally likely


def _first_eval(run_dir) -> dict:
    import json

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return next(r for r in records if r["kind"] == "eval")


@pytest.mark.slow
def test_the_pretraining_demo_initialises_a_fine_tuning_that_starts_ahead(tmp_path):
    """configs/demo_pretrain.yaml at tiny size end to end (mixed-style corpus, zero-shot evaluation on a target
    style), then configs/demo.yaml from its last.pth: the first evaluation beats the same run from random weights."""
    import train_cuhkpedes
    import train_pretrain
    from tests.tiny import TINY_MODEL

    target = tmp_path / "classic"
    common = TINY_MODEL + ["data.num_workers=0", "data.check_images=none", "train.amp=none",
                           "eval.batch_size=64", "train.log_every_steps=5"]
    pretrain = train_pretrain.main(
        ["--config", "configs/demo_pretrain.yaml", "--output-dir", str(tmp_path / "pre")] + common
        + ["model.fusion_layers=1", f"data.root={tmp_path / 'corpus'}", "data.synthetic_num_ids=600",
           f"data.eval_root={target}", "data.eval_synthetic_num_ids=80", "train.epochs=4",
           "train.eval_every_epochs=4", "train.lr=0.002"])
    assert "t2i" in pretrain["test"]  # evaluated zero-shot on the target style

    def fine_tune(name: str, init: list[str]) -> dict:
        train_cuhkpedes.main(["--config", "configs/demo.yaml", "--output-dir", str(tmp_path / name), *init]
                             + common + [f"data.root={target}", "data.synthesize_if_missing=false",
                                         "train.epochs=1", "train.max_steps_per_epoch=3", "seed=0"])
        return _first_eval(tmp_path / name)

    scratch = fine_tune("scratch", [])
    pretrained = fine_tune("pretrained", ["--init-from", str(tmp_path / "pre" / "last.pth")])
    assert pretrained["t2i/mAP"] > scratch["t2i/mAP"] + 5, (pretrained, scratch)
    assert pretrained["t2i/R1"] > scratch["t2i/R1"]
