"""Explicit loading of pretrained weights into IVT: timm ViT -> image side, transformers BERT -> text side.

Mapping as in the authors' ``load_param_hybrid`` (docs/recipe.md, initialisation). Every loader
returns a :class:`LoadReport` (also logged) and raises :class:`WeightsError` on a shape mismatch before copying
anything.
"""
from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn as nn
from timm.layers import resample_abs_pos_embed

from models.encoder import grid_size
from utils.checkpoint import load_file
from utils.errors import UserError

_log = logging.getLogger(__name__)

GRID_EMBEDDINGS = ("pos_embed", "type_embed")


class WeightsError(UserError, ValueError):
    """Pretrained weights that cannot be loaded into the model; the message names the source and the tensor."""


@dataclass
class LoadReport:
    """What a loader did. ``missing``: our parameters left at init; ``unexpected``: source tensors we did not
    recognise; ``ignored``: source tensors dropped on purpose (heads, tied copies, unused BERT parts)."""

    source: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    resampled: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"loaded {len(self.loaded)} tensors from {self.source}"]
        for name in ("resampled", "ignored", "unexpected", "missing"):
            names = getattr(self, name)
            if names:
                lines.append(f"  {name} ({len(names)}): {', '.join(summarise_names(names))}")
        return "\n".join(lines)


def summarise_names(names: Sequence[str]) -> list[str]:
    """Collapse layer indices so that a log line stays short: blocks.3.norm1.weight -> blocks.*.norm1.weight."""
    return sorted({re.sub(r"\.\d+\.", ".*.", name) for name in names})


def strip_prefix(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Remove ``prefix`` from every key that has it (e.g. DDP's 'module.')."""
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}


def unwrap_state_dict(obj: object, source: str) -> dict[str, torch.Tensor]:
    """A plain state dict, or one wrapped as {'model': ...} / {'state_dict': ...}; values must be tensors."""
    if isinstance(obj, Mapping):
        for wrapper in ("model", "state_dict"):
            if isinstance(obj.get(wrapper), Mapping):
                obj = obj[wrapper]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise WeightsError(f"{source}: expected a non-empty state dict (optionally under 'model' or 'state_dict')")
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            raise WeightsError(f"{source}: entry '{key}' is a {type(value).__name__}, expected a tensor")
    return dict(obj)


def _encoder(model: nn.Module) -> nn.Module:
    return getattr(model, "encoder", model)


def copy_into(model: nn.Module, assignments: Sequence[tuple[str, str, torch.Tensor]], source: str) -> list[str]:
    """Copy (our_name, source_name, tensor) triples into ``model``; all shapes are checked before any copy.

    Returns the names written. Unknown destination names and shape mismatches raise ``ValueError``.
    """
    params = dict(model.named_parameters())
    params.update(dict(model.named_buffers()))
    for dst, src, tensor in assignments:
        if dst not in params:
            raise WeightsError(f"{source}: '{src}' maps to '{dst}', which the model does not have")
        if tuple(params[dst].shape) != tuple(tensor.shape):
            raise WeightsError(f"{source}: shape mismatch: source '{src}' {list(tensor.shape)} vs model '{dst}' "
                             f"{list(params[dst].shape)}")
    with torch.no_grad():
        for dst, _, tensor in assignments:
            params[dst].copy_(tensor)
    return sorted({dst for dst, _, _ in assignments})


def _finish(report: LoadReport, model: nn.Module) -> LoadReport:
    loaded = set(report.loaded)
    report.missing = [name for name, _ in model.named_parameters() if name not in loaded]
    _log.info(report.summary())
    return report


# --------------------------------------------------------------------------------------------- grid embeddings

def infer_grid(num_tokens: int, img_size: Sequence[int], patch_size: int, what: str = "pos_embed"
               ) -> tuple[int, int]:
    """The patch grid of a [1, 1+gy*gx, D] embedding, trying strides 1..patch_size at ``img_size``."""
    grids = {grid_size(img_size, patch_size, s) for s in range(1, patch_size + 1)}
    fits = sorted(g for g in grids if g[0] * g[1] + 1 == num_tokens)
    if not fits:
        raise WeightsError(f"{what} has {num_tokens} tokens, but no stride 1..{patch_size} at image size "
                         f"{img_size[0]}x{img_size[1]} (patch {patch_size}) gives 1 + gy*gx = {num_tokens}")
    if len(fits) > 1:
        raise WeightsError(f"{what} with {num_tokens} tokens fits several grids {fits}; pass the source grid")
    return fits[0]


def resample_grid_embedding(embedding: torch.Tensor, old_grid: Sequence[int], new_grid: Sequence[int]
                            ) -> torch.Tensor:
    """[1, 1+old_gy*old_gx, D] -> [1, 1+new_gy*new_gx, D]; the CLS row is kept, the grid is resized bilinearly
    without antialiasing (the authors' ``F.interpolate(mode='bilinear')``)."""
    if embedding.ndim != 3 or embedding.shape[0] != 1 or embedding.shape[1] != old_grid[0] * old_grid[1] + 1:
        raise WeightsError(f"expected an embedding [1, {old_grid[0] * old_grid[1] + 1}, D] for grid {tuple(old_grid)}, "
                         f"got {list(embedding.shape)}")
    return resample_abs_pos_embed(embedding, new_size=list(new_grid), old_size=list(old_grid),
                                  num_prefix_tokens=1, interpolation="bilinear", antialias=False)


def adapt_grid_embeddings(state_dict: Mapping[str, torch.Tensor], model: nn.Module, prefix: str = "encoder.",
                          source_grid: Optional[Sequence[int]] = None) -> dict[str, torch.Tensor]:
    """Return a copy of ``state_dict`` whose ``{prefix}pos_embed`` / ``{prefix}type_embed`` fit the model's grid.

    The source grid is ``source_grid`` or inferred from the token count (strides 1..patch at the model's image
    size). Embeddings that already fit are left as they are.
    """
    encoder = _encoder(model)
    target_tokens = encoder.pos_embed.shape[1]
    out = dict(state_dict)
    for name in GRID_EMBEDDINGS:
        key = prefix + name
        if key not in out or out[key].shape[1] == target_tokens:
            continue
        tensor = out[key]
        old = tuple(source_grid) if source_grid is not None else infer_grid(
            tensor.shape[1], encoder.img_size, encoder.patch_size, key)
        out[key] = resample_grid_embedding(tensor, old, encoder.grid)
        _log.info("resampled %s from grid %dx%d to %dx%d", key, old[0], old[1], *encoder.grid)
    return out


# ------------------------------------------------------------------------------------------------------ timm ViT

_VIT_BLOCK = re.compile(r"blocks\.(\d+)\.(norm1|attn\.qkv|attn\.proj|norm2|mlp\.fc1|mlp\.fc2)\.(weight|bias)")
_VIT_DROPPED = ("head", "fc_norm", "dist_token", "head_dist")


def _vit_target(key: str, depth: int) -> Optional[str]:
    """timm ViT key -> our key, or None when it has no place in the encoder."""
    if key in ("cls_token", "pos_embed") or key.startswith("patch_embed.proj.") or key in ("norm.weight", "norm.bias"):
        return "encoder." + key
    match = _VIT_BLOCK.fullmatch(key)
    if match and int(match.group(1)) < depth:
        return "encoder." + key.replace(".mlp.", ".mlp_vis.")
    return None


def _timm_npz_state(path: Path, encoder: nn.Module) -> dict[str, torch.Tensor]:
    """Read a JAX ``.npz`` ViT through timm's own loader into a ViT shaped like our image side."""
    import numpy as np
    from timm.models.vision_transformer import VisionTransformer

    with np.load(path) as npz:
        names = list(npz.keys())
        pos_key = next((k for k in names if k.endswith("pos_embedding")), None)
        num_pos = npz[pos_key].shape[-2] if pos_key else None
    img_size = 224
    if num_pos is not None:
        patches = num_pos - (1 if any(k.split("/")[-1] == "cls" for k in names) else 0)
        side = math.isqrt(patches)
        if side * side != patches:
            raise WeightsError(f"{path}: '{pos_key}' has {num_pos} positions, not 1 + a square grid")
        img_size = side * encoder.patch_size
    block = encoder.blocks[0]
    vit = VisionTransformer(
        img_size=img_size, patch_size=encoder.patch_size, embed_dim=encoder.embed_dim, depth=len(encoder.blocks),
        num_heads=block.attn.num_heads, mlp_ratio=block.mlp_vis.fc1.out_features / encoder.embed_dim,
        qkv_bias=block.attn.qkv.bias is not None, num_classes=0)
    vit.load_pretrained(str(path))
    return vit.state_dict()


def _read_vit_state(source: str, model: nn.Module) -> dict[str, torch.Tensor]:
    path = Path(source)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".npz":
            return _timm_npz_state(path, _encoder(model))
        if suffix == ".safetensors":
            from safetensors.torch import load_file as load_safetensors
            return unwrap_state_dict(load_safetensors(str(path)), source)
        if suffix in (".pth", ".pt", ".bin"):
            return unwrap_state_dict(load_file(path), source)
        raise WeightsError(f"{source}: unsupported ViT weight file (expected .pth, .pt, .bin, .safetensors or .npz)")
    import timm
    if not timm.is_model(source):
        raise WeightsError(f"model.vit_weights={source}: neither an existing file nor a timm model name")
    try:
        return timm.create_model(source, pretrained=True).state_dict()
    except Exception as exc:  # offline hub, missing file in the cache, HTTP errors: all mean "not here"
        raise WeightsError(
            f"model.vit_weights={source}: the weights could not be fetched ({type(exc).__name__}: {exc}). Offline, "
            f"download them once where the hub is reachable (e.g. python -c \"import timm; "
            f"timm.create_model('{source}', pretrained=True)\" fills the Hugging Face cache, or save its "
            "state_dict to weights/vit.pth) and set model.vit_weights to that file") from None


def load_vit_weights(model: nn.Module, source: str) -> LoadReport:
    """Load a timm ViT (model name, .pth/.bin/.safetensors state dict, or JAX .npz) into the image side.

    cls_token, patch_embed, block attention/norms, final norm copy as they are; ``mlp`` -> ``mlp_vis``;
    pos_embed is resampled from its square grid to the encoder grid; heads are dropped; type_embed stays.
    """
    encoder = _encoder(model)
    state = strip_prefix(_read_vit_state(source, model), "module.")
    report = LoadReport(source=str(source))
    assignments = []
    for key, tensor in state.items():
        target = _vit_target(key, len(encoder.blocks))
        if target is None:
            (report.ignored if key.startswith(_VIT_DROPPED) else report.unexpected).append(key)
            continue
        if key == "pos_embed" and tensor.shape[1] != encoder.pos_embed.shape[1]:
            side = math.isqrt(tensor.shape[1] - 1)
            if side * side + 1 != tensor.shape[1]:
                raise WeightsError(f"{source}: pos_embed has {tensor.shape[1]} tokens, not 1 + a square grid")
            tensor = resample_grid_embedding(tensor, (side, side), encoder.grid)
            report.resampled.append(f"pos_embed {side}x{side}->{encoder.grid[0]}x{encoder.grid[1]}")
        assignments.append((_prefixed(model, target), key, tensor))
    report.loaded = copy_into(model, assignments, str(source))
    return _finish(report, model)


def _prefixed(model: nn.Module, name: str) -> str:
    """Our names are relative to IVT; drop 'encoder.' when a bare encoder is being loaded."""
    return name if hasattr(model, "encoder") else name[len("encoder."):]


# ------------------------------------------------------------------------------------------------------ BERT

_BERT_LAYER = re.compile(r"bert\.encoder\.layer\.(\d+)\.(.+)")


def _bert_targets(key: str, depth: int, fusion_layers: int, has_mlm_head: bool) -> list[str]:
    """transformers BertForMaskedLM key -> our keys (one BERT tensor may feed the encoder and the fusion stack)."""
    if key.startswith("bert.embeddings."):
        targets = ["encoder." + key[len("bert."):]]
        if key == "bert.embeddings.word_embeddings.weight" and has_mlm_head:
            targets.append("mlm_head.decoder.weight")  # BERT's decoder is tied to the word embeddings
        return targets
    match = _BERT_LAYER.fullmatch(key)
    if match:
        index, rest = int(match.group(1)), match.group(2)
        targets = []
        ffn = {"intermediate.dense.": "mlp_txt.fc1.", "output.dense.": "mlp_txt.fc2."}
        for bert_name, ours in ffn.items():
            if rest.startswith(bert_name) and index < depth:
                targets.append(f"encoder.blocks.{index}.{ours}{rest[len(bert_name):]}")
        # The encoder's attention is the ViT's; BERT attention only initialises the fusion layers.
        if index < fusion_layers and not rest.startswith("crossattention."):
            targets.append(f"fusion.layer.{index}.{rest}")
        return targets
    if has_mlm_head and key.startswith("cls.predictions.transform."):
        return ["mlm_head." + key[len("cls.predictions."):]]
    if has_mlm_head and key == "cls.predictions.bias":
        return ["mlm_head.decoder.bias"]
    return []


def load_bert_weights(model: nn.Module, source: str) -> LoadReport:
    """Load a BERT checkpoint (hub id or local folder, via transformers) into the text side and fusion stack.

    embeddings -> encoder.embeddings; layer i FFN -> blocks.i.mlp_txt (i < depth); layers 0..F-1 (attention,
    FFN, LayerNorms) -> fusion layers (cross-attention stays at init); the MLM transform and bias when the
    checkpoint has them, and the decoder weight from the word embeddings.
    """
    from transformers import BertForMaskedLM
    from transformers.utils import logging as hf_logging

    encoder = _encoder(model)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its report lists our MLM head as "newly initialised"; ours is accurate
    try:
        bert, info = BertForMaskedLM.from_pretrained(source, output_loading_info=True)
    finally:
        hf_logging.set_verbosity(verbosity)
    if bert.config.hidden_size != encoder.embed_dim:
        raise WeightsError(f"{source}: BERT hidden_size {bert.config.hidden_size} differs from the encoder's "
                         f"embed_dim {encoder.embed_dim}")
    absent = set(info["missing_keys"])  # in BertForMaskedLM but not in the checkpoint: keep ours at init
    fusion_layers = len(model.fusion.layer) if getattr(model, "fusion", None) is not None else 0
    has_mlm_head = getattr(model, "mlm_head", None) is not None
    report = LoadReport(source=str(source), ignored=sorted(info["unexpected_keys"]))
    assignments = []
    for key, tensor in bert.state_dict().items():
        if key in absent:
            continue
        targets = _bert_targets(key, len(encoder.blocks), fusion_layers, has_mlm_head)
        if not targets:
            report.ignored.append(key)
        assignments.extend((_prefixed(model, t), key, tensor) for t in targets)
    report.loaded = copy_into(model, assignments, str(source))
    return _finish(report, model)
