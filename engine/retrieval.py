"""Text search over a folder of your own images with a trained checkpoint.

    retriever = Retriever.from_checkpoint("runs/cuhkpedes/best.pth")
    retriever.index("my_photos/", index_file="my_photos.index.pt")   # encodes once, reuses the file later
    retriever.search("a woman in a red coat with a black backpack", k=10)  # [(path, cosine score), ...]

The index file holds the image features, the image paths with their sizes and modification times, and a
digest of the model (checkpoint path, size and modification time, and the input settings). It is reused only
when all of them match, so a retrained checkpoint or a changed folder never serves stale features.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from datasets.transforms import build_test_transform, load_image
from engine.checkpoints import load_for_inference
from engine.evaluation import encode_text_tokens
from utils.amp import autocast
from utils.checkpoint import atomic_save
from utils.errors import UserError

logger = logging.getLogger(__name__)

INDEX_FORMAT = "ivt-gallery-index"
INDEX_VERSION = 1
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")
LISTED_FAILURES = 5  # unreadable images named in the log / error message


class GalleryError(UserError, ValueError):
    """A gallery that cannot be indexed or an index file that cannot be used; the message says why."""


@dataclass
class GalleryIndex:
    """Encoded gallery: features [G, D] float32 (L2-normalised, CPU), one row per path in ``paths``.

    ``skipped`` lists (path, reason) of the images that could not be read; ``signature`` identifies the
    candidate files (path, size, mtime) the index was built from; ``model_digest`` the model that encoded them.
    """

    paths: list[str]
    features: torch.Tensor
    model_digest: str
    signature: list[list[Any]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)


def list_images(folder: str | os.PathLike[str]) -> list[str]:
    """Image files under ``folder`` (recursive, by extension), sorted; GalleryError when there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise GalleryError(f"gallery folder not found: {folder}")
    paths = sorted(str(p) for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not paths:
        raise GalleryError(f"{folder}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)}, recursively)")
    return paths


def file_signature(paths: Sequence[str]) -> list[list[Any]]:
    """[path, size, mtime_ns] per path ([path, -1, -1] for a missing file): cheap change detection."""
    out = []
    for path in paths:
        try:
            stat = os.stat(path)
            out.append([path, stat.st_size, stat.st_mtime_ns])
        except OSError:
            out.append([path, -1, -1])
    return out


def model_digest(checkpoint: str | os.PathLike[str], input_cfg: Any) -> str:
    """Digest of the checkpoint file (resolved path, size, mtime) and the image pipeline settings.

    Hashing the file's identity instead of its bytes keeps this instant for large checkpoints; rewriting the
    checkpoint changes its mtime, so an index is never reused across different weights at the same path.
    """
    path = Path(checkpoint).resolve()
    stat = path.stat()
    text = json.dumps([str(path), stat.st_size, stat.st_mtime_ns, input_cfg.to_dict()], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class _TolerantImages(Dataset):
    """(image [3, H, W], index, error) per path; an unreadable file gives zeros and the error text."""

    def __init__(self, paths: Sequence[str], transform, image_size: Sequence[int]):
        self.paths = list(paths)
        self.transform = transform
        self.blank_shape = (3, int(image_size[0]), int(image_size[1]))

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, str]:
        try:
            return self.transform(load_image(self.paths[i])), i, ""
        except (OSError, ValueError, SyntaxError) as exc:  # PIL raises all three for broken files
            return torch.zeros(self.blank_shape), i, f"{type(exc).__name__}: {exc}"


class Retriever:
    """A model, its tokenizer and an optional encoded gallery, for text-to-image search."""

    def __init__(self, model: torch.nn.Module, cfg: Any, tokenizer: Any, device: torch.device, digest: str):
        self.model = model.eval()
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.device = device
        self.digest = digest
        self.gallery: GalleryIndex | None = None

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike[str], device: str | torch.device | None = None,
                        config_path: str | os.PathLike[str] | None = None, overrides: Sequence[str] = ()
                        ) -> "Retriever":
        """Rebuild the model from one of our checkpoints or the authors' (see engine.checkpoints.load_for_inference)."""
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model, cfg, tokenizer, _ = load_for_inference(path, config_path, list(overrides), device)
        return cls(model, cfg, tokenizer, device, model_digest(path, cfg.input))

    # ------------------------------------------------------------------------------------------ gallery
    def index(self, paths_or_dir: str | os.PathLike[str] | Sequence[str],
              index_file: str | os.PathLike[str] | None = None, strict: bool = False) -> GalleryIndex:
        """Encode a folder (or a list) of images, or reuse ``index_file`` when it matches; sets ``self.gallery``.

        Unreadable images are skipped (counted and the first few named in the log) or, with ``strict``, raise
        GalleryError. The index is written to ``index_file`` when given.
        """
        if isinstance(paths_or_dir, (str, os.PathLike)):
            paths = list_images(paths_or_dir)
        else:
            paths = [str(p) for p in paths_or_dir]
            if not paths:
                raise GalleryError("the gallery list is empty")
        signature = file_signature(paths)
        if index_file is not None and Path(index_file).is_file():
            cached = self._read_index(index_file)
            if cached.model_digest == self.digest and cached.signature == signature:
                if strict and cached.skipped:
                    raise self._strict_error(cached.skipped)
                logger.info("reusing the gallery index %s (%d images)", index_file, len(cached))
                self._report_skipped(cached.skipped, len(paths))
                self.gallery = cached
                return cached
            logger.info("gallery index %s is stale (%s); re-encoding", index_file,
                        "another model" if cached.model_digest != self.digest else "the images changed")
        features, kept, skipped = self._encode_images(paths, strict)
        if not kept:
            raise GalleryError(f"none of the {len(paths)} gallery images could be read; first: "
                               + "; ".join(f"{p} ({why})" for p, why in skipped[:LISTED_FAILURES]))
        self._report_skipped(skipped, len(paths))
        gallery = GalleryIndex(kept, features, self.digest, signature, skipped)
        if index_file is not None:
            atomic_save({"format": INDEX_FORMAT, "format_version": INDEX_VERSION, "paths": gallery.paths,
                         "features": gallery.features, "model_digest": gallery.model_digest,
                         "signature": gallery.signature, "skipped": [list(s) for s in gallery.skipped]}, index_file)
            logger.info("wrote the gallery index %s (%d images)", index_file, len(gallery))
        self.gallery = gallery
        return gallery

    def load_index(self, file: str | os.PathLike[str]) -> GalleryIndex:
        """Use a saved index as the gallery; GalleryError if another model (or input setting) built it."""
        cached = self._read_index(file)
        if cached.model_digest != self.digest:
            raise GalleryError(f"{file}: this index was built with another checkpoint or input settings; "
                               "rebuild it by passing the image folder with --index-file")
        self.gallery = cached
        return cached

    @staticmethod
    def _read_index(file: str | os.PathLike[str]) -> GalleryIndex:
        try:
            obj = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as exc:  # any unpickling or zip error means the same thing here
            raise GalleryError(f"{file}: cannot be read as a gallery index ({type(exc).__name__}: {exc})") from None
        if not isinstance(obj, dict) or obj.get("format") != INDEX_FORMAT:
            raise GalleryError(f"{file}: not a gallery index (expected format={INDEX_FORMAT!r})")
        features = obj["features"]
        if features.dim() != 2 or features.shape[0] != len(obj["paths"]):
            raise GalleryError(f"{file}: features {tuple(features.shape)} do not match {len(obj['paths'])} paths")
        return GalleryIndex(list(obj["paths"]), features, obj["model_digest"], [list(s) for s in obj["signature"]],
                            [tuple(s) for s in obj["skipped"]])

    def _encode_images(self, paths: list[str], strict: bool) -> tuple[torch.Tensor, list[str], list[tuple[str, str]]]:
        """Normalised features [n_kept, D] (CPU), the kept paths and the (path, reason) of unreadable ones."""
        dataset = _TolerantImages(paths, build_test_transform(self.cfg.input), self.cfg.input.image_size)
        workers = min(int(self.cfg.data.num_workers), os.cpu_count() or 1, max(len(paths) // 64, 0))
        loader = DataLoader(dataset, batch_size=int(self.cfg.eval.batch_size), num_workers=workers,
                            pin_memory=self.device.type == "cuda")
        feats, kept, skipped = [], [], []
        with torch.inference_mode(), autocast(self.device, bool(self.cfg.eval.amp)):
            for images, indices, errors in loader:
                ok = torch.tensor([not e for e in errors])
                for i, error in zip(indices.tolist(), errors):
                    if error:
                        skipped.append((paths[i], error))
                if strict and skipped:
                    raise self._strict_error(skipped)
                if ok.any():
                    _, feature = self.model.encode_image(images[ok].to(self.device), bmm=False)
                    feats.append(F.normalize(feature.float(), dim=1).cpu())
                    kept.extend(paths[i] for i in indices[ok].tolist())
        features = torch.cat(feats) if feats else torch.zeros(0, 0)
        return features, kept, skipped

    @staticmethod
    def _strict_error(skipped: list[tuple[str, str]]) -> GalleryError:
        path, why = skipped[0]
        return GalleryError(f"{path}: unreadable image ({why}); without --strict such files are skipped")

    @staticmethod
    def _report_skipped(skipped: Sequence[tuple[str, str]], total: int) -> None:
        if skipped:
            shown = "; ".join(f"{p} ({why})" for p, why in skipped[:LISTED_FAILURES])
            more = f"; and {len(skipped) - LISTED_FAILURES} more" if len(skipped) > LISTED_FAILURES else ""
            logger.warning("skipped %d unreadable image(s) of %d: %s%s", len(skipped), total, shown, more)

    # ------------------------------------------------------------------------------------------- search
    def encode_query(self, text: str) -> torch.Tensor:
        """The normalised feature [D] (float32, CPU) of one caption."""
        with torch.inference_mode(), autocast(self.device, bool(self.cfg.eval.amp)):
            _, _, feature = encode_text_tokens(self.model, self.tokenizer, [text], self.cfg.text.max_text_len,
                                               self.device)
        return F.normalize(feature.float(), dim=1)[0].cpu()

    def search(self, text: str, k: int = 10) -> list[tuple[str, float]]:
        """The ``k`` gallery images most similar to ``text``, best first, as (path, cosine similarity)."""
        if self.gallery is None:
            raise GalleryError("no gallery: call index(folder) or load_index(file) first")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        scores = self.gallery.features @ self.encode_query(text)
        order = torch.sort(scores, descending=True, stable=True).indices[:k]
        return [(self.gallery.paths[i], float(scores[i])) for i in order.tolist()]
