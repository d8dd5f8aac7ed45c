"""Readers for the released person-centric pretraining corpora, as their owners distribute them.

Each reader turns one corpus into items of the common pretraining format, ``{"image": path relative to the
image root, "caption": text, "identity": the owners' image key}``, counting what it read and skipped in a
:class:`CorpusCounts` (``datasets.prepare_pretrain`` adds the missing-image check and the summary table). The
layouts are those the owners' public loading code reads (the file named in each function):

* **MALS** (APTM, Yang et al., ACM MM 2023): JSON lists of ``{"image", "caption", "image_id", "label"}``
  (``data/gene_attrs/*.json`` in APTM's pretraining config), images under ``MALS/`` (``gene_crop/...``).
  ``label`` is the 27 attributes, not used here. Research use only, no commercial use (the owners' README).
* **LUPerson-MLLM** (NAM, Tan et al., CVPR 2024): four caption files, ``Ts-qwen.json``, ``Td-qwen.json``,
  ``Ts-shikra.json``, ``Td-shikra.json``, each a JSON object ``{image key: caption}``; their loader matches a key
  to an image of the flat LUPerson image folder by its file name. Their loader swaps a caption in which the
  MLLM left the template unfilled (it contains ``description]`` or ``<``) for another caption of the image;
  here such a caption is skipped and counted as ``rejected``. The images are LUPerson's (its own terms apply).
* **SDA** (MRA, Yang et al., 2025): JSON lists of ``{"image", "boxes", "logits", "phrases", "caption",
  "image_id"}`` (``data/sda/sda_*.json``), images under ``SDA/`` (``c_0_5000/0_0.jpg``). Research use only.
* **HAM-PEDES** (HAM, Jiang et al., CVPR 2025): the owners' repository holds the captioning script but no
  loader or README for the released annotations; what that script writes is read here: one JSON object
  ``{image path relative to the image folder: [caption, ...]}``. If the released files differ, convert them
  to this shape or to the common format.
* **WebPerson** (GA-DMS, Zheng et al., EMNLP 2025): Hugging Face parquet files (``data/train-*.parquet``) with
  columns ``image`` (``{"bytes", "path"}``), ``image_path``, ``caption1`` and ``caption2``; the images travel
  inside the parquet, so the reader writes each one to ``<image root>/<image_path>`` (kept when already there).
  Needs ``pyarrow`` (``requirements-pretrain.txt``). Images come from COYO-700M (its licence applies).

Every reader skips and counts empty captions and repeated (image, caption) pairs; a malformed record raises
DataFormatError naming the file, the record and the field.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from datasets.readers import read_json
from datasets.records import DataFormatError, describe_value

LUPERSON_MLLM_FILES = ("Ts-qwen.json", "Td-qwen.json", "Ts-shikra.json", "Td-shikra.json")
LUPERSON_UNFILLED = ("description]", "<")  # the marks of an unfilled template, as the owners' loader tests them
WEBPERSON_CAPTIONS = ("caption1", "caption2")


@dataclass
class CorpusCounts:
    """What a reader met: captions read, and those skipped as empty, repeated or rejected."""

    read: int = 0
    empty: int = 0
    duplicates: int = 0
    rejected: int = 0  # captions the owners' loader would not use as they are (LUPerson-MLLM: unfilled template)


class _Collector:
    """Adds (image, caption, identity) items, skipping and counting empty captions and repeated pairs."""

    def __init__(self, counts: CorpusCounts):
        self.counts = counts
        self.items: list[dict] = []
        self._seen: set[bytes] = set()  # 8-byte digests: 5M pairs cost ~0.4 GB here instead of their text

    def add(self, image: str, caption: str, identity: str) -> None:
        self.counts.read += 1
        caption = caption.strip()
        if not caption:
            self.counts.empty += 1
            return
        key = hashlib.blake2b(f"{image}\0{caption}".encode(), digest_size=8).digest()
        if key in self._seen:
            self.counts.duplicates += 1
            return
        self._seen.add(key)
        self.items.append({"image": image, "caption": caption, "identity": identity})


def expand_sources(sources: Sequence[str | os.PathLike[str]], suffix: str) -> list[str]:
    """Files named in ``sources``; a folder stands for its ``*suffix`` files, sorted by name."""
    files: list[str] = []
    for source in sources:
        path = Path(source)
        if path.is_dir():
            found = sorted(str(p) for p in path.iterdir() if p.name.endswith(suffix))
            if not found:
                raise DataFormatError(path, f"a folder holding {suffix} annotation files", got="none")
            files += found
        elif path.is_file():
            files.append(str(path))
        else:
            raise DataFormatError(path, "an existing annotation file or folder")
    return files


def _field(item: Any, name: str, path: str, index: int, kinds: tuple[type, ...], what: str) -> Any:
    if not isinstance(item, dict):
        raise DataFormatError(path, "a JSON object", index=index, got=describe_value(item))
    if name not in item:
        raise DataFormatError(path, "the field to be present", index=index, field=name, got=f"keys {sorted(item)}")
    value = item[name]
    if not isinstance(value, kinds) or isinstance(value, bool):
        raise DataFormatError(path, what, index=index, field=name, got=describe_value(value))
    return value


def _image_caption_lists(files: Iterable[str], counts: CorpusCounts) -> list[dict]:
    """MALS and SDA: JSON lists of {"image", "caption", "image_id", ...}; identity = image_id."""
    collector = _Collector(counts)
    for path in files:
        data = read_json(path)
        if not isinstance(data, list):
            raise DataFormatError(path, "a JSON list of {image, caption, image_id} objects", got=describe_value(data))
        for index, item in enumerate(data):
            image = _field(item, "image", path, index, (str,), "a string")
            caption = _field(item, "caption", path, index, (str,), "a string")
            identity = _field(item, "image_id", path, index, (str, int), "a string or an integer")
            collector.add(image, caption, str(identity))
    return collector.items


def convert_mals(sources: Sequence[str], counts: CorpusCounts) -> list[dict]:
    """MALS: APTM's ``gene_attrs/*.json`` (a folder or files); image paths relative to the MALS image folder."""
    return _image_caption_lists(expand_sources(sources, ".json"), counts)


def convert_sda(sources: Sequence[str], counts: CorpusCounts) -> list[dict]:
    """SDA: MRA's ``sda/sda_*.json`` (a folder or files); boxes, logits and phrases are not used here."""
    return _image_caption_lists(expand_sources(sources, ".json"), counts)


def _caption_object(path: str) -> dict:
    data = read_json(path)
    if not isinstance(data, dict):
        raise DataFormatError(path, "a JSON object {image: caption(s)}", got=describe_value(data)[:60])
    return data


def convert_luperson_mllm(sources: Sequence[str], counts: CorpusCounts) -> list[dict]:
    """LUPerson-MLLM: the caption files (a folder holding the four owners' files, or the files themselves)."""
    files: list[str] = []
    for source in sources:
        if Path(source).is_dir():
            present = [str(Path(source) / name) for name in LUPERSON_MLLM_FILES if (Path(source) / name).is_file()]
            files += present or expand_sources([source], ".json")
        else:
            files += expand_sources([source], ".json")
    collector = _Collector(counts)
    for path in files:
        for index, (key, caption) in enumerate(_caption_object(path).items()):
            if not isinstance(caption, str):
                raise DataFormatError(path, "a caption string", index=index, field=key, got=describe_value(caption))
            name = key.replace("\\", "/").split("/")[-1]
            if any(mark in caption for mark in LUPERSON_UNFILLED):
                counts.read += 1
                counts.rejected += 1
                continue
            collector.add(name, caption, name)
    return collector.items


def convert_ham_pedes(sources: Sequence[str], counts: CorpusCounts) -> list[dict]:
    """HAM-PEDES: ``{relative image path: [captions]}`` objects as HAM's captioning script writes them."""
    collector = _Collector(counts)
    for path in expand_sources(sources, ".json"):
        for index, (image, captions) in enumerate(_caption_object(path).items()):
            if isinstance(captions, str):
                captions = [captions]
            if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
                raise DataFormatError(path, "a caption string or a list of them", index=index, field=image,
                                      got=describe_value(captions))
            for caption in captions:
                collector.add(image, caption, image)
    return collector.items


def _parquet_rows(path: str, rows_per_read: int = 1024) -> Iterator[dict]:
    """The rows of one parquet file, read a thousand at a time (a file holds hundreds of MB of images)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataFormatError(path, "pyarrow to read WebPerson's parquet files (pip install -r "
                              "requirements-pretrain.txt)") from None
    try:
        batches = pq.ParquetFile(path).iter_batches(rows_per_read, columns=["image", "image_path",
                                                                           *WEBPERSON_CAPTIONS])
        for batch in batches:
            yield from batch.to_pylist()
    except Exception as exc:  # pyarrow raises its own types for a truncated file or a missing column
        raise DataFormatError(path, "a WebPerson parquet file with columns image, image_path, caption1, caption2",
                              got=str(exc).splitlines()[0][:120]) from None


def convert_webperson(sources: Sequence[str], image_root: str, counts: CorpusCounts,
                      write_image: Callable[[Path, bytes], None] | None = None) -> list[dict]:
    """WebPerson: the parquet files (a folder or files); images are written under ``image_root`` from the rows.

    A row without image bytes keeps its captions here, so that the missing-image check counts and drops them.
    """
    collector = _Collector(counts)
    write_image = write_image or _write_if_absent
    for path in expand_sources(sources, ".parquet"):
        for index, row in enumerate(_parquet_rows(path)):
            relative = _field(row, "image_path", path, index, (str,), "a string")
            image = row.get("image") or {}
            if image.get("bytes"):
                write_image(Path(image_root) / relative, image["bytes"])
            for name in WEBPERSON_CAPTIONS:
                caption = row.get(name)
                collector.add(relative, caption if isinstance(caption, str) else "", relative)
    return collector.items


def _write_if_absent(target: Path, data: bytes) -> None:
    if target.is_file():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    partial.write_bytes(data)
    os.replace(partial, target)  # a crash never leaves half an image under the real name


# name -> (converter, what its source is); WebPerson also takes the image root (it writes the images).
PERSON_CORPORA: dict[str, tuple[Callable[..., list[dict]], str]] = {
    "mals": (convert_mals, "MALS: APTM's gene_attrs/*.json (folder or files)"),
    "luperson_mllm": (convert_luperson_mllm, "LUPerson-MLLM: folder with Ts/Td-qwen/shikra.json (or the files)"),
    "sda": (convert_sda, "SDA: MRA's sda/sda_*.json (folder or files)"),
    "ham_pedes": (convert_ham_pedes, "HAM-PEDES: {image: [captions]} JSON (folder or files)"),
    "webperson": (convert_webperson, "WebPerson: the parquet files of WebPerson-1M/5M (folder or files)"),
}
