"""Checking that the images named by annotation records exist and decode, fast enough to run before every training.

Three levels (``mode``):

* ``exists``: the file is there (a stat per image).
* ``header`` (the default): Pillow identifies the file and ``verify()`` passes, and a JPEG ends with its
  end-of-image marker. This reads headers and a few bytes at the end, not the pixels, and catches what
  usually breaks a data set: missing, empty, HTML/text saved as .jpg, and truncated (partly copied) files.
  A file that fails any of these tests, or has a format other than JPEG/PNG, is decoded fully before it is
  reported, so the header level never rejects an image that training could load.
* ``full``: every image is decoded.

Paths are checked in parallel by a thread pool (file I/O and Pillow's decoders release the GIL; on a network
disk most of the time is latency), with a tqdm progress bar on an interactive terminal for large inputs.
Problems come back in an :class:`ImageCheckReport`, grouped by top-level folder (e.g. ``CUHK01/``, ``Market/``
under ``imgs/``); :func:`datasets.readers.check_images` turns a failed report into MissingImagesError, and
``python -m datasets.check`` prints it.

Only Pillow (and tqdm for the progress bar) is imported: no torch.
"""
from __future__ import annotations

import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Iterable, Sequence

MODES = ("exists", "header", "full")
DEFAULT_MODE = "header"
TOP_LEVEL = "./"  # group label of files directly in the base folder
_CHUNK = 64  # paths per thread-pool task: small enough to balance, large enough to keep overhead low
_PROGRESS_MIN = 5000  # show a progress bar from this many images on (when stderr is a terminal)
_JPEG_TAIL = 32  # bytes at the end of a JPEG searched for the end-of-image marker (FF D9)


def normalise_mode(decode: bool | str) -> str:
    """``False`` -> "exists", ``True`` -> "full" (the old boolean meaning), a mode name -> itself."""
    if decode is False:
        return "exists"
    if decode is True:
        return "full"
    if isinstance(decode, str) and decode in MODES:
        return decode
    raise ValueError(f"image check: unknown mode {decode!r}; expected one of {MODES} (or a bool)")


def default_workers() -> int:
    """Threads for the check: twice the cores (latency-bound on network disks), between 2 and 16."""
    return max(2, min(16, 2 * (os.cpu_count() or 1)))


# ----------------------------------------------------------------------------------------------- one image

def _short(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    return text if len(text) <= 120 else text[:117] + "..."


def _decode_fully(path: str) -> None:
    from datasets.pixels import open_image

    with open_image(path) as image:
        image.load()
        if image.mode != "RGB":
            image.convert("RGB")  # as datasets.transforms.load_image does


def _header_ok(path: str) -> bool:
    """True when the cheap tests pass; False when the file needs a full decode to decide."""
    from PIL import Image

    from datasets.pixels import check_pixels

    try:
        with Image.open(path) as image:
            fmt = image.format
            check_pixels(image, path)
            image.verify()
    except FileNotFoundError:
        raise
    except Exception:  # any Pillow complaint: let the full decode decide and name the reason
        return False
    if fmt == "PNG":
        return True  # verify() read every chunk up to IEND and checked its CRC
    if fmt == "JPEG":
        with open(path, "rb") as handle:
            size = handle.seek(0, os.SEEK_END)
            handle.seek(max(0, size - _JPEG_TAIL))
            # FF D9 cannot occur inside entropy-coded data, so it in the last bytes means the scan ended
            return b"\xff\xd9" in handle.read()
    return False  # other formats have no cheap integrity test


def probe_image(path: str, mode: str = DEFAULT_MODE) -> tuple[str, str]:
    """("ok" | "missing" | "undecodable", reason) for one image at the given check level."""
    if not os.path.isfile(path):
        return "missing", "no such file"
    if mode == "exists":
        return "ok", ""
    try:
        if mode == "header" and _header_ok(path):
            return "ok", ""
        _decode_fully(path)
    except FileNotFoundError:
        return "missing", "no such file"
    except Exception as error:  # noqa: BLE001 - any decoder failure means training cannot use the image
        return "undecodable", _short(error)
    return "ok", ""


# ----------------------------------------------------------------------------------------------- grouping

def common_base(paths: Iterable[str]) -> str:
    """The deepest folder holding all ``paths`` (e.g. ``<root>/imgs``); "" when there is none."""
    folders = {os.path.dirname(os.path.abspath(p)) for p in paths}
    if not folders:
        return ""
    try:
        return os.path.commonpath(sorted(folders))
    except ValueError:  # e.g. different drives
        return ""


def folder_of(path: str, base: str) -> str:
    """The top-level folder of ``path`` below ``base`` with a trailing slash ("./" for files in ``base``)."""
    relative = os.path.relpath(os.path.abspath(path), base) if base else path
    if relative.startswith(".."):
        return os.path.dirname(os.path.abspath(path)) + "/"
    head, sep, _ = relative.replace(os.sep, "/").partition("/")
    return head + "/" if sep else TOP_LEVEL


def relative_to(path: str, base: str) -> str:
    if not base:
        return path
    relative = os.path.relpath(os.path.abspath(path), base)
    return path if relative.startswith("..") else relative.replace(os.sep, "/")


def group_by_folder(paths: Sequence[str], base: str) -> list[tuple[str, list[str]]]:
    """[(folder, paths in input order)], the largest group first, ties by folder name."""
    groups: dict[str, list[str]] = {}
    for path in paths:
        groups.setdefault(folder_of(path, base), []).append(path)
    return sorted(groups.items(), key=lambda item: (-len(item[1]), item[0]))


# ----------------------------------------------------------------------------------------------- report

@dataclass
class ImageCheckReport:
    """The outcome of checking ``total`` unique images at level ``mode``; ``base`` is the folder they share."""

    mode: str
    total: int
    base: str
    missing: list[str] = field(default_factory=list)
    undecodable: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.missing and not self.undecodable

    def missing_groups(self) -> list[tuple[str, list[str]]]:
        return group_by_folder(self.missing, self.base)

    def undecodable_groups(self) -> list[tuple[str, list[str]]]:
        return group_by_folder([p for p, _ in self.undecodable], self.base)

    def summary(self, max_listed: int = 5, max_groups: int = 5) -> str:
        """One line: per kind of problem, the count, the counts per folder and the first paths."""
        reasons = dict(self.undecodable)
        parts = []
        for what, found, groups in (("are missing", self.missing, self.missing_groups()),
                                    ("cannot be decoded", list(reasons), self.undecodable_groups())):
            if not found:
                continue
            folders = ", ".join(f"{name} {len(paths)}" for name, paths in groups[:max_groups])
            if len(groups) > max_groups:
                folders += f", {len(groups) - max_groups} more folder(s)"
            first = ", ".join(p + (f" ({reasons[p]})" if p in reasons else "") for p in found[:max_listed])
            where = f" under {self.base}" if self.base else ""
            parts.append(f"{len(found)} of {self.total} images {what}{where} (by folder: {folders}; first: {first})")
        return "; ".join(parts)

    def format_lines(self, max_listed: int = 3, max_groups: int = 20) -> list[str]:
        """Several lines for a terminal: a header, then per kind of problem one line per folder."""
        where = f" under {self.base}" if self.base else ""
        lines = [f"images: {self.total} checked{where} ({self.mode} check, {self.seconds:.2f} s): "
                 f"{len(self.missing)} missing, {len(self.undecodable)} undecodable"]
        reasons = dict(self.undecodable)
        for title, groups in (("missing", self.missing_groups()), ("undecodable", self.undecodable_groups())):
            if not groups:
                continue
            lines.append(f"  {title}:")
            width = max(len(name) for name, _ in groups[:max_groups])
            for name, paths in groups[:max_groups]:
                examples = ", ".join(relative_to(p, self.base) + (f" ({reasons[p]})" if p in reasons else "")
                                     for p in paths[:max_listed])
                more = ", ..." if len(paths) > max_listed else ""
                lines.append(f"    {name:<{width}} {len(paths):>7}  e.g. {examples}{more}")
            if len(groups) > max_groups:
                rest = sum(len(paths) for _, paths in groups[max_groups:])
                lines.append(f"    ... {len(groups) - max_groups} more folder(s) with {rest} image(s)")
        return lines


# ----------------------------------------------------------------------------------------------- scanning

def _progress_bar(total: int, mode: str, progress: bool | None):
    enabled = progress if progress is not None else (total >= _PROGRESS_MIN and sys.stderr.isatty())
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # a requirement, but the check must not depend on a progress bar
        return None
    return tqdm(total=total, desc=f"checking images ({mode})", unit="img", file=sys.stderr, mininterval=0.5)


def scan_images(
    paths: Iterable[str],
    mode: bool | str = DEFAULT_MODE,
    *,
    workers: int | None = None,
    progress: bool | None = None,
    base: str | None = None,
) -> ImageCheckReport:
    """Check each unique path once (first-appearance order kept in the report).

    ``workers``: threads (None: :func:`default_workers`; 0 or 1: this thread only). ``progress``: None shows a
    bar for large inputs on a terminal only. ``base``: the folder to group by (None: the paths' common folder).
    """
    mode = normalise_mode(mode)
    unique = list(dict.fromkeys(paths))
    start = time.perf_counter()
    workers = default_workers() if workers is None else workers
    chunks = [unique[i:i + _CHUNK] for i in range(0, len(unique), _CHUNK)]
    results: list[list[tuple[str, str]]] = [[] for _ in chunks]
    bar = _progress_bar(len(unique), mode, progress)
    try:
        if workers <= 1 or len(chunks) <= 1:
            for number, chunk in enumerate(chunks):
                results[number] = [probe_image(p, mode) for p in chunk]
                if bar is not None:
                    bar.update(len(chunk))
        else:
            with ThreadPoolExecutor(max_workers=min(workers, len(chunks)), thread_name_prefix="image-check") as pool:
                futures = {pool.submit(lambda c: [probe_image(p, mode) for p in c], chunk): number
                           for number, chunk in enumerate(chunks)}
                for future in as_completed(futures):
                    results[futures[future]] = future.result()
                    if bar is not None:
                        bar.update(len(chunks[futures[future]]))
    finally:
        if bar is not None:
            bar.close()
    report = ImageCheckReport(mode, len(unique), common_base(unique) if base is None else base)
    for chunk, outcomes in zip(chunks, results):
        for path, (status, reason) in zip(chunk, outcomes):
            if status == "missing":
                report.missing.append(path)
            elif status == "undecodable":
                report.undecodable.append((path, reason))
    report.seconds = time.perf_counter() - start
    return report
