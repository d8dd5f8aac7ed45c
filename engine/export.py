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

This module is the command line only: the work is engine/exporting.py's, the folder format engine/model_folder.py's.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Sequence

from utils.errors import user_errors_as_one_line


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
    # Imported after parsing: torch and the model take seconds to import, --help must not wait for them.
    from engine.exporting import export_model_folder, push_to_hub

    folder = export_model_folder(args.checkpoint, args.out_dir, onnx=args.onnx, metrics_files=args.metrics)
    print(f"model folder: {folder}")
    if args.push_to_hub:
        print(f"uploaded: {push_to_hub(folder, args.push_to_hub, args.private)}")
    return folder


if __name__ == "__main__":
    main()
