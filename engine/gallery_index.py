"""The gallery index on disk: one folder, versioned, memory-mapped, built in resumable shards by any number of ranks.

    my_photos.index/
      manifest.json            format, format_version 3, model digest, dim, dtype, count, shards (name, count,
                               bytes, sha256), the paths files, skipped images, build time, the faiss index
      build.json               the build id and model digest every shard of this folder must carry
      shards/<name>.npy        features [n, D] (float32 or float16, L2-normalised) of one shard, memory-mapped
      shards/<name>.json       its paths, their size and mtime, its unreadable images, the sha256 of the .npy
      paths.txt, paths.npy     every path (UTF-8, one per line) and the byte offset of each line: path i is read
                               without loading ten million strings
      ann.faiss                optional: the faiss index (engine/gallery_search.py), row i = faiss id i

Opening reads the manifest and memory-maps the arrays (np.load(mmap_mode="r")): seconds and little RSS at 10M.
Every file is written atomically (utils.checkpoint.atomic_write) and a shard's .json is written after its .npy,
so a build killed at any moment leaves whole shards that the next run keeps. Row order: shards by their first
path, paths sorted inside a shard; a fresh build's shards are consecutive runs of the sorted list, whatever the
number of ranks, so one process and N processes write the same index. Version 2 (one ``.pt`` file with float32
features) still opens, in memory, with a line saying how to convert it (``python -m engine.gallery_index
convert OLD.pt NEW``).

    python -m engine.gallery_index info my_photos.index      # count, model, backend, bytes, when built
    python -m engine.gallery_index verify my_photos.index    # every file against its sha256
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import mmap
import os
import time
import uuid
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from utils import distributed as dist_utils
from utils.checkpoint import CheckpointError, DiskFullError, atomic_write, load_file, remove_orphan_temporaries
from utils.errors import UserError, user_errors_as_one_line

logger = logging.getLogger(__name__)

INDEX_FORMAT = "ivt-gallery-index"
INDEX_VERSION = 3  # 3: a folder of memory-mapped shards + manifest; 2: one .pt file with a sha256
LEGACY_VERSION = 2
MANIFEST = "manifest.json"
BUILD_FILE = "build.json"
SHARD_DIR = "shards"
PATHS_TEXT, PATHS_OFFSETS = "paths.txt", "paths.npy"
ANN_FILE = "ann.faiss"
HASH_BLOCK = 8 << 20


class GalleryError(UserError, ValueError):
    """A gallery that cannot be indexed or an index that cannot be used; the message says why."""


@dataclass(frozen=True)
class SearchSettings:
    """The ``search.*`` keys of configs/base.yaml (their comments say what each one does)."""

    backend: str = "auto"
    feature_dtype: str = "float32"
    shard_images: int = 4096
    exact_chunk_rows: int = 262144
    faiss_min_images: int = 10000
    faiss_factory: str = ""
    memory_budget_gib: float = 4.0
    scan_max_images: int = 20000000
    ivf_max_lists: int = 4096
    pq_bytes: int = 48
    train_sample_images: int = 200000
    nprobe: int = 64
    ef_search: int = 128
    rescore_candidates: int = 1000
    expand_top: int = 0
    expand_nprobe: int = 16
    verify_max_mib: int = 256
    seed: int = 0

    @classmethod
    def from_config(cls, cfg: Any) -> "SearchSettings":
        """From a Config (its ``search`` section); configs saved before the section existed get the defaults."""
        section = cfg.to_dict().get("search", {}) if hasattr(cfg, "to_dict") else dict(cfg)
        return cls(**{f.name: type(getattr(cls(), f.name))(section[f.name]) for f in fields(cls)
                      if f.name in section})


def sha256_file(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(HASH_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json(path: Path, obj: Any) -> None:
    data = json.dumps(obj, indent=1).encode("utf-8")
    atomic_write(path, lambda handle: handle.write(data), expected_bytes=len(data))


def read_json(path: Path, what: str) -> dict:
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise GalleryError(f"{path}: cannot be read as {what} ({type(exc).__name__}: {exc})") from None
    if not isinstance(obj, dict):
        raise GalleryError(f"{path}: not {what} (expected a JSON object)")
    return obj


def save_array(path: Path, array: np.ndarray) -> None:
    """An .npy written atomically (a full disk raises DiskFullError and leaves no partial file)."""
    atomic_write(path, lambda handle: np.save(handle, array, allow_pickle=False), expected_bytes=array.nbytes)


class PathList(Sequence[str]):
    """Paths read on demand from a text file (memory-mapped) and its line offsets, or held in a list."""

    def __init__(self, text: np.ndarray | list[str], offsets: np.ndarray | None = None):
        self._text, self._offsets = text, offsets

    def __len__(self) -> int:
        return len(self._text) if self._offsets is None else len(self._offsets) - 1

    def __getitem__(self, i):  # int -> str, slice -> list
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if self._offsets is None:
            return self._text[i]
        i = range(len(self))[i]
        return bytes(self._text[self._offsets[i]:self._offsets[i + 1] - 1]).decode("utf-8")

    def __iter__(self) -> Iterator[str]:
        """All paths in order, decoded in one pass (a million in about a second, not one slice at a time)."""
        if self._offsets is None:
            return iter(self._text)
        return iter(bytes(self._text).decode("utf-8").split("\n")[:len(self)])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and len(self) == len(other) and all(a == b for a, b in zip(self, other))

    def __repr__(self) -> str:
        return f"PathList({len(self)} paths)"


@dataclass
class Gallery:
    """An opened gallery: features [G, D] (L2-normalised) as memory-mapped shard arrays or one in-memory array,
    one path per row. ``folder`` is None for an in-memory gallery; ``ann`` the opened faiss index, if any."""

    paths: Sequence[str]
    arrays: list[np.ndarray]
    model_digest: str
    skipped: list[tuple[str, str]] = field(default_factory=list)
    manifest: dict = field(default_factory=dict)
    folder: Path | None = None
    signature: list[list[Any]] = field(default_factory=list)
    ann: Any = None

    def __post_init__(self) -> None:
        self.offsets = np.cumsum([0] + [len(a) for a in self.arrays])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def dim(self) -> int:
        return int(self.arrays[0].shape[1]) if self.arrays else 0

    @property
    def content_id(self) -> str:
        """Identifies the rows (the shards' checksums, in order): a faiss index covers exactly one content id."""
        return shards_content_id(self.manifest.get("shards", []))

    @property
    def features(self) -> torch.Tensor:
        """All features [G, D] as one float32 tensor in RAM (small galleries; search never needs it)."""
        if not self.arrays:
            return torch.zeros(0, 0)
        return torch.from_numpy(np.concatenate([np.asarray(a, dtype=np.float32) for a in self.arrays]))

    def rows(self, idx: np.ndarray) -> np.ndarray:
        """Features [len(idx), D] (stored dtype) of global rows ``idx``, read from the shards they live in."""
        idx = np.asarray(idx, dtype=np.int64)
        out = np.empty((len(idx), self.dim), dtype=self.arrays[0].dtype if self.arrays else np.float32)
        shard = np.searchsorted(self.offsets, idx, side="right") - 1
        for s in np.unique(shard):
            mine = shard == s
            local = idx[mine] - self.offsets[s]
            order = np.argsort(local)  # ascending reads: neighbouring rows come in one read
            picked = np.empty((len(local), self.dim), dtype=out.dtype)
            picked[order] = read_rows(self.arrays[s], local[order])
            out[mine] = picked
        return out

    def chunks(self, rows: int) -> Iterator[tuple[int, np.ndarray]]:
        """(first global row, array [<= rows, D]) over the gallery in order. A memory-mapped chunk is read ahead
        before it is used and let go of after (the page cache keeps it): a pass over 10M rows does not leave the
        whole store counted in the process's resident memory."""
        for base, array in zip(self.offsets, self.arrays):
            for start in range(0, len(array), rows):
                advise(array, start, start + rows, "MADV_WILLNEED")
                yield int(base + start), array[start:start + rows]
                advise(array, start, start + rows, "MADV_DONTNEED")

    @classmethod
    def in_memory(cls, paths: Sequence[str], features: torch.Tensor, model_digest: str,
                  signature: list[list[Any]] | None = None, skipped: Sequence[tuple[str, str]] = ()) -> "Gallery":
        array = features.detach().cpu().float().numpy()
        return cls(PathList(list(paths)), [array] if len(array) else [], model_digest, list(skipped),
                   {"backend": "exact", "count": len(array)}, None, list(signature or []))

    def bytes_on_disk(self) -> int:
        if self.folder is None:
            return 0
        return sum(p.stat().st_size for p in self.folder.rglob("*") if p.is_file())


# ------------------------------------------------------------------------------------------------ shards
@dataclass
class Shard:
    """One shard's metadata (its .json): rows ``paths`` with their [size, mtime_ns], unreadable ``skipped``."""

    name: str
    paths: list[str]
    stats: list[list[int]]
    skipped: list[list[Any]]  # [path, reason, size, mtime_ns]
    model_digest: str
    build_id: str
    dim: int
    dtype: str
    bytes: int
    sha256: str

    def to_dict(self) -> dict:
        return {"format": INDEX_FORMAT + "-shard", **{f.name: getattr(self, f.name) for f in fields(self)}}


def shard_name(model_digest: str, paths: Sequence[str]) -> str:
    """Deterministic: the same images with the same model make the same shard, on any rank."""
    return hashlib.sha256((model_digest + "\n" + "\n".join(paths)).encode("utf-8")).hexdigest()[:20]


def write_shard(folder: Path, shard: Shard, features: np.ndarray) -> Shard:
    """Write the features, then the metadata that makes the shard count (both atomically)."""
    array = np.ascontiguousarray(features, dtype=np.dtype(shard.dtype))
    npy = folder / SHARD_DIR / f"{shard.name}.npy"
    try:
        save_array(npy, array)
        shard.bytes, shard.sha256 = npy.stat().st_size, sha256_file(npy)
        write_json(npy.with_suffix(".json"), shard.to_dict())
    except DiskFullError as exc:
        kept = len(list((folder / SHARD_DIR).glob("*.json")))
        raise GalleryError(f"{exc}; the {kept} finished shard(s) in {folder / SHARD_DIR} are kept: free space and "
                           "run the same command again to encode only what is missing") from None
    return shard


def read_shard(meta_path: Path, model_digest: str, build_id: str, verify: bool = True) -> Shard | None:
    """The shard described by ``meta_path``; None (after a warning) when its features are missing, truncated or
    (``verify``) corrupt: they are encoded again; GalleryError when it belongs to another model or build."""
    obj = read_json(meta_path, "a gallery shard")
    if obj.get("format") != INDEX_FORMAT + "-shard":
        raise GalleryError(f"{meta_path}: not a gallery shard; move it out of {meta_path.parent}")
    if obj.get("model_digest") != model_digest:
        raise GalleryError(f"{meta_path}: a shard encoded by another model (digest {obj.get('model_digest')}, "
                           f"expected {model_digest}); features of two models never mix: use another index folder")
    if obj.get("build_id") != build_id:
        raise GalleryError(f"{meta_path}: a shard of another build ({obj.get('build_id')}, this index is "
                           f"{build_id}); move it out of {meta_path.parent}")
    shard = Shard(**{f.name: obj[f.name] for f in fields(Shard)})
    npy = meta_path.with_suffix(".npy")
    size = npy.stat().st_size if npy.is_file() else -1
    problem = None
    if size != shard.bytes:
        problem = f"features {'missing' if size < 0 else 'truncated'} ({max(size, 0)} bytes, expected {shard.bytes})"
    elif verify and sha256_file(npy) != shard.sha256:
        problem = "features do not match their sha256 (the file is corrupt)"
    if problem:
        logger.warning("%s: %s; its %d images are encoded again", npy, problem, len(shard.paths))
        meta_path.unlink()
        npy.unlink(missing_ok=True)
        return None
    return shard


def open_shard(folder: Path, name: str, count: int, dim: int) -> np.ndarray:
    path = folder / SHARD_DIR / f"{name}.npy"
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise GalleryError(f"{path}: missing or truncated shard ({type(exc).__name__}: {exc}); run the build "
                           "command again to re-encode it") from None
    if array.shape != (count, dim):
        raise GalleryError(f"{path}: shape {array.shape}, the manifest says {(count, dim)}")
    return array


def shards_content_id(shards: Sequence[dict]) -> str:
    """The content id (see Gallery.content_id) of these manifest shard entries, in order."""
    return hashlib.sha256("".join(s["sha256"] for s in shards).encode()).hexdigest()[:16]


def read_rows(array: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Rows [n, D] of ``array`` at ascending indices ``rows``. A memory-mapped shard is read with pread, one call per
    run of consecutive rows: re-scoring 1000 candidates scattered over a 15 GB store then costs ~2 ms and leaves
    nothing mapped, where indexing the map faults in the pages around every row (the kernel maps 64 KB at a time)
    and keeps them in this process's resident memory, and releasing them costs more than the reads."""
    path = getattr(array, "filename", None)
    if path is None or not hasattr(os, "preadv") or not len(rows):
        return np.asarray(array[rows])
    out = np.empty((len(rows), array.shape[1]), dtype=array.dtype)
    view = memoryview(out).cast("B")
    row_bytes = out.strides[0]
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    with open(path, "rb", buffering=0) as handle:
        for first, end in zip([0, *breaks.tolist()], [*breaks.tolist(), len(rows)]):
            wanted = (end - first) * row_bytes
            got = os.preadv(handle.fileno(), [view[first * row_bytes:end * row_bytes]],
                            array.offset + int(rows[first]) * row_bytes)
            if got != wanted:
                raise GalleryError(f"{path}: read {got} of {wanted} bytes at row {int(rows[first])}: the shard is "
                                   "shorter than its header says; run the build command again")
    return out


def advise(array: np.ndarray, first_row: int, end_row: int, option: str) -> None:
    """madvise rows [first_row, end_row) of a memory-mapped array (no-op for arrays in RAM or where the platform
    lacks ``option``)."""
    handle = getattr(array, "_mmap", None)
    if handle is None or not hasattr(mmap, option) or not hasattr(handle, "madvise"):
        return
    row_bytes = array.strides[0]
    lead = array.offset % mmap.ALLOCATIONGRANULARITY  # where row 0 sits in the mapping
    begin = lead + first_row * row_bytes
    end = min(len(handle), lead + min(end_row, len(array)) * row_bytes)
    aligned = begin - begin % mmap.PAGESIZE
    if end > aligned:
        handle.madvise(getattr(mmap, option), aligned, end - aligned)


# ----------------------------------------------------------------------------------------------- opening
def is_index(path: str | os.PathLike[str]) -> bool:
    """A version-3 index folder or a version-2 index file (what --gallery accepts besides an image folder)."""
    path = Path(path)
    return (path.is_dir() and (path / MANIFEST).is_file()) or path.is_file()


def open_gallery(path: str | os.PathLike[str], verify_max_mib: int = 256) -> Gallery:
    """Open an index folder (memory-mapped) or a version-2 ``.pt`` file; GalleryError (one line) when unusable.
    Indexes up to ``verify_max_mib`` have every file checked against its sha256, larger ones only their sizes."""
    path = Path(path)
    if path.is_file():
        return open_legacy(path)
    if not (path / MANIFEST).is_file():
        raise GalleryError(f"{path}: not a gallery index (no {MANIFEST}); build one with --index-file")
    manifest = read_json(path / MANIFEST, "a gallery index manifest")
    if manifest.get("format") != INDEX_FORMAT or manifest.get("format_version") != INDEX_VERSION:
        raise GalleryError(f"{path / MANIFEST}: format {manifest.get('format')!r} version "
                           f"{manifest.get('format_version')!r}, expected {INDEX_FORMAT!r} version {INDEX_VERSION}")
    dim = int(manifest["dim"])
    arrays = [open_shard(path, s["name"], s["count"], dim) for s in manifest["shards"]]
    for s, array in zip(manifest["shards"], arrays):
        size = (path / SHARD_DIR / f"{s['name']}.npy").stat().st_size
        if size != s["bytes"]:
            raise GalleryError(f"{path / SHARD_DIR / s['name']}.npy: {size} bytes, the manifest says {s['bytes']} "
                               "(truncated or replaced)")
    files = sum(s["bytes"] for s in manifest["shards"]) + (manifest.get("ann") or {}).get("bytes", 0)
    if files <= verify_max_mib * 2**20:
        verify_files(path, manifest)
    text = np.load(path / PATHS_OFFSETS, mmap_mode="r")
    blob = np.memmap(path / PATHS_TEXT, dtype=np.uint8, mode="r") if text[-1] else np.zeros(0, np.uint8)
    paths = PathList(blob, text)
    if len(paths) != manifest["count"] or sum(len(a) for a in arrays) != manifest["count"]:
        raise GalleryError(f"{path}: {len(paths)} paths and {sum(len(a) for a in arrays)} feature rows, the manifest "
                           f"says {manifest['count']}")
    return Gallery(paths, arrays, manifest["model_digest"], [tuple(s[:2]) for s in manifest.get("skipped", [])],
                   manifest, path)


def verify_files(folder: Path, manifest: dict) -> None:
    """Every shard and the paths file against the sha256 in the manifest; GalleryError naming the first bad one."""
    checks = [(folder / SHARD_DIR / f"{s['name']}.npy", s["sha256"]) for s in manifest["shards"]]
    checks += [(folder / PATHS_TEXT, manifest["paths_sha256"])]
    if manifest.get("ann"):
        checks.append((folder / manifest["ann"]["file"], manifest["ann"]["sha256"]))
    for file, expected in checks:
        if sha256_file(file) != expected:
            raise GalleryError(f"{file}: does not match its sha256 in {folder / MANIFEST} (the file is corrupt); "
                               "rebuild the index (delete the folder, run the build command again)")


def open_legacy(file: Path) -> Gallery:
    """A version-2 index file (everything in one torch file, float32), checked against its sha256, in memory."""
    try:
        obj = load_file(file)
    except CheckpointError as exc:  # a damaged, truncated or foreign file means the same thing here
        raise GalleryError(f"cannot be read as a gallery index: {exc}") from None
    if not isinstance(obj, dict) or obj.get("format") != INDEX_FORMAT:
        raise GalleryError(f"{file}: not a gallery index (expected format={INDEX_FORMAT!r})")
    if "sha256" not in obj:
        raise GalleryError(f"{file}: an index written before indexes carried a checksum; rebuild it by passing "
                           "the image folder with --index-file")
    if legacy_checksum(obj) != obj["sha256"]:
        raise GalleryError(f"{file}: the gallery index does not match its sha256 (the file is corrupt); "
                           "rebuild it by passing the image folder with --index-file")
    features = obj["features"]
    if features.dim() != 2 or features.shape[0] != len(obj["paths"]):
        raise GalleryError(f"{file}: features {tuple(features.shape)} do not match {len(obj['paths'])} paths")
    logger.info("%s is a version-%d index, read whole into memory; `python -m engine.gallery_index convert %s NEW` "
                "makes a memory-mapped version-%d folder", file, LEGACY_VERSION, file, INDEX_VERSION)
    return Gallery.in_memory(obj["paths"], features, obj["model_digest"], [list(s) for s in obj["signature"]],
                             [tuple(s) for s in obj["skipped"]])


def legacy_checksum(content: dict) -> str:
    """sha256 of a version-2 index: paths, features (bytes, dtype, shape), model digest, signature, skipped."""
    digest = hashlib.sha256()
    digest.update(json.dumps([content["paths"], content["model_digest"], [list(s) for s in content["signature"]],
                              [list(s) for s in content["skipped"]]]).encode("utf-8"))
    features = content["features"].detach().cpu().contiguous()
    digest.update(f"{features.dtype} {tuple(features.shape)}".encode("utf-8"))
    digest.update(features.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------- building
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


@dataclass
class BuildPlan:
    """What a build keeps and encodes: identical on every rank (rank 0 makes it, the others receive it)."""

    build_id: str
    kept: list[Shard]
    jobs: list[tuple[str, list[str], list[list[int]]]]  # (shard name, paths, [size, mtime_ns] per path)
    removed: int = 0

    @property
    def to_encode(self) -> int:
        return sum(len(job[1]) for job in self.jobs)


def build_identity(folder: Path, model_digest: str, dim_hint: int | None = None) -> str:
    """The folder's build id (created on the first build); GalleryError when another model built the folder."""
    file = folder / BUILD_FILE
    if file.is_file():
        obj = read_json(file, "a gallery build record")
        if obj.get("model_digest") != model_digest:
            raise GalleryError(f"{folder}: an index of another model (digest {obj.get('model_digest')}, this model "
                               f"is {model_digest}); features of two models never mix: choose another index folder "
                               "or delete this one to rebuild it")
        return str(obj["build_id"])
    if (folder / MANIFEST).is_file() or (folder.exists() and any(folder.iterdir())):
        raise GalleryError(f"{folder}: exists and is not a gallery index folder; choose another --index-file")
    build_id = uuid.uuid4().hex[:16]
    write_json(file, {"format": INDEX_FORMAT + "-build", "build_id": build_id, "model_digest": model_digest,
                      "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    return build_id


def existing_shards(folder: Path, model_digest: str, build_id: str) -> list[Shard]:
    """The whole shards in the folder (features without metadata are leftovers of a killed write: removed)."""
    shard_dir = folder / SHARD_DIR
    if not shard_dir.is_dir():
        return []
    remove_orphan_temporaries(shard_dir)
    shards = [s for s in (read_shard(m, model_digest, build_id) for m in sorted(shard_dir.glob("*.json")))
              if s is not None]
    named = {s.name for s in shards}
    for npy in shard_dir.glob("*.npy"):
        if npy.stem not in named:
            npy.unlink()
    return shards


def plan_build(folder: Path, signature: list[list[Any]], model_digest: str, shard_images: int) -> BuildPlan:
    """Keep every shard row whose file is unchanged (same size and mtime); encode the rest in new shards of
    ``shard_images`` consecutive paths (sorted). Rows of removed or changed files are dropped."""
    build_id = build_identity(folder, model_digest)
    current = {p: [size, mtime] for p, size, mtime in signature if size >= 0}
    covered: set[str] = set()
    kept, removed = [], 0
    for shard in sorted(existing_shards(folder, model_digest, build_id), key=lambda s: s.name):
        rows = [i for i, (p, st) in enumerate(zip(shard.paths, shard.stats)) if current.get(p) == st
                and p not in covered]
        skipped = [s for s in shard.skipped if current.get(s[0]) == list(s[2:]) and s[0] not in covered]
        removed += len(shard.paths) - len(rows)
        if len(rows) < len(shard.paths) or len(skipped) < len(shard.skipped):
            shard = rewrite_shard(folder, shard, rows, skipped)
        if shard is not None:
            kept.append(shard)
            covered.update(shard.paths)
            covered.update(s[0] for s in shard.skipped)
    todo = sorted(p for p in current if p not in covered)
    jobs = [(shard_name(model_digest, chunk), chunk, [current[p] for p in chunk])
            for chunk in (todo[i:i + shard_images] for i in range(0, len(todo), shard_images))]
    return BuildPlan(build_id, kept, jobs, removed)


def rewrite_shard(folder: Path, shard: Shard, rows: list[int], skipped: list[list[Any]]) -> Shard | None:
    """The shard without the rows of removed or changed files (a new shard; the old one goes after)."""
    old = folder / SHARD_DIR / f"{shard.name}.npy"
    paths = [shard.paths[i] for i in rows]
    new = None
    if paths or skipped:
        features = np.load(old, mmap_mode="r")[rows]
        name = shard_name(shard.model_digest, paths + [s[0] for s in skipped])
        new = write_shard(folder, Shard(name, paths, [shard.stats[i] for i in rows], skipped, shard.model_digest,
                                        shard.build_id, shard.dim, shard.dtype, 0, ""), features)
    if new is None or new.name != shard.name:
        old.with_suffix(".json").unlink()
        old.unlink(missing_ok=True)
    return new


def encode_jobs(folder: Path, plan: BuildPlan, encode: Callable, model_digest: str, dtype: str,
                progress: Callable[[int], None] | None = None) -> int:
    """Encode this rank's jobs (job j belongs to rank j mod world size); returns the images it encoded."""
    rank, world = dist_utils.get_rank(), dist_utils.get_world_size()
    done = 0
    for number, (name, paths, stats) in enumerate(plan.jobs):
        if number % world != rank:
            continue
        features, kept, skipped = encode(paths)
        stat_of = dict(zip(paths, stats))
        feats = features.detach().cpu().float().numpy() if len(kept) else np.zeros((0, 0), np.float32)
        shard = Shard(name, list(kept), [stat_of[p] for p in kept],
                      [[p, why, *stat_of[p]] for p, why in skipped], model_digest, plan.build_id,
                      int(feats.shape[1]) if len(kept) else 0, dtype, 0, "")
        write_shard(folder, shard, feats)
        done += len(paths)
        if progress is not None:
            progress(len(paths))
    return done


def write_paths(folder: Path, paths: Sequence[str]) -> str:
    """paths.txt (one per line) and paths.npy (the offset of each line, and the end); the text's sha256."""
    for p in paths:
        if "\n" in p:
            raise GalleryError(f"{p!r}: a path with a line break cannot be indexed; rename the file")
    encoded = [p.encode("utf-8") + b"\n" for p in paths]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(e) for e in encoded], out=offsets[1:])
    blob = b"".join(encoded)
    atomic_write(folder / PATHS_TEXT, lambda handle: handle.write(blob), expected_bytes=len(blob))
    save_array(folder / PATHS_OFFSETS, offsets)
    return hashlib.sha256(blob).hexdigest()


def finalize(folder: Path, shards: list[Shard], model_digest: str, build_id: str, source: str) -> dict:
    """Write the paths files and the manifest over ``shards`` (ordered by their first path), keeping a faiss
    index entry (it is used only while it covers the same contents)."""
    shards = sorted((s for s in shards if s.paths or s.skipped), key=lambda s: (s.paths or [s.skipped[0][0]])[0])
    with_rows = [s for s in shards if s.paths]
    dims = {s.dim for s in with_rows}
    if len(dims) > 1:
        raise GalleryError(f"{folder}: shards of widths {sorted(dims)}; features of two models never mix")
    old = read_json(folder / MANIFEST, "a gallery index manifest") if (folder / MANIFEST).is_file() else {}
    paths = [p for s in with_rows for p in s.paths]
    manifest = {
        "format": INDEX_FORMAT, "format_version": INDEX_VERSION, "build_id": build_id, "model_digest": model_digest,
        "dim": dims.pop() if dims else 0, "dtype": with_rows[0].dtype if with_rows else "float32",
        "count": len(paths), "source": source, "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "shards": [{"name": s.name, "count": len(s.paths), "bytes": s.bytes, "sha256": s.sha256} for s in with_rows],
        "skipped": [s for shard in shards for s in shard.skipped],
        "paths_sha256": write_paths(folder, paths), "ann": old.get("ann")}
    write_json(folder / MANIFEST, manifest)
    return manifest


def write_manifest_update(folder: Path, update: dict) -> None:
    manifest = read_json(folder / MANIFEST, "a gallery index manifest")
    manifest.update(update)
    write_json(folder / MANIFEST, manifest)


def build_gallery(folder: str | os.PathLike[str], paths: Sequence[str], encode: Callable, model_digest: str,
                  dtype: str = "float32", shard_images: int = 4096, source: str = "",
                  progress: Callable[[int], None] | None = None) -> tuple[dict, int]:
    """Bring the index folder up to date with ``paths`` on every rank: keep unchanged shards, encode the missing
    images in shards split over the ranks, drop removed files, write the manifest (rank 0). ``encode(paths)``
    returns (features [n, D] normalised, kept paths, [(path, reason)] unreadable). Returns (the manifest, the
    number of images this rank encoded)."""
    folder = Path(folder)
    plan = None
    if dist_utils.is_main_process():
        folder.mkdir(parents=True, exist_ok=True)
        planned = file_signature(sorted(set(paths)))
        plan = plan_build(folder, planned, model_digest, shard_images)
        logger.info("gallery index %s: %d images kept, %d to encode in %d shard(s), %d removed or changed",
                    folder, sum(len(s.paths) for s in plan.kept), plan.to_encode, len(plan.jobs), plan.removed)
    plan = dist_utils.broadcast_object(plan)
    encoded = encode_jobs(folder, plan, encode, model_digest, dtype, progress)
    dist_utils.barrier()
    manifest = None
    if dist_utils.is_main_process():
        shards = plan.kept + [s for s in (read_shard(folder / SHARD_DIR / f"{name}.json", model_digest,
                                                     plan.build_id, False) for name, _, _ in plan.jobs)
                              if s is not None]
        manifest = finalize(folder, shards, model_digest, plan.build_id, source)
        report_changes(folder, [[p, *st] for job in plan.jobs for p, st in zip(job[1], job[2])])
    manifest = dist_utils.broadcast_object(manifest)
    return manifest, encoded


def report_changes(folder: Path, planned: list[list[Any]]) -> int:
    """Files that changed while they were being encoded (their rows carry the old size/mtime, so the next build
    encodes them again): one warning line; returns how many."""
    changed = [p for p, *before in planned if file_signature([p])[0][1:] != before]
    if changed:
        logger.warning("%d image(s) changed or disappeared while %s was being built (first: %s); run the same "
                       "command again to bring the index up to date", len(changed), folder, changed[0])
    return len(changed)


def write_features_index(folder: str | os.PathLike[str], parts: Iterator[tuple[list[str], np.ndarray]],
                         model_digest: str, dtype: str = "float32", source: str = "") -> dict:
    """An index folder straight from features (conversion, benchmarks): one shard per part of (paths, [n, D])."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    build_id = build_identity(folder, model_digest)
    shards = []
    for paths, features in parts:
        shards.append(write_shard(folder, Shard(shard_name(model_digest, paths), list(paths),
                                                [[-1, -1]] * len(paths), [], model_digest, build_id,
                                                int(features.shape[1]), dtype, 0, ""), features))
    return finalize(folder, shards, model_digest, build_id, source)


# -------------------------------------------------------------------------------------------- the command
def describe(path: str | os.PathLike[str]) -> dict:
    """What an index holds: count, model digest, backend, bytes on disk, when built (no checksum pass)."""
    gallery = open_gallery(path, verify_max_mib=0)
    ann = gallery.manifest.get("ann")
    return {"index": str(path), "format_version": gallery.manifest.get("format_version", LEGACY_VERSION),
            "count": len(gallery), "dim": gallery.dim, "dtype": str(gallery.arrays[0].dtype) if gallery.arrays
            else None, "model_digest": gallery.model_digest, "skipped": len(gallery.skipped),
            "shards": len(gallery.arrays), "backend": f"faiss {ann['factory']}" if ann else "exact",
            "ann_current": bool(ann) and ann.get("covers") == gallery.content_id,
            "bytes_on_disk": gallery.bytes_on_disk() or Path(path).stat().st_size,
            "built_at": gallery.manifest.get("built_at"), "source": gallery.manifest.get("source")}


def convert(old: str | os.PathLike[str], new: str | os.PathLike[str], dtype: str = "float32") -> dict:
    """A version-2 index file as a version-3 folder (same paths, features, model digest, skipped images)."""
    gallery = open_legacy(Path(old))
    array = gallery.arrays[0] if gallery.arrays else np.zeros((0, 0), np.float32)
    parts = iter([(list(gallery.paths), array)]) if len(array) else iter([])
    manifest = write_features_index(new, parts, gallery.model_digest, dtype, source=str(old))
    if gallery.skipped:
        write_manifest_update(Path(new), {"skipped": [list(s) + [-1, -1] for s in gallery.skipped]})
    return manifest


@user_errors_as_one_line()
def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="Inspect, verify or convert a gallery index.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="count, model, backend, bytes, when built").add_argument("index")
    sub.add_parser("verify", help="check every file against its sha256").add_argument("index")
    conv = sub.add_parser("convert", help="a version-2 .pt index as a version-3 folder")
    conv.add_argument("old")
    conv.add_argument("new")
    conv.add_argument("--dtype", default="float32", choices=("float32", "float16"))
    args = parser.parse_args(argv)
    if args.command == "convert":
        out = convert(args.old, args.new, args.dtype)
        print(f"converted {args.old} to {args.new}: {out['count']} images")
        return out
    if args.command == "verify":
        open_gallery(args.index, verify_max_mib=1 << 40)
        print(f"{args.index}: every file matches its sha256")
    out = describe(args.index)
    for key, value in out.items():
        print(f"{key:14s} {value}")
    return out


if __name__ == "__main__":
    main()
