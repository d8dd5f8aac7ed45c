"""Export a checkpoint as a model folder: load it, gather its metrics, write the folder, the ONNX encoders, the card.

``python -m engine.export`` (engine/export.py) is the command line; the folder format itself (files, config.json,
checksums, versions) is engine/model_folder.py's. The checkpoint is loaded through the one inference loader,
``engine.checkpoints.load_for_inference``, so the exported weights are those every other tool would use.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Sequence

from engine.checkpoints import load_for_inference
from engine.model_folder import ExportError, finish_model_folder, folder_record, start_model_folder
from engine.onnx_export import export_onnx
from utils.checkpoint import check_writable_folder, model_epoch

logger = logging.getLogger(__name__)

METRIC_SPLITS = ("test", "val")
METRIC_KEYS = ("split", "t2i", "t2i_rerank", "t2i_blend", "rerank_top_k", "rerank_blend", "itm_pair_accuracy",
               "i2t", "chance_R1", "counts", "match_threshold", "no_match", "calibration")


def find_metrics(checkpoint: Path, files: Sequence[str | os.PathLike[str]] = ()) -> dict[str, dict]:
    """Evaluation results of this checkpoint: the given metrics_<split>.json files, else those beside it.

    A file found beside the checkpoint is taken only when it names this checkpoint (by file name), so the
    metrics of best.pth never travel with last.pth, nor those of the selection evaluations during training
    (which name no checkpoint) with best.pth.
    """
    explicit = bool(files)
    candidates = [Path(f) for f in files] or [checkpoint.parent / f"metrics_{s}.json" for s in METRIC_SPLITS]
    found: dict[str, dict] = {}
    for file in candidates:
        if not file.is_file():
            if explicit:
                raise ExportError(f"metrics file not found: {file}")
            continue
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise ExportError(f"{file}: not a metrics JSON file ({exc})") from None
        named = data.get("checkpoint") if isinstance(data, dict) else None
        if not explicit and (not named or Path(named).name != checkpoint.name):
            logger.debug("%s: %s, not taken into the model card of %s", file,
                         f"the metrics of {Path(named).name}" if named else "a selection evaluation during training",
                         checkpoint.name)
            continue
        if not isinstance(data, dict):
            raise ExportError(f"{file}: not a metrics JSON file (expected an object)")
        split = data.get("split") or file.stem.removeprefix("metrics_")
        found[split] = {k: data[k] for k in METRIC_KEYS if k in data}
    return found


def export_model_folder(checkpoint: str | os.PathLike[str], out_dir: str | os.PathLike[str], onnx: bool = False,
                        metrics_files: Sequence[str | os.PathLike[str]] = (), overwrite: bool = False) -> Path:
    """Write the model folder of one of our checkpoint files (see engine/model_folder.py); returns the folder."""
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    if checkpoint.is_dir():
        raise ExportError(f"{checkpoint}: already a model folder; export the .pth checkpoint it was made from")
    check_writable_folder(out_dir, "the model folder")  # before the checkpoint is read
    model, cfg, tokenizer, info = load_for_inference(checkpoint)  # proves the weights fit the config first
    if info["format"] != "ours":
        raise ExportError(f"{checkpoint}: not one of our checkpoints; an authors' checkpoint is converted first "
                          "(python -m engine.convert_official SRC DST.pth)")
    metrics = find_metrics(checkpoint, metrics_files)
    start_model_folder(out_dir, model.state_dict(), tokenizer, overwrite, info.get("caption_words"))
    info = {**info, "calibration": carried_calibration(info, metrics)}
    meta = folder_record(cfg, tokenizer, info["learnt_vocabulary"], info, checkpoint, metrics)
    if onnx:
        meta["files"].update(export_onnx(model, cfg, out_dir))
    finish_model_folder(out_dir, meta, lambda record: model_card(record, out_dir.name))
    logger.info("wrote the model folder %s (%s)", out_dir, ", ".join(sorted(p.name for p in out_dir.iterdir())))
    return out_dir


def carried_calibration(info: dict, metrics: dict[str, dict]) -> dict | None:
    """The "no good match" threshold and blend weight the folder carries (engine.calibration): the checkpoint's
    own (chosen on val during training), else those of an evaluation of it on val (``evaluate.py --split val``,
    passed with ``--metrics``, for checkpoints trained before they were carried)."""
    if info.get("calibration"):
        return info["calibration"]
    val = metrics.get("val", {}).get("calibration")
    return val if isinstance(val, dict) and val.get("split") == "val" else None


# ------------------------------------------------------------------------------------------ model card
def _metrics_table(metrics: dict[str, dict]) -> str:
    rows = []
    for split, result in metrics.items():
        for key, label in (("t2i", "text-to-image"), ("t2i_rerank", "text-to-image, ITM re-ranked"),
                           ("t2i_blend", "text-to-image, cosine + ITM blend"),
                           ("i2t", "image-to-text")):
            if key in result:
                m = result[key]
                rows.append(f"| {split} | {label} | " + " | ".join(
                    f"{m[name]:.2f}" if isinstance(m.get(name), (int, float)) else "-"
                    for name in ("R1", "R5", "R10", "mAP", "mINP")) + " |")
    if not rows:
        return ("No evaluation results were found beside the checkpoint (metrics_test.json); evaluate the "
                "folder with `python evaluate.py --checkpoint FOLDER`.\n")
    counts = next((r["counts"] for r in metrics.values() if "counts" in r), None)
    sizes = f" ({counts['queries']} captions, {counts['gallery_images']} images)" if counts else ""
    return (f"Percentages{sizes}:\n\n| split | direction | R@1 | R@5 | R@10 | mAP | mINP |\n"
            "|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n")


def model_card(meta: dict, name: str) -> str:
    """The README.md of a model folder: what it is, how it was trained, metrics, how to load, licence, citation."""
    cfg, arch, train = meta["config"], meta["architecture"], meta["training"]
    dataset = cfg["data"]["format"] if cfg["task"] == "retrieval" else "the pretraining corpora"
    synthetic = " (synthetic data)" if cfg["data"].get("synthesize_if_missing") else ""
    fusion = (f" plus a {arch['fusion_layers']}-layer fusion stack with an ITM head (re-ranking)"
              if arch["fusion_layers"] else "")
    losses = ", ".join(f"{k.removesuffix('_weight').upper()} x{v:g}" for k, v in cfg["loss"].items()
                       if k.endswith("_weight") and v)
    env = meta.get("export_environment") or {}
    return f"""---
library_name: pytorch
tags: [text-based-person-retrieval, image-text-retrieval, ivt]
license: other
---

# {name}

IVT (Implicit Visual-Textual) model for **text-based person retrieval**: one shared transformer encodes person
images and their descriptions; the cosine similarity of the two features ranks a gallery for a sentence.
Scores are cosine similarities in [-1, 1], not probabilities.

- Architecture: unified encoder, width {arch['embed_dim']}, {arch['depth']} layers, {arch['num_heads']} heads,
  patch {arch['patch_size']} / stride {arch['stride']} at {arch['img_size'][0]}x{arch['img_size'][1]}{fusion};
  feature dimension {meta['feature_dim']}.
- Tokenizer: WordPiece, {meta['tokenizer']['vocab_size']} tokens, at most {meta['tokenizer']['max_text_len']} per caption;
  {'learnt from the training captions' if meta['tokenizer']['kind'] == 'learnt' else 'from ' + meta['tokenizer']['source']}.

## Training

Task `{cfg['task']}` on {dataset}{synthetic} (`data.root={cfg['data']['root']}`), {cfg['train']['epochs']} epochs,
optimizer {cfg['train']['optimizer']} (lr {cfg['train']['lr']:g}), losses {losses or 'CMPM'}; exported from
`{meta['source_checkpoint']['file']}` (sha256 {meta['source_checkpoint']['sha256'][:16]}...,
epoch {model_epoch(train)} as numbered in the training log,
step {train.get('step')}). The full resolved recipe is `config.json` -> `config`.

## Evaluation

{_metrics_table(meta['metrics'])}
## How to load

```python
import torch
retriever = torch.hub.load("PATH/TO/IVT-REPO", "retriever", checkpoint="{name}", source="local")
retriever.index("my_photos/", index_file="my_photos.index.pt")
for hit in retriever.search("a woman in a red coat with a black backpack", k=5):
    print(hit.rank, f"{{hit.score:.3f}}", hit.path)
```

From the repository: `Retriever.from_pretrained("{name}")` (engine.retrieval), `python evaluate.py --checkpoint {name}`,
`python retrieve.py --checkpoint {name} --gallery DIR --query "..."`, `python serve.py --checkpoint {name} --gallery DIR`,
and `--init-from {name}` to fine-tune from it. `model.safetensors` holds the weights only (the state dict of
`models.ivt.IVT`); `config.json` holds everything needed to rebuild it.
{_onnx_section(meta)}
## Versions

Exported with torch {env.get('torch')}, transformers {env.get('transformers')}, Python {env.get('python')}
(code commit {env.get('git_commit')}); `config.json` -> `export_environment` and `training_environment`.

## Licence

The code that made and loads these weights is MIT-licensed. The weights inherit the terms of the data and of the
initial weights they were trained from (the public person-retrieval datasets are for research use only, per
their terms); check them before any other use.

## Citation

```bibtex
@inproceedings{{shu2022see,
  title     = {{See Finer, See More: Implicit Modality Alignment for Text-based Person Retrieval}},
  author    = {{Shu, Xiujun and Wen, Wei and Wu, Haoqian and Chen, Keyu and Song, Yiran and Qiao, Ruizhi and
               Ren, Bo and Wang, Xiao}},
  booktitle = {{Computer Vision -- ECCV 2022 Workshops}},
  year      = {{2022}}
}}
```
"""


def _onnx_section(meta: dict) -> str:
    if "image_encoder_onnx" not in meta["files"]:
        return ""
    size, files = meta["image_size"], meta["files"]
    return f"""
## ONNX

`{files['image_encoder_onnx']}`: `images` float32 [B, 3, {size[0]}, {size[1]}] (RGB, bilinear resize, (x/255 - {meta['pixel_mean']})
/ {meta['pixel_std']}) -> `features` [B, {meta['feature_dim']}]. `{files['text_encoder_onnx']}`: `input_ids`, `attention_mask` int64
[B, T] from the tokenizer in this folder -> `features` [B, {meta['feature_dim']}]. L2-normalise both before
taking dot products.
"""


# ------------------------------------------------------------------------------------------------- hub
def push_to_hub(folder: str | os.PathLike[str], repo_id: str, private: bool = False) -> str:
    """Upload the folder to the Hugging Face hub as model repository ``repo_id``; returns its URL."""
    try:
        import huggingface_hub
        from huggingface_hub import HfApi
    except ImportError:
        raise ExportError("--push-to-hub needs huggingface_hub: pip install huggingface_hub") from None
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        raise ExportError(f"--push-to-hub {repo_id}: HF_HUB_OFFLINE is set, so nothing can be uploaded; "
                          f"the folder {folder} is complete: upload it later from a machine that is online")
    api = HfApi()
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                                   commit_message="Upload IVT model folder")
    except (OSError, huggingface_hub.errors.HfHubHTTPError, ValueError) as exc:
        raise ExportError(f"--push-to-hub {repo_id} failed ({type(exc).__name__}: {exc}); log in with "
                          f"`hf auth login` and check the network; the folder {folder} is complete") from None
    return str(getattr(commit, "repo_url", None) or f"https://huggingface.co/{repo_id}")
