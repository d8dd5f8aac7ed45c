"""Export a checkpoint as a model folder in the Hugging Face hub layout, optionally with ONNX encoders.

    python -m engine.export runs/cuhkpedes/best.pth exported/ivt-cuhkpedes [--onnx] [--push-to-hub USER/NAME]

The folder holds ``model.safetensors`` (the weights only), ``config.json`` (the architecture, the resolved
recipe, the evaluation metrics found next to the checkpoint, the training state, the library versions and the
sha256 of every other file), the tokenizer files (``tokenizer.json``, ``vocab.txt``, ...) and a ``README.md`` model
card. Every tool that takes a checkpoint takes the folder too (evaluate.py, retrieve.py, serve.py,
``--init-from``, ``Retriever.from_pretrained``), verifies the weights' checksum and computes the same features,
bit for bit. With ``--onnx``, ``image_encoder.onnx`` and ``text_encoder.onnx`` map images [B, 3, H, W] and token
ids / attention mask [B, T] (any B and T) to the global features [B, D] (before L2 normalisation); the
exporter's output goes to ``onnx_export.log``. Files are written with the permissions of a plain ``open()``.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

from engine.model_folder import (CONFIG_FILE, FOLDER_FORMAT, FOLDER_VERSION, WEIGHTS_FILE, ExportError,
                                 is_model_folder, sha256_of)
from utils.errors import user_errors_as_one_line

# Heavy imports (torch, the model, the tokenizer) happen inside the functions, so that --help answers at once.

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


def carried_calibration(obj: dict, metrics: dict[str, dict]) -> dict | None:
    """The "no good match" threshold and blend weight the folder carries (engine.calibration): the checkpoint's
    own (chosen on val during training), else those of an evaluation of it on val (``evaluate.py --split val``
    beside it, for checkpoints trained before they were carried)."""
    if obj.get("calibration"):
        return obj["calibration"]
    val = metrics.get("val", {}).get("calibration")
    return val if isinstance(val, dict) and val.get("split") == "val" else None


def _prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists():
        if not out_dir.is_dir():
            raise ExportError(f"{out_dir} exists and is not a folder")
        if any(out_dir.iterdir()) and not (overwrite or is_model_folder(out_dir)):
            raise ExportError(f"{out_dir} is not empty and not a model folder; choose another folder")
    out_dir.mkdir(parents=True, exist_ok=True)


def load_exportable(checkpoint: Path):
    """(checkpoint dict, config, tokenizer, model) of one of our checkpoints, the weights proven to fit the config."""
    from engine.checkpoints import tokenizer_from_record
    from models.ivt import build_model
    from utils.checkpoint import FORMAT_NAME, load_file
    from utils.config import config_from_dict

    obj = load_file(checkpoint)
    if not (isinstance(obj, dict) and obj.get("format") == FORMAT_NAME):
        raise ExportError(f"{checkpoint}: not one of our checkpoints; an authors' checkpoint is converted first "
                          "(python -m models.convert_official SRC DST.pth)")
    cfg = config_from_dict(obj["config"], source=str(checkpoint))
    tokenizer = tokenizer_from_record(obj.get("tokenizer"), cfg.text)
    model = build_model(cfg)
    model.load_state_dict(obj["model"])  # proves the weights fit the config before anything is written
    return obj, cfg, tokenizer, model


def folder_record(obj: dict, cfg: Any, tokenizer, checkpoint: Path, metrics: dict) -> dict:
    """config.json of a model folder, before its files and their checksums are added."""
    from models.config import IVTConfig
    from utils.environment import environment_record

    learnt = "vocab" in (obj.get("tokenizer") or {})
    return {
        "format": FOLDER_FORMAT, "format_version": FOLDER_VERSION, "model_type": "ivt",
        "architecture": asdict(IVTConfig.from_config(cfg)),
        "feature_dim": int(cfg.model.embed_dim), "similarity": "cosine",
        "image_size": list(cfg.input.image_size), "pixel_mean": list(cfg.input.pixel_mean),
        "pixel_std": list(cfg.input.pixel_std),
        "tokenizer": {"kind": "learnt" if learnt else "pretrained", "source": str(cfg.text.tokenizer),
                      "lowercase": bool(cfg.text.lowercase), "vocab_size": len(tokenizer),
                      "max_text_len": int(cfg.text.max_text_len)},
        "config": cfg.to_dict(),
        "training": {k: obj.get(k) for k in ("epoch", "step_in_epoch", "step", "best_metric", "best_epoch",
                                             "world_size")},
        "metrics": metrics,
        "calibration": carried_calibration(obj, metrics),
        "source_checkpoint": {"file": checkpoint.name, "sha256": sha256_of(checkpoint)},
        "training_environment": obj.get("environment"),
        "export_environment": environment_record("cpu"),
        "files": {"weights": WEIGHTS_FILE},
    }


def export_model_folder(checkpoint: str | os.PathLike[str], out_dir: str | os.PathLike[str], onnx: bool = False,
                        metrics_files: Sequence[str | os.PathLike[str]] = (), overwrite: bool = False) -> Path:
    """Write the model folder of one of our checkpoints (see the module docstring); returns the folder."""
    from safetensors.torch import save as safetensors_bytes

    from datasets.tokenizer import save_tokenizer
    from utils.checkpoint import atomic_write, file_mode

    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    obj, cfg, tokenizer, model = load_exportable(checkpoint)
    metrics = find_metrics(checkpoint, metrics_files)
    _prepare_out_dir(out_dir, overwrite)

    state = {k: v.detach().clone().contiguous() for k, v in obj["model"].items()}
    weights = safetensors_bytes(state, metadata={"format": "pt"})
    atomic_write(out_dir / WEIGHTS_FILE, lambda handle: handle.write(weights))
    save_tokenizer(tokenizer, out_dir)
    meta = folder_record(obj, cfg, tokenizer, checkpoint, metrics)
    if onnx:
        from engine.onnx_export import export_onnx

        meta["files"].update(export_onnx(model, cfg, out_dir))
    for path in out_dir.iterdir():  # the tokenizer's and the exporter's files as a plain open() would make them
        if path.is_file():
            os.chmod(path, file_mode())
    listed = sorted(p.name for p in out_dir.iterdir() if p.is_file() and p.name not in (CONFIG_FILE, "README.md"))
    meta["files_sha256"] = {name: sha256_of(out_dir / name) for name in listed}
    _write_text(out_dir / CONFIG_FILE, json.dumps(_finite(meta), indent=2) + "\n")
    _write_text(out_dir / "README.md", model_card(meta, out_dir.name))
    logger.info("wrote the model folder %s (%s)", out_dir, ", ".join(sorted(p.name for p in out_dir.iterdir())))
    return out_dir


def _finite(value: Any) -> Any:
    """JSON has no inf/nan: such floats (best_metric before any evaluation) become None."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _write_text(path: Path, text: str) -> None:
    from utils.checkpoint import atomic_write

    atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


# ------------------------------------------------------------------------------------------ model card
def _metrics_table(metrics: dict[str, dict]) -> str:
    rows = []
    for split, result in metrics.items():
        for key, label in (("t2i", "text-to-image"), ("t2i_rerank", "text-to-image, ITM re-ranked"),
                           ("t2i_blend", "text-to-image, cosine + ITM blend"), ("i2t", "image-to-text")):
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
    from utils.checkpoint import model_epoch

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


# ------------------------------------------------------------------------------------------------- CLI
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m engine.export", description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="our .pth checkpoint (best.pth, last.pth)")
    parser.add_argument("out_dir", help="the model folder to write (created; an existing model folder is updated)")
    parser.add_argument("--onnx", action="store_true", help="also write image_encoder.onnx and text_encoder.onnx")
    parser.add_argument("--metrics", nargs="*", default=(), metavar="FILE",
                        help="metrics_<split>.json files for the model card (default: those beside the checkpoint)")
    parser.add_argument("--push-to-hub", default=None, metavar="REPO", help="upload the folder to USER/NAME")
    parser.add_argument("--private", action="store_true", help="with --push-to-hub: a private repository")
    return parser.parse_args(argv)


@user_errors_as_one_line()
def main(argv: Sequence[str] | None = None) -> Path:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    folder = export_model_folder(args.checkpoint, args.out_dir, onnx=args.onnx, metrics_files=args.metrics)
    print(f"model folder: {folder}")
    if args.push_to_hub:
        print(f"uploaded: {push_to_hub(folder, args.push_to_hub, args.private)}")
    return folder


if __name__ == "__main__":
    main()
