"""Count the places where a step reads a tensor's value back on the host (a host-device sync on a GPU).

On a GPU, ``.item()``, ``.tolist()``, ``bool(tensor)``, ``nonzero``, boolean-mask indexing and the like make the
host wait until the device has finished everything queued so far, so the next kernels cannot be queued ahead
and the device idles. ``HostSyncCounter`` records each such call with its call site (the innermost frame outside
torch). It works on CPU tensors too, where nothing waits: there it counts the reads that *would* wait if the
tensors lived on a GPU, which lets a CPU test keep a step free of them. Reads of tensors that live on the host by
design (a random draw made on the CPU generator, say) are counted as well; tell them apart by their site.
"""
from __future__ import annotations

import collections
import os
import sys
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

# Tensor methods and torch functions whose result depends on tensor values the host must read first.
SYNC_FUNCTIONS = frozenset({
    "item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy", "nonzero", "argwhere",
    "masked_select", "unique", "unique_consecutive", "equal", "allclose", "is_nonzero",
})
_TORCH_DIR = os.path.dirname(torch.__file__)


def _is_bool_index(index: Any) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(torch.is_tensor(i) and i.dtype in (torch.bool, torch.uint8) for i in items)


def _call_site() -> str:
    frame = sys._getframe(2)
    while frame is not None and (frame.f_code.co_filename.startswith(_TORCH_DIR)
                                 or frame.f_code.co_filename == __file__):
        frame = frame.f_back
    if frame is None:
        return "?"
    return f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno} {frame.f_code.co_name}"


class HostSyncCounter(TorchFunctionMode):
    """``with HostSyncCounter() as syncs: step()`` then ``syncs.total`` and ``syncs.sites`` (site -> count)."""

    def __init__(self) -> None:
        super().__init__()
        self.sites: collections.Counter[str] = collections.Counter()

    @property
    def total(self) -> int:
        return sum(self.sites.values())

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in SYNC_FUNCTIONS or (name == "__getitem__" and len(args) > 1 and _is_bool_index(args[1])):
            self.sites[f"{name} at {_call_site()}"] += 1
        return func(*args, **(kwargs or {}))
