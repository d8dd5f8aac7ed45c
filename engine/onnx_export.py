"""The ONNX encoders of a model folder: images or token ids in, global features out (``--onnx`` of engine.export).

``image_encoder.onnx`` maps images [B, 3, H, W] and ``text_encoder.onnx`` token ids / attention mask [B, T] (any
B and T up to the model's text positions) to the global features [B, D], before L2 normalisation. The exporter's
own progress output (about a hundred lines) goes to ``onnx_export.log`` in the folder, not to the console.
"""
from __future__ import annotations

import contextlib
import importlib
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch

from engine.model_folder import ExportError

logger = logging.getLogger(__name__)

IMAGE_ONNX = "image_encoder.onnx"
TEXT_ONNX = "text_encoder.onnx"
EXPORT_LOG = "onnx_export.log"
ONNX_OPSET = 18


class ImageFeatures(torch.nn.Module):
    """images [B, 3, H, W] -> global image features [B, D] (no token dropping)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images, bmm=False)[1]


class TextFeatures(torch.nn.Module):
    """input_ids, attention_mask [B, T] -> global text features [B, D] (no token dropping)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(input_ids, attention_mask, bmm=False)[1]


@contextlib.contextmanager
def output_to(log_path: Path) -> Iterator[None]:
    """Send everything written inside to ``log_path``: Python prints, warnings, logging and the C++ side's output.

    The file descriptors 1 and 2 are redirected too, because the exporter's native parts write to them directly;
    the root logger's handlers are swapped for one that writes to the file (the exporter's passes log at INFO).
    """
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    root = logging.getLogger()
    handlers = root.handlers[:]
    with open(log_path, "w", encoding="utf-8", buffering=1) as log:
        try:
            root.handlers = [logging.StreamHandler(log)]
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log), \
                    warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                yield
            for warning in caught:
                log.write(f"warning: {warning.category.__name__}: {warning.message}\n")
        finally:
            root.handlers = handlers
            log.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def export_onnx(model: torch.nn.Module, cfg: Any, out_dir: str | os.PathLike[str]) -> dict[str, str]:
    """Write image_encoder.onnx and text_encoder.onnx (fp32, dynamic batch and text length) into ``out_dir``."""
    for name in ("onnx", "onnxscript"):  # the exporter needs both
        try:
            importlib.import_module(name)
        except ImportError:
            raise ExportError(f"--onnx needs the onnx packages ({name} is missing): "
                              "pip install -r requirements-onnx.txt") from None
    from torch.export import Dim

    out_dir = Path(out_dir)
    model = model.float().eval()
    height, width = (int(s) for s in cfg.input.image_size)
    images = torch.zeros(2, 3, height, width)
    length = min(8, int(cfg.model.max_text_positions))
    ids = torch.full((2, length), 5, dtype=torch.long)
    mask = torch.ones(2, length, dtype=torch.long)
    batch, text_len = Dim("batch"), Dim("length", max=int(cfg.model.max_text_positions))
    log_path = out_dir / EXPORT_LOG
    with torch.no_grad(), output_to(log_path):
        torch.onnx.export(ImageFeatures(model).eval(), (images,), str(out_dir / IMAGE_ONNX),
                          input_names=["images"], output_names=["features"], opset_version=ONNX_OPSET,
                          dynamic_shapes={"images": {0: batch}}, dynamo=True, external_data=False, verbose=False)
        torch.onnx.export(TextFeatures(model).eval(), (ids, mask), str(out_dir / TEXT_ONNX),
                          input_names=["input_ids", "attention_mask"], output_names=["features"],
                          opset_version=ONNX_OPSET, dynamic_shapes={"input_ids": {0: batch, 1: text_len},
                                                                    "attention_mask": {0: batch, 1: text_len}},
                          dynamo=True, external_data=False, verbose=False)
    lines = len(log_path.read_text(encoding="utf-8").splitlines())
    logger.info("wrote %s and %s (the exporter's %d lines of output are in %s)", IMAGE_ONNX, TEXT_ONNX, lines,
                log_path)
    return {"image_encoder_onnx": IMAGE_ONNX, "text_encoder_onnx": TEXT_ONNX, "onnx_export_log": EXPORT_LOG}
