"""The pipeline in miniature: a fine-tuning run initialised from a pretraining checkpoint keeps its vocabulary,
beats the same run from random weights, and the bench caches the pretrained checkpoint by config."""
from __future__ import annotations

import pytest

from engine.checkpoints import init_tokenizer
from utils.checkpoint import FORMAT_NAME, CheckpointError
from utils.config import Config

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "coat", "##s", "man", "wear"]


def text_cfg(tokenizer: str) -> Config:
    return Config({"tokenizer": tokenizer, "lowercase": True})


def ours(record: dict | None) -> dict:
    return {"format": FORMAT_NAME, "model": {}, "tokenizer": record}


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
