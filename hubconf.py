"""torch.hub entry points: use a trained IVT model from any working directory, without installing this repository.

    import torch
    retriever = torch.hub.load("/path/to/ivt", "retriever", checkpoint="runs/cuhkpedes/best.pth", source="local")
    retriever.index("my_photos/", index_file="my_photos.index")
    for hit in retriever.search("a woman in a red coat with a black backpack", k=5):
        print(hit.rank, f"{hit.score:.3f}", hit.path)

``checkpoint`` is our .pth file, a model folder written by ``python -m engine.export`` or the authors' checkpoint
(with ``config=`` naming its recipe). Relative paths are taken from your working directory.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

dependencies = ["torch", "torchvision", "timm", "transformers", "safetensors", "PIL", "yaml", "tqdm"]

_REPO = Path(__file__).resolve().parent
_PACKAGES = ("engine", "models", "datasets", "utils")


def _check_no_shadowing() -> None:
    """Our top-level packages have common names; one of the same name imported earlier would hide ours."""
    for name in _PACKAGES:
        module = sys.modules.get(name)
        if module is None:
            continue
        locations = [Path(p).resolve() for p in getattr(module, "__path__", [])]
        if not any(location.parent == _REPO for location in locations):
            where = getattr(module, "__file__", None) or locations
            raise ImportError(f"a package named {name!r} from {where} is already imported, and it hides this "
                              f"repository's {name}/; load the IVT model before importing it, or in a fresh process")


def retriever(checkpoint: str, gallery: str | None = None, index_file: str | None = None, device: str | None = None,
              config: str | None = None, overrides: Sequence[str] = ()):
    """An engine.retrieval.Retriever for ``checkpoint``; with ``gallery`` (an image folder or an index file) it is
    indexed too (``index_file`` caches the folder's features)."""
    _check_no_shadowing()
    from engine.retrieval import Retriever

    found = Retriever.from_checkpoint(checkpoint, device, config, list(overrides))
    if gallery is not None:
        found.use_gallery(gallery, index_file=index_file)
    return found


def model(checkpoint: str, device: str = "cpu", config: str | None = None, overrides: Sequence[str] = ()):
    """The IVT model (models.ivt.IVT, eval mode) of ``checkpoint``, with ``.cfg`` and ``.tokenizer`` attached."""
    _check_no_shadowing()
    from engine.checkpoints import load_for_inference

    ivt, cfg, tokenizer, _ = load_for_inference(checkpoint, config, list(overrides), device)
    ivt.cfg, ivt.tokenizer = cfg, tokenizer
    return ivt
