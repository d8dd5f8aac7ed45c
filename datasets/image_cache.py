"""A decoded-image cache: every training image as uint8 RGB at its original size, in one memory-mapped file.

Decoding a JPEG costs more than most of the augmentation; the training set is decoded once, ``num_views`` x
epochs times over without a cache. The cache folder (``data.image_cache``) holds

    images.u8    the pixels of every image, height x width x 3 (RGB, row-major), one after another
    index.json   format version, and per image: path, byte offset, height, width, file size and mtime (to
                 notice a changed file), or the decode error of an image that could not be read

Workers open the file read-only with ``numpy.memmap``; the operating system's page cache holds it once for every
worker and process (CUHK-PEDES's 34k training images are ~1.6 GB at their original sizes). Pixels are exactly
those :func:`datasets.transforms.load_image` returns, so the reference CPU path gives the same result from the
cache as from the files. The folder is written beside its final name and renamed into place, so an interrupted
build leaves no half cache; a cache whose images changed on disk (size or mtime), or that lacks some image, is
rebuilt.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from PIL import Image

from datasets.transforms import load_image

logger = logging.getLogger(__name__)

CACHE_VERSION = 1
PIXELS, INDEX = "images.u8", "index.json"


def _stat(path: str) -> tuple[int, int]:
    try:
        st = os.stat(path)
    except OSError:
        return -1, -1
    return st.st_size, st.st_mtime_ns


def _decode(path: str) -> tuple[np.ndarray | None, str | None]:
    try:
        return np.asarray(load_image(path), dtype=np.uint8), None
    except OSError as exc:
        return None, str(exc)


class ImageCache:
    """Read access to a built cache: ``cache.array(path)`` -> uint8 [H, W, 3]; ``cache.image(path)`` -> PIL RGB.

    Picklable (DataLoader workers open the memory map themselves, on first use). A path outside the cache, or an
    image that failed to decode when the cache was built, raises the OSError loading the file would raise.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index = json.loads((self.folder / INDEX).read_text())
        if index.get("version") != CACHE_VERSION:
            raise OSError(f"{self.folder}: image cache version {index.get('version')}, expected {CACHE_VERSION}")
        self.entries: dict[str, dict] = {e["path"]: e for e in index["images"]}
        self.total_bytes = int(index["total_bytes"])
        self._pixels: np.memmap | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_pixels": None}

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, path: str) -> bool:
        return str(path) in self.entries

    def _map(self) -> np.ndarray:
        if self._pixels is None:
            if self.total_bytes == 0:
                self._pixels = np.zeros(0, dtype=np.uint8)  # type: ignore[assignment]
            else:
                self._pixels = np.memmap(self.folder / PIXELS, dtype=np.uint8, mode="r", shape=(self.total_bytes,))
        return self._pixels

    def array(self, path: str) -> np.ndarray:
        """The decoded image at ``path`` as a uint8 array [H, W, 3] (a copy, writable)."""
        entry = self.entries.get(str(path))
        if entry is None:
            raise FileNotFoundError(f"image not in the cache {self.folder}: {path}")
        if entry.get("error"):
            raise OSError(entry["error"])
        height, width, offset = entry["height"], entry["width"], entry["offset"]
        flat = self._map()[offset:offset + height * width * 3]
        return np.array(flat).reshape(height, width, 3)

    def image(self, path: str) -> Image.Image:
        """The decoded image as a PIL RGB image (what :func:`datasets.transforms.load_image` returns)."""
        return Image.fromarray(self.array(path), mode="RGB")

    def is_current(self, paths: Iterable[str]) -> bool:
        """Whether every one of ``paths`` is cached from the file as it is on disk now (size and mtime)."""
        for path in paths:
            entry = self.entries.get(str(path))
            if entry is None or (entry["size"], entry["mtime_ns"]) != _stat(str(path)):
                return False
        return True


def build_image_cache(paths: Sequence[str], folder: str | Path, workers: int = 0) -> ImageCache:
    """Decode the unique ``paths`` into a new cache at ``folder`` (replacing one there) and open it.

    ``workers`` > 0 decodes in that many processes (the file is still written in path order). Images that fail
    to decode are recorded with their error, so training can skip them as it skips unreadable files.
    """
    folder = Path(folder)
    unique = list(dict.fromkeys(str(p) for p in paths))
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        entries, offset, bad = [], 0, 0
        with open(staging / PIXELS, "wb") as out:
            if workers > 0:
                with ProcessPoolExecutor(workers) as pool:
                    decoded: Iterable = pool.map(_decode, unique, chunksize=64)
                    offset, bad = _write(unique, decoded, out, entries)
            else:
                offset, bad = _write(unique, map(_decode, unique), out, entries)
            out.flush()
            os.fsync(out.fileno())
        index = {"version": CACHE_VERSION, "total_bytes": offset, "images": entries}
        (staging / INDEX).write_text(json.dumps(index))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("image cache %s: %d images, %.2f GB decoded, %d could not be decoded", folder, len(unique),
                offset / 1e9, bad)
    return ImageCache(folder)


def _write(paths: Sequence[str], decoded: Iterable, out, entries: list) -> tuple[int, int]:
    offset = bad = 0
    for path, (pixels, error) in zip(paths, decoded):
        size, mtime = _stat(path)
        entry = {"path": path, "size": size, "mtime_ns": mtime, "offset": offset}
        if pixels is None:
            entry.update(height=0, width=0, error=error)
            bad += 1
        else:
            out.write(pixels.tobytes())
            entry.update(height=int(pixels.shape[0]), width=int(pixels.shape[1]))
            offset += pixels.nbytes
        entries.append(entry)
    return offset, bad


def open_or_build_image_cache(folder: str | Path, paths: Sequence[str], workers: int = 0) -> ImageCache:
    """The cache at ``folder`` when it holds every one of ``paths`` as they are on disk, else a fresh build."""
    folder = Path(folder)
    if (folder / INDEX).is_file():
        try:
            cache = ImageCache(folder)
        except (OSError, ValueError, KeyError) as exc:
            logger.warning("image cache %s is unreadable (%s); rebuilding it", folder, exc)
        else:
            if cache.is_current(paths):
                logger.info("image cache %s: %d images, %.2f GB", folder, len(cache), cache.total_bytes / 1e9)
                return cache
            logger.info("image cache %s does not match the training images on disk; rebuilding it", folder)
    return build_image_cache(paths, folder, workers)
