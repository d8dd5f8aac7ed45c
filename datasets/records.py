"""Canonical annotation records shared by every reader, and the errors readers raise on bad input."""
from __future__ import annotations

from dataclasses import dataclass, field
from os import PathLike
from typing import Any

from utils.errors import UserError

SPLIT_NAMES = ("train", "val", "test")


@dataclass(frozen=True)
class Record:
    """One caption of one image.

    ``pid`` is 0..P-1 in the train split (raw train ids sorted, then numbered) and the raw id elsewhere;
    ``image_id`` numbers the split's unique images 0..n_images-1 in order of first appearance, so two
    captions of one image share it. ``phrases`` holds the authors' ``att`` phrases when the file has them.
    ``authors_word_count`` is the caption's length in words as the authors' loader of the format counts it
    (RSTPReid: their split of the raw caption; ICFG-PEDES: the file's ``processed_tokens``), None elsewhere;
    ``authors_caption`` is the caption as their ICFG-PEDES loader cuts it when it has more than 90 of those
    tokens, else None (see datasets/authors_text.py; protocol ``authors`` uses both).
    """

    image_path: str
    caption: str
    pid: int
    image_id: int
    phrases: tuple[str, ...] | None = None
    authors_word_count: int | None = None
    authors_caption: str | None = None


class DataFormatError(UserError, ValueError):
    """Malformed annotation input; the message names the file, the record, the field and the expectation."""

    def __init__(
        self,
        file: str | PathLike[str],
        expected: str,
        *,
        index: int | None = None,
        split: str | None = None,
        field: str | None = None,
        got: Any = None,
    ) -> None:
        where = [str(file)]
        if index is not None:
            where.append(f"record {index}" + (f" of '{split}'" if split is not None else ""))
        elif split is not None:
            where.append(f"split '{split}'")
        if field is not None:
            where.append(f"field '{field}'")
        message = ", ".join(where) + f": expected {expected}"
        if got is not None:
            message += f", got {got}"
        super().__init__(message)
        self.file = str(file)
        self.index = index
        self.split = split
        self.field = field


class AnnotationNotFoundError(DataFormatError, FileNotFoundError):
    """No annotation file where one was expected; catchable as DataFormatError or FileNotFoundError."""


class MissingImagesError(UserError, FileNotFoundError):
    """Some images named by the annotations are missing or cannot be decoded.

    ``report`` is the :class:`datasets.image_check.ImageCheckReport` behind the message when there is one
    (missing and undecodable paths listed separately, grouped by folder).
    """

    def __init__(self, message: str, report: Any = None) -> None:
        super().__init__(message)
        self.report = report


class SplitError(UserError, ValueError):
    """A split that does not exist or holds no records."""


def describe_value(value: Any) -> str:
    """Short ``type: value`` text for error messages, cut so one bad record cannot flood the log."""
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


@dataclass
class DatasetSplits:
    """The three splits of one dataset as canonical records, plus where they came from."""

    name: str
    root: str
    annotation_file: str
    train: list[Record] = field(default_factory=list)
    val: list[Record] = field(default_factory=list)
    test: list[Record] = field(default_factory=list)
    num_train_pids: int = 0
    # (split, record index in the file, image path) of entries whose empty captions the reader skipped
    skipped_empty: list[tuple[str, int, str]] = field(default_factory=list)

    def split(self, name: str) -> list[Record]:
        """The records of split ``name``; raises SplitError for an unknown or empty split."""
        if name not in SPLIT_NAMES:
            raise SplitError(f"unknown split '{name}' for dataset '{self.name}': expected one of {SPLIT_NAMES}")
        records = getattr(self, name)
        if not records:
            raise SplitError(
                f"split '{name}' of dataset '{self.name}' ({self.annotation_file}) is empty"
                + ("; ICFG-PEDES has no val split, select on another split" if self.name == "icfg" else "")
            )
        return records
