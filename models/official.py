"""The authors' IVT checkpoints (their key names are listed in tests/fixtures/ivt_official_keys.json) in this project's names.

Fine-tuned checkpoints (212 keys) hold ``encoder_vl`` plus unused classifier/bottleneck/temp; pretraining
checkpoints (377 keys) add ``encoder_fusion`` (6 BERT layers with cross-attention, tied MLM head) and ``itm``.
This module maps tensor names and writes no file: ``python -m engine.convert_official IN.pth OUT.pth`` writes the
converted checkpoint. A converted file holds every tensor of our model, so it loads strictly (``evaluate.py``,
``retrieve.py``, ``--init-from``): a fine-tuned ``temp``, unused by the authors' fine-tuning, is kept there as
``temperature``. Loading the authors' file directly (``load_official_into``) leaves ``temperature`` at its
configured init instead; nothing at inference reads it.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn

from models.encoder import grid_size
from models.weights import WeightsError, adapt_grid_embeddings, infer_grid, strip_prefix, summarise_names

_log = logging.getLogger(__name__)

OFFICIAL_IMAGE_SIZE = (384, 128)

_FUSION = "encoder_fusion."
_FUSION_LAYER = re.compile(r"encoder_fusion\.bert\.encoder\.layer\.(\d+)\.(.+)")
# Tied pairs in the authors' pretraining model: (our key, [source keys holding the same tensor]).
_TIED = {
    "mlm_head.decoder.weight": ("encoder_fusion.cls.predictions.decoder.weight",
                                "encoder_fusion.bert.embeddings.word_embeddings.weight"),
    "mlm_head.decoder.bias": ("encoder_fusion.cls.predictions.decoder.bias", "encoder_fusion.cls.predictions.bias"),
}
# Present in the authors' checkpoints, deliberately not converted (unused by their forward passes).
_DROPPED_PREFIXES = ("classifier_img.", "bottleneck_img.", "encoder_vl.embeddings.position_ids",
                     "encoder_fusion.bert.embeddings.position_ids",
                     "encoder_fusion.bert.embeddings.position_embeddings.",
                     "encoder_fusion.bert.embeddings.token_type_embeddings.",
                     "encoder_fusion.bert.embeddings.LayerNorm.")


def _state_dict_of(obj: object) -> Optional[dict[str, Any]]:
    """The authors' state dict inside ``obj`` ({'state_dict': ...} container or bare), 'module.' stripped."""
    if not isinstance(obj, Mapping):
        return None
    state = obj.get("state_dict", obj)
    if not isinstance(state, Mapping):
        return None
    return strip_prefix(state, "module.")


def is_official_checkpoint(obj: object) -> bool:
    """True for the authors' container or bare state dict (recognised by its ``encoder_vl.*`` tensors)."""
    state = _state_dict_of(obj)
    return bool(state) and "encoder_vl.cls_token" in state and "encoder_vl.pos_embed" in state and all(
        isinstance(v, torch.Tensor) for v in state.values())


def _describe_keys(obj: object) -> str:
    if not isinstance(obj, Mapping):
        return f"an object of type {type(obj).__name__}"
    keys = list(obj.keys())
    shown = ", ".join(map(str, keys[:12])) + (f", ... ({len(keys)} keys)" if len(keys) > 12 else "")
    return f"a dict with keys [{shown}]"


def _overrides(state: Mapping[str, torch.Tensor], fusion_layers: int, img_size: Sequence[int]) -> dict[str, Any]:
    """Model settings implied by the tensors; the stride comes from the pos_embed length."""
    required = ["encoder_vl.patch_embed.proj.weight", "encoder_vl.blocks.0.mlp_vis.fc1.weight",
                "encoder_vl.embeddings.word_embeddings.weight", "encoder_vl.embeddings.position_embeddings.weight",
                "encoder_vl.embeddings.token_type_embeddings.weight"]
    absent = [k for k in required if k not in state]
    if absent:
        raise WeightsError(f"the authors' checkpoint lacks {', '.join(absent)}")
    patch = state["encoder_vl.patch_embed.proj.weight"].shape[-1]
    dim = state["encoder_vl.cls_token"].shape[-1]
    depth = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder_vl.blocks."))
    tokens = state["encoder_vl.pos_embed"].shape[1]
    grid = infer_grid(tokens, img_size, patch, "encoder_vl.pos_embed")
    stride = next(s for s in range(patch, 0, -1) if grid_size(img_size, patch, s) == grid)
    return {
        "stride": stride, "patch_size": patch, "embed_dim": dim, "depth": depth,
        # Head count is not stored; the authors' models use 64-dim heads (12 heads at 768).
        "num_heads": max(1, dim // 64),
        "mlp_ratio": state["encoder_vl.blocks.0.mlp_vis.fc1.weight"].shape[0] / dim,
        "qkv_bias": "encoder_vl.blocks.0.attn.qkv.bias" in state,
        "vocab_size": state["encoder_vl.embeddings.word_embeddings.weight"].shape[0],
        "max_text_positions": state["encoder_vl.embeddings.position_embeddings.weight"].shape[0],
        "type_vocab_size": state["encoder_vl.embeddings.token_type_embeddings.weight"].shape[0],
        "fusion_layers": fusion_layers,
    }


def convert_official(obj: object, img_size: Sequence[int] = OFFICIAL_IMAGE_SIZE, *, keep_temperature: bool = False
                     ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Authors' checkpoint -> (state dict in our names, model config overrides).

    Every source tensor is either converted or dropped by name with a log line; anything unknown raises.
    Tied copies (MLM decoder weight = fusion word embeddings, decoder bias = predictions bias) must agree.
    ``temp`` becomes ``temperature`` for pretraining checkpoints; a fine-tuned checkpoint's ``temp`` (unused by
    the authors' fine-tuning) is dropped unless ``keep_temperature``, which a converted file needs to be complete.
    """
    if not is_official_checkpoint(obj):
        raise WeightsError("not an IVT checkpoint by the authors (expected 'encoder_vl.*' tensors, bare or under "
                         f"'state_dict', optionally prefixed 'module.'); found {_describe_keys(obj)}")
    state = _state_dict_of(obj)
    pretrain = any(k.startswith(_FUSION) for k in state)
    out: dict[str, torch.Tensor] = {}
    dropped, unknown = [], []
    tied_sources = {src for sources in _TIED.values() for src in sources}
    for key, tensor in state.items():
        match = _FUSION_LAYER.fullmatch(key)
        if key in tied_sources:
            continue  # resolved below, once per tied pair
        if key == "temp" and (pretrain or keep_temperature):
            out["temperature"] = tensor
        elif key == "temp" or key.startswith(_DROPPED_PREFIXES):
            dropped.append(key)
        elif key.startswith("encoder_vl."):
            out["encoder." + key[len("encoder_vl."):]] = tensor
        elif match:
            out[f"fusion.layer.{match.group(1)}.{match.group(2)}"] = tensor
        elif key.startswith("encoder_fusion.cls.predictions.transform."):
            out["mlm_head." + key[len("encoder_fusion.cls.predictions."):]] = tensor
        elif key.startswith("itm."):
            out["itm_head." + key[len("itm."):]] = tensor
        else:
            unknown.append(key)
    if unknown:
        raise WeightsError(f"unrecognised keys in the authors' checkpoint: {', '.join(summarise_names(unknown))}")
    merged = 0
    for ours, sources in _TIED.items():
        present = [s for s in sources if s in state]
        if not present:
            continue
        merged += len(present) - 1
        first = state[present[0]]
        for other in present[1:]:
            differs = state[other].shape != first.shape or (
                first.device.type != "meta" and not torch.equal(state[other], first))
            if differs:
                raise WeightsError(f"'{present[0]}' and '{other}' are tied in the authors' model but differ here")
        out[ours] = first
    fusion_layers = len({m.group(1) for m in map(_FUSION_LAYER.fullmatch, state) if m})
    overrides = _overrides(state, fusion_layers, img_size)
    _log.info("converted %d of %d tensors from the authors' %s checkpoint (stride %d; %d tied copies merged); "
              "dropped as unused: %s", len(out), len(state), "pretraining" if pretrain else "fine-tuned",
              overrides["stride"], merged, ", ".join(summarise_names(dropped)) or "none")
    return out, overrides


def load_official_into(model: nn.Module, obj: object, img_size: Sequence[int] = OFFICIAL_IMAGE_SIZE,
                       allow_fresh: Sequence[str] = ()) -> dict[str, Any]:
    """Convert ``obj`` and load it strictly into ``model``; return the overrides the checkpoint implies.

    pos_embed/type_embed are resampled when the model's grid differs. Fusion/ITM/MLM tensors are dropped
    (logged) when the model has no fusion stack, as the authors' fine-tuning does. Missing keys raise unless
    they are ``temperature`` for a fine-tuned checkpoint (its ``temp`` is unused) or start with a prefix in
    ``allow_fresh``.
    """
    state, overrides = convert_official(obj, img_size)
    if not getattr(model, "has_fusion", False):
        extra = [k for k in state if k.startswith(("fusion.", "itm_head.", "mlm_head."))]
        if extra:
            _log.info("model has no fusion stack: skipping %d pretraining-only tensors", len(extra))
            state = {k: v for k, v in state.items() if k not in set(extra)}
    if state["encoder.pos_embed"].shape != model.encoder.pos_embed.shape:
        source_grid = grid_size(img_size, overrides["patch_size"], overrides["stride"])
        state = adapt_grid_embeddings(state, model, "encoder.", source_grid=source_grid)
    fresh = tuple(allow_fresh) + (() if "temperature" in state else ("temperature",))
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(fresh)]
    if result.unexpected_keys or missing:
        raise WeightsError(f"authors' checkpoint does not fit the model: unexpected {result.unexpected_keys}, "
                         f"missing {summarise_names(missing)}")
    if result.missing_keys:
        _log.info("left at init: %s", ", ".join(result.missing_keys))
    return overrides
