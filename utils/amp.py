"""Mixed precision: the one autocast helper of training and evaluation."""
from __future__ import annotations

import contextlib

import torch

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device | str, precision: str | bool) -> contextlib.AbstractContextManager:
    """Autocast for ``precision`` on CUDA: bf16 | fp16 | none | auto (bf16 where the GPU has it, else fp16).

    A bool is an on/off switch (``eval.amp``): True means auto, False none.

    CPU runs fp32 whatever is asked, so CPU results do not depend on the precision setting.
    """
    if isinstance(precision, bool):
        precision = "auto" if precision else "none"
    device = torch.device(device)
    if device.type != "cuda" or precision == "none":
        return contextlib.nullcontext()
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision not in _DTYPES:
        raise ValueError(f"precision must be bf16, fp16, none or auto, got {precision!r}")
    return torch.autocast(device_type="cuda", dtype=_DTYPES[precision])
