"""Small image files for the data-check tests: a patterned picture, and one cut short as a broken copy would be."""
from __future__ import annotations

from pathlib import Path

from PIL import Image


def write_image(path: Path, fmt: str = "JPEG", size: tuple[int, int] = (64, 128)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = bytes((x * 7 + y * 13) % 256 for y in range(size[1]) for x in range(size[0]) for _ in range(3))
    Image.frombytes("RGB", size, pixels).save(path, fmt)
    return path


def truncate(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path
