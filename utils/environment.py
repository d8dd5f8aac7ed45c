"""What a result was produced with: library versions, Python, the code's git commit, the device, the world size
and the thread counts (a CPU result moves with them: the order of a reduction's partial sums depends on the split).

``environment_record()`` returns a flat dict of plain values (str, int, bool, None), so it can go into a
checkpoint (loadable with ``weights_only=True``) and into a metrics JSON file as it is. Nothing in it fails: a
library that is not installed, a copy of the code outside a git checkout, or a machine without git all give None.
"""
from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]

# record key -> (distribution name, module name)
LIBRARIES = {
    "torch": ("torch", "torch"),
    "torchvision": ("torchvision", "torchvision"),
    "timm": ("timm", "timm"),
    "transformers": ("transformers", "transformers"),
    "numpy": ("numpy", "numpy"),
    "pillow": ("pillow", "PIL"),
}


def library_version(distribution: str, module: str) -> str | None:
    """The version of an imported module, else of the installed distribution, else None."""
    loaded = sys.modules.get(module)
    version = getattr(loaded, "__version__", None) if loaded is not None else None
    if isinstance(version, str):
        return str(version)  # a plain str: torch's TorchVersion would not load with weights_only=True
    try:
        return str(importlib.metadata.version(distribution))
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(root: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10,
                              check=False)
    except (OSError, subprocess.SubprocessError):  # no git executable, or it hung
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_state(root: str | Path = REPO_ROOT) -> tuple[str | None, bool | None]:
    """(short commit, dirty) of the git checkout whose top level is ``root``; (None, None) otherwise.

    Dirty means tracked files differ from the commit (staged or not), as ``git describe --dirty`` has it;
    untracked files (run directories, data) do not count. A ``root`` that merely lies inside some other
    repository is not a checkout of its own and gives (None, None).
    """
    root = Path(root).resolve()
    top = _git(root, "rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() != root:
        return None, None
    commit = _git(root, "rev-parse", "--short", "HEAD")
    if not commit:  # a repository without any commit yet
        return None, None
    status = _git(root, "status", "--porcelain", "--untracked-files=no")
    return commit, (None if status is None else bool(status))


def device_name(device: str | torch.device | None = None) -> str:
    """The CUDA device's name, or the device type ("cpu", "mps", ...). None: the current CUDA device if any."""
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


# Environment variables that set how many threads the math libraries start (unset: the library's own choice).
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def thread_record() -> dict[str, Any]:
    """torch's intra-op and inter-op thread counts now, and the thread variables as set (None when unset)."""
    record: dict[str, Any] = {"torch_threads": int(torch.get_num_threads()),
                              "torch_interop_threads": int(torch.get_num_interop_threads())}
    for name in THREAD_VARIABLES:
        record[name] = os.environ.get(name)
    return record


def environment_record(device: str | torch.device | None = None) -> dict[str, Any]:
    """Versions, Python, git commit and dirty flag of this code, device name, world size and thread counts, as
    plain values."""
    from utils.distributed import get_world_size

    record: dict[str, Any] = {"python": platform.python_version()}
    for key, (distribution, module) in LIBRARIES.items():
        record[key] = library_version(distribution, module)
    record["cuda"] = torch.version.cuda  # the CUDA runtime torch was built with; None for CPU builds
    record["git_commit"], record["git_dirty"] = git_state(REPO_ROOT)
    record["device"] = device_name(device)
    record["world_size"] = int(get_world_size())
    record.update(thread_record())
    return record
