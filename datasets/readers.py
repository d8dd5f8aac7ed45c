"""Annotation readers: CUHK-PEDES, ICFG-PEDES and RSTPReid (raw and the authors' processed JSON), pretraining
corpora, and the image check that runs before training.

Every reader returns canonical :class:`~datasets.records.Record` lists. On purpose and unlike the authors'
loaders: no caption is dropped for its length or cut at a substring, each caption is its own record (image-major
order, so one image's captions stay adjacent), and ``image_id`` comes from the unique image paths.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from datasets.authors_text import authors_cut, authors_word_count
from datasets.image_check import DEFAULT_MODE, ImageCheckReport, scan_images
from datasets.record_store import RecordStore, iter_json_list
from datasets.records import (
    SPLIT_NAMES,
    AnnotationNotFoundError,
    DatasetSplits,
    DataFormatError,
    MissingImagesError,
    Record,
    describe_value,
)
from utils.config import ConfigError

logger = logging.getLogger(__name__)

SYNTHETIC_MARKER = "SYNTHETIC.json"
# Keys of the authors' processed files that repeat test records; accepted and not read.
_IGNORED_PROCESSED_KEYS = ("query", "gallery")
_MAX_LISTED = 5
# A dataset whose counts are all within this fraction of the published ones is taken for the real one.
PUBLISHED_TOLERANCE = 0.2


@dataclass(frozen=True)
class _FormatSpec:
    title: str
    candidates: tuple[str, ...]  # names as distributed, raw first, then the authors' processed JSON
    path_field: str
    raw_splits: tuple[str, ...]
    processed_caption_is_list: bool
    processed_has_att: bool
    authors_words: str = ""  # how the authors' loader counts a caption's words: "split" (RSTPReid), "tokens" (ICFG)


_SPECS: dict[str, _FormatSpec] = {
    "cuhkpedes": _FormatSpec(
        "CUHK-PEDES", ("reid_raw.json", "caption_all.json", "cuhk_pedes_att.json"), "file_path",
        ("train", "val", "test"), False, True,
    ),
    "icfg": _FormatSpec(
        "ICFG-PEDES", ("ICFG-PEDES.json", "ICFG_PEDES.json", "ICFG_PEDES_VISTXT.json"), "file_path",
        ("train", "test"), True, False, "tokens",
    ),
    "rstp": _FormatSpec(
        "RSTPReid", ("data_captions.json", "rstpreid_vistxt.json"), "img_path",
        ("train", "val", "test"), False, False, "split",
    ),
}
FORMATS = tuple(_SPECS)

# (ids, images, captions) per split as published with each dataset; optional for a new format.
PUBLISHED_COUNTS: dict[str, dict[str, tuple[int, int, int]]] = {
    "cuhkpedes": {"train": (11003, 34054, 68126), "val": (1000, 3078, 6158), "test": (1000, 3074, 6156)},
    "icfg": {"train": (3102, 34674, 34674), "val": (0, 0, 0), "test": (1000, 19848, 19848)},
    "rstp": {"train": (3701, 18505, 37010), "val": (200, 1000, 2000), "test": (200, 1000, 2000)},
}


@dataclass(frozen=True)
class _Entry:
    """One annotation element before image ids and labels are assigned."""

    split: str
    index: int
    rel_path: str
    captions: tuple[str, ...]
    raw_id: int
    phrases: tuple[str, ...] | None
    tokens: tuple[tuple[str, ...] | None, ...] = ()  # per caption, the file's processed_tokens (ICFG-PEDES)


# ----------------------------------------------------------------------------------------------- field access

def read_json(path: str | PathLike[str]) -> Any:
    """Parse a JSON file; a missing file or invalid JSON raises DataFormatError naming the file."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise AnnotationNotFoundError(path, "an existing annotation file") from None
    except json.JSONDecodeError as error:
        raise DataFormatError(
            path, "valid JSON", got=f"{error.msg} at line {error.lineno} column {error.colno}"
        ) from None
    except UnicodeDecodeError as error:
        raise DataFormatError(path, "UTF-8 text", got=str(error)) from None


def _require(item: dict, name: str, path: Any, index: int, split: str | None) -> Any:
    if name not in item:
        raise DataFormatError(path, "the field to be present", index=index, split=split, field=name,
                              got=f"keys {sorted(item)}")
    return item[name]


def _get_str(item: dict, name: str, path: Any, index: int, split: str | None) -> str:
    value = _require(item, name, path, index, split)
    if not isinstance(value, str):
        raise DataFormatError(path, "a string", index=index, split=split, field=name, got=describe_value(value))
    return value


def _get_int(item: dict, name: str, path: Any, index: int, split: str | None) -> int:
    value = _require(item, name, path, index, split)
    if isinstance(value, bool) or not isinstance(value, int):
        raise DataFormatError(path, "an integer", index=index, split=split, field=name,
                              got=describe_value(value))
    return value


def _get_str_list(item: dict, name: str, path: Any, index: int, split: str | None) -> list[str]:
    value = _require(item, name, path, index, split)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise DataFormatError(path, "a list of strings", index=index, split=split, field=name,
                              got=describe_value(value))
    return value


def _get_phrases(item: dict, path: Any, index: int, split: str | None) -> tuple[str, ...] | None:
    """The authors' ``att`` dict as a tuple of non-empty phrases (dict order); None when absent or empty."""
    if "att" not in item or item["att"] is None:
        return None
    att = item["att"]
    if not isinstance(att, dict) or not all(isinstance(v, str) for v in att.values()):
        raise DataFormatError(path, "a dict of phrase strings", index=index, split=split, field="att",
                              got=describe_value(att))
    phrases = tuple(p.strip() for p in att.values() if p.strip())
    return phrases or None


def _get_tokens(item: dict, count: int, path: Any, index: int,
                split: str | None) -> tuple[tuple[str, ...] | None, ...]:
    """``processed_tokens`` (a list of word lists, one per caption) for the first ``count`` captions; None for
    a caption the field does not cover (the field is optional)."""
    value = item.get("processed_tokens")
    if value is None:
        return (None,) * count
    if not isinstance(value, list) or not all(
            isinstance(words, list) and all(isinstance(w, str) for w in words) for words in value):
        raise DataFormatError(path, "a list of word lists (one per caption)", index=index, split=split,
                              field="processed_tokens", got=describe_value(value))
    return tuple(tuple(value[k]) if k < len(value) else None for k in range(count))


def _as_object(item: Any, path: Any, index: int, split: str | None) -> dict:
    if not isinstance(item, dict):
        raise DataFormatError(path, "a JSON object", index=index, split=split, got=describe_value(item))
    return item


# ----------------------------------------------------------------------------------------------- parsing

def _parse_raw(data: list, path: str, spec: _FormatSpec) -> Iterator[_Entry]:
    """The datasets' own files: a list of image entries, each with its split and a list of captions."""
    for index, item in enumerate(data):
        item = _as_object(item, path, index, None)
        split = _get_str(item, "split", path, index, None)
        if split not in spec.raw_splits:
            raise DataFormatError(path, f"one of {list(spec.raw_splits)}", index=index, field="split",
                                  got=describe_value(split))
        captions = _get_str_list(item, "captions", path, index, None)
        yield _Entry(
            split=split,
            index=index,
            rel_path=_get_str(item, spec.path_field, path, index, None),
            captions=tuple(captions),
            raw_id=_get_int(item, "id", path, index, None),
            phrases=None,
            tokens=_get_tokens(item, len(captions), path, index, None) if spec.authors_words == "tokens" else (),
        )


def _parse_processed(data: dict, path: str, spec: _FormatSpec) -> Iterator[_Entry]:
    """The authors' processed files: ``{split: [record, ...]}``, one caption per record (ICFG: first caption)."""
    allowed = set(spec.raw_splits) | set(_IGNORED_PROCESSED_KEYS)
    for key in data:
        if key not in allowed:
            raise DataFormatError(path, f"top-level keys among {sorted(allowed)}", field=key,
                                  got="an unknown key")
    for required in ("train", "test"):
        if required not in data:
            raise DataFormatError(path, "the split to be present", field=required, got=f"keys {sorted(data)}")
    for split in spec.raw_splits:
        items = data.get(split, [])
        if not isinstance(items, list):
            raise DataFormatError(path, "a list of records", field=split, got=describe_value(items))
        for index, item in enumerate(items):
            item = _as_object(item, path, index, split)
            if spec.processed_caption_is_list:
                captions = _get_str_list(item, "captions", path, index, split)[:1]
            else:
                captions = [_get_str(item, "captions", path, index, split)]
            tokens = _get_tokens(item, 1, path, index, split)[:1] if spec.authors_words == "tokens" else ()
            yield _Entry(
                split=split,
                index=index,
                rel_path=_get_str(item, spec.path_field, path, index, split),
                captions=tuple(captions),
                raw_id=_get_int(item, "id", path, index, split),
                phrases=_get_phrases(item, path, index, split) if spec.processed_has_att else None,
                tokens=tokens,
            )


def _authors_view(entry: _Entry, k: int, words: str) -> tuple[int | None, str | None]:
    """(authors_word_count, authors_caption) of caption ``k`` of ``entry`` (see Record), from the raw caption."""
    caption = entry.captions[k]
    if words == "split":
        return authors_word_count(caption), None
    tokens = entry.tokens[k] if words == "tokens" and k < len(entry.tokens) else None
    if tokens is None:
        return None, None
    return len(tokens), authors_cut(caption, tokens)


def _build_records(
    entries: Iterable[_Entry], root: str, path: str, splits: Sequence[str], authors_words: str = ""
) -> tuple[dict[str, list[Record]], int, list[tuple[str, int, str]]]:
    """Flatten entries to one record per caption.

    Returns records per split, the number of train pids and (split, index, path) of entries with empty captions.
    """
    rows: dict[str, list[tuple]] = {s: [] for s in splits}
    image_pid: dict[str, dict[str, tuple[int, int]]] = {s: {} for s in splits}
    empty: list[tuple[str, int, str]] = []
    for entry in entries:
        seen = image_pid[entry.split].setdefault(entry.rel_path, (entry.raw_id, entry.index))
        if seen[0] != entry.raw_id:
            raise DataFormatError(
                path, f"image '{entry.rel_path}' to keep id {seen[0]} given at record {seen[1]}",
                index=entry.index, split=entry.split, field="id", got=entry.raw_id,
            )
        # A whitespace-only caption stays in the evaluation splits, as "": protocol authors keeps it as a query,
        # as their loaders do, and protocol standard leaves it out (engine/evaluation.py); nothing trains on it.
        kept = [k for k, c in enumerate(entry.captions) if c.strip() or (c and entry.split != "train")]
        if len(kept) < len(entry.captions) or not entry.captions:
            empty.append((entry.split, entry.index, entry.rel_path))
        for k in kept:
            rows[entry.split].append((entry.rel_path, entry.captions[k].strip(), entry.raw_id, entry.phrases,
                                      *_authors_view(entry, k, authors_words)))
    if empty:
        shown = ", ".join(f"{s}[{i}] {p}" for s, i, p in empty[:_MAX_LISTED])
        logger.warning("%s: skipped empty captions in %d record(s); first: %s", path, len(empty), shown)

    train_ids = sorted({row[2] for row in rows.get("train", [])})
    train_label = {raw_id: label for label, raw_id in enumerate(train_ids)}
    records: dict[str, list[Record]] = {}
    for split, split_rows in rows.items():
        image_ids: dict[str, int] = {}
        records[split] = [
            Record(
                image_path=os.path.join(root, "imgs", rel_path),
                caption=caption,
                pid=train_label[raw_id] if split == "train" else raw_id,
                image_id=image_ids.setdefault(rel_path, len(image_ids)),
                phrases=phrases,
                authors_word_count=word_count,
                authors_caption=cut,
            )
            for rel_path, caption, raw_id, phrases, word_count, cut in split_rows
        ]
    return records, len(train_ids), empty


# ----------------------------------------------------------------------------------------------- statistics

def split_counts(records: Sequence[Record]) -> tuple[int, int, int]:
    """(ids, images, captions) of one split."""
    return len({r.pid for r in records}), len({r.image_id for r in records}), len(records)


def format_statistics(splits: DatasetSplits) -> str:
    """A plain-text table with ids, images and captions per split."""
    lines = [f"{'split':<6} | {'ids':>6} | {'images':>7} | {'captions':>8}"]
    lines.append("-" * len(lines[0]))
    for name in SPLIT_NAMES:
        ids, images, captions = split_counts(getattr(splits, name))
        lines.append(f"{name:<6} | {ids:>6} | {images:>7} | {captions:>8}")
    return "\n".join(lines)


def looks_like_published(got: dict[str, tuple[int, int, int]], published: dict[str, tuple[int, int, int]],
                         tolerance: float = PUBLISHED_TOLERANCE) -> bool:
    """True when every count of every split is within ``tolerance`` of the published one.

    This implies the same non-empty splits (an empty split is 100% off a non-empty one, and any record is off
    a published 0). Such a dataset is taken for the real one, so any difference means an incomplete or altered
    copy; a custom or subset dataset (counts far from the published ones, or other splits) is not compared.
    """
    for name in SPLIT_NAMES:
        counts, expected = got.get(name, (0, 0, 0)), published.get(name, (0, 0, 0))
        if any(abs(c - e) > tolerance * e for c, e in zip(counts, expected)):
            return False
    return True


def _check_published_counts(splits: DatasetSplits) -> None:
    """Warn when the dataset looks like the published one (see looks_like_published) but its counts differ."""
    if (Path(splits.root) / SYNTHETIC_MARKER).exists():
        return
    expected = PUBLISHED_COUNTS.get(splits.name)
    if expected is None:  # a dataset added in an existing JSON shape has no published sizes to compare with
        return
    got = {name: split_counts(getattr(splits, name)) for name in SPLIT_NAMES}
    if got == expected:
        return
    title = _SPECS[splits.name].title
    if not looks_like_published(got, expected):
        logger.info("%s: counts are not close to the published %s ones; treated as a custom dataset",
                    splits.annotation_file, title)
        return
    differing = [f"{name} {'/'.join(map(str, got[name]))} (published {'/'.join(map(str, expected[name]))})"
                 for name in SPLIT_NAMES if got[name] != expected[name]]
    logger.warning(
        "%s: ids/images/captions are close to but differ from the published %s counts: %s; "
        "check that the annotation file and images are complete", splits.annotation_file, title, "; ".join(differing),
    )


# ----------------------------------------------------------------------------------------------- public API

def find_annotation_file(fmt: str, root: str | PathLike[str], root_key: str = "data.root") -> Path:
    """The first of the format's distributed file names present in ``root`` (the value of the key ``root_key``,
    which the message names)."""
    spec = _spec(fmt)
    for name in spec.candidates:
        if (Path(root) / name).is_file():
            return Path(root) / name
    other = ", or data.annotation_file=FILE" if root_key == "data.root" else ""
    raise AnnotationNotFoundError(
        root, f"one of {list(spec.candidates)} in the {spec.title} root (set {root_key}=PATH to the dataset "
        f"folder{other})",
        got="none of them" if Path(root).is_dir() else "no such folder",
    )


def _spec(fmt: str) -> _FormatSpec:
    if fmt not in _SPECS:
        raise ConfigError(f"unknown annotation format {fmt!r} (data.format / data.eval_format): expected one of "
                          f"{', '.join(FORMATS)}")
    return _SPECS[fmt]


def load_annotations(
    fmt: str, root: str | PathLike[str], annotation_file: str | PathLike[str] | None = None,
    root_key: str = "data.root",
) -> DatasetSplits:
    """Read one fine-tuning dataset into canonical records.

    ``fmt`` is "cuhkpedes", "icfg" or "rstp". Without ``annotation_file`` the distributed names are looked up
    in ``root``; an explicit file may be relative to ``root`` or absolute. Raw versus processed is decided by
    the JSON shape (a list versus an object of splits). Images are expected at ``<root>/imgs/<path>``.
    ``root_key`` is the config key ``root`` came from, for the message when no annotation file is there.
    """
    spec = _spec(fmt)
    root = str(root)
    if annotation_file is None:
        path = find_annotation_file(fmt, root, root_key)
    else:
        path = Path(annotation_file) if os.path.isabs(annotation_file) else Path(root) / annotation_file
    data = read_json(path)
    if isinstance(data, list):
        entries = _parse_raw(data, str(path), spec)
    elif isinstance(data, dict):
        entries = _parse_processed(data, str(path), spec)
    else:
        raise DataFormatError(path, "a JSON list of image entries (raw) or an object of splits (processed)",
                              got=describe_value(data))
    records, num_train_pids, empty = _build_records(entries, root, str(path), SPLIT_NAMES, spec.authors_words)
    splits = DatasetSplits(fmt, root, str(path), records["train"], records["val"], records["test"], num_train_pids,
                           skipped_empty=empty)
    logger.info("%s annotations from %s:\n%s", spec.title, path, format_statistics(splits))
    _check_published_counts(splits)
    return splits


def load_pretrain_corpora(entries: list[dict], *, skipped_empty: list | None = None) -> RecordStore:
    """Image-caption corpora for pretraining; pid = image_id = the running index over all records.

    Each entry is ``{"annotation": JSON list of {"image", "caption"}, "image_root": folder}``; relative image
    paths are joined to ``image_root``. A caption may also be a list of strings (one record each). Entries
    with an empty caption are skipped with a warning; ``skipped_empty``, when given, receives
    (annotation file, index, image) for each of them. The records come back in a
    :class:`~datasets.record_store.RecordStore` (flat arrays, shared by forked loader workers), and each file is
    parsed one element at a time, so millions of records never exist as Python objects all at once.
    """
    where = "pretrain corpora list"
    if not isinstance(entries, list) or not entries:
        raise DataFormatError(where, "a non-empty list of {annotation, image_root} entries",
                              got=describe_value(entries))
    store = RecordStore()
    for number, entry in enumerate(entries):
        entry = _as_object(entry, where, number, None)
        annotation = _get_str(entry, "annotation", where, number, None)
        root = store.add_root(_get_str(entry, "image_root", where, number, None))
        empty: list[tuple[int, str]] = []
        first = len(store)
        for index, item in enumerate(iter_json_list(annotation, "a JSON list of {image, caption} objects")):
            item = _as_object(item, annotation, index, None)
            image = _get_str(item, "image", annotation, index, None)
            caption = item.get("caption")
            if isinstance(caption, str):
                captions = [caption]
            else:
                captions = _get_str_list(item, "caption", annotation, index, None)
            kept = [c.strip() for c in captions if c.strip()]
            if len(kept) < len(captions) or not captions:
                empty.append((index, image))
            for text in kept:
                store.add(root, image, text)
        if skipped_empty is not None:
            skipped_empty.extend((annotation, i, p) for i, p in empty)
        if empty:
            shown = ", ".join(f"[{i}] {p}" for i, p in empty[:_MAX_LISTED])
            logger.warning("%s: skipped empty captions in %d record(s); first: %s", annotation, len(empty), shown)
        logger.info("pretrain corpus %s: %d captions", annotation, len(store) - first)
    store.freeze()
    logger.info("pretrain corpora: %d captions from %d file(s), %.1f MiB of record arrays", len(store), len(entries),
                store.nbytes() / 2**20)
    return store


def check_images(
    records: Iterable[Record],
    *,
    decode: bool | str = DEFAULT_MODE,
    max_listed: int = 5,
    workers: int | None = None,
    progress: bool | None = None,
    base: str | None = None,
) -> ImageCheckReport:
    """Check every unique image path of ``records``; raise MissingImagesError (a FileNotFoundError) if any is bad.

    ``decode`` is the check level of :mod:`datasets.image_check`: "exists", "header" (the default: Pillow
    header and verify, JPEG end marker, a full decode only to confirm a suspect file) or "full"; ``False``
    and ``True`` still mean "exists" and "full". The one-line message gives, separately for missing and
    undecodable images, the count out of the total, the counts per top-level folder and the first
    ``max_listed`` paths; the error's ``report`` lists them all. Returns the report when all is well.
    """
    report = scan_images((r.image_path for r in records), decode, workers=workers, progress=progress, base=base)
    if not report.ok:
        raise MissingImagesError(report.summary(max_listed), report)
    logger.info("all %d images found%s (%s check, %.1f s)", report.total,
                "" if report.mode == "exists" else " and readable", report.mode, report.seconds)
    return report
