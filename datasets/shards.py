"""Pretraining corpora as webdataset tar shards: writing them, and streaming them to training across ranks and workers.

    python -m datasets.shards --corpora data/pretrain/corpora.json --out data/shards/mals --samples-per-shard 2000
    python -m datasets.shards --root data/synthetic-pretrain --out data/shards/demo --resize 64 32

Writing: every (image, caption) record of the common format becomes one sample ``<key>.<image ext>`` +
``<key>.json`` (``{"caption", "identity", "index"}``), ``--samples-per-shard`` samples per ``shard-NNNNNN.tar``;
images go in as stored, or resized to ``--resize H W`` and re-encoded as JPEG. ``manifest.json`` (written last, so a
folder without it is an unfinished write) lists every shard with its sample count, size and sha256, and
``records.json`` repeats the captions in the common format (what a learnt tokenizer is trained on). Records whose
image is missing or whose caption is empty are skipped and counted in the manifest.

Reading (``data.pretrain_shards: <folder>/manifest.json``): each epoch the shard list is permuted from (seed,
epoch), split by node and then by DataLoader worker (webdataset's ``split_by_node`` / ``split_by_worker``: global
worker ``rank * workers + worker`` takes every ``ranks * workers``-th shard), samples pass a shuffle buffer seeded
from (seed, epoch, rank, worker), and each worker yields whole batches. ``data.shards_epoch_samples: 0`` gives
exactly-once epochs: every sample is read once per epoch over all ranks and workers; each rank trains the same
number of steps (the smallest rank's full batches), and the samples left outside them are logged per epoch. N > 0
gives resampled epochs of about N samples (each worker draws shards with replacement until its share is full).

Everything a worker yields is a function of (seed, epoch, rank, worker, manifest), so resuming at step k of an
epoch replays each worker's stream without decoding and skips exactly the batches it had delivered: no sample is
lost or repeated (with the same ranks and workers; otherwise the epoch restarts and the log says how many samples
are seen twice). A truncated tar or a shard whose sample count differs from the manifest stops the run with one
line naming the shard; a corrupt image is skipped and counted like a bad loose file, and its batch is filled from
the next samples (padded with the worker's last good sample at the very end, counted too).
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import random
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from datasets.record_store import iter_json_list
from datasets.records import DataFormatError
from datasets.transforms import load_image
from utils.checkpoint import atomic_write
from utils.errors import UserError, user_errors_as_one_line

logger = logging.getLogger(__name__)

MANIFEST_FORMAT = "ivt-pretrain-shards"
MANIFEST_VERSION = 1
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp")


class ShardError(UserError, ValueError):
    """A shard or manifest that does not match what was written (truncated, miscounted, another corpus)."""


# ------------------------------------------------------------------------------------------------ writing
@dataclass
class _ShardBuffer:
    out: Path
    samples_per_shard: int
    shards: list[dict] = field(default_factory=list)
    members: list[tuple[str, bytes]] = field(default_factory=list)
    count: int = 0
    corpus_hash: Any = field(default_factory=hashlib.sha256)

    def add(self, key: str, ext: str, image: bytes, meta: dict) -> None:
        text = json.dumps(meta, sort_keys=True).encode("utf-8")
        self.corpus_hash.update(text)
        self.members += [(f"{key}.{ext}", image), (f"{key}.json", text)]
        self.count += 1
        if self.count == self.samples_per_shard:
            self.flush()

    def flush(self) -> None:
        if not self.count:
            return
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for name, data in self.members:
                info = tarfile.TarInfo(name)
                info.size, info.mode, info.mtime = len(data), 0o444, 0  # reproducible bytes
                tar.addfile(info, io.BytesIO(data))
        data = buffer.getvalue()
        name = f"shard-{len(self.shards):06d}.tar"
        atomic_write(self.out / name, lambda handle: handle.write(data), expected_bytes=len(data))
        self.shards.append({"name": name, "samples": self.count, "bytes": len(data),
                            "sha256": hashlib.sha256(data).hexdigest()})
        self.members, self.count = [], 0


def _image_bytes(path: str, resize: tuple[int, int] | None) -> tuple[bytes, str]:
    """(bytes, extension) of the image at ``path``: as stored, or resized to (height, width) as JPEG."""
    if resize is None:
        ext = Path(path).suffix.lower().lstrip(".") or "jpg"
        if ext not in IMAGE_EXTENSIONS:
            raise OSError(f"{path}: not an image extension ({', '.join(IMAGE_EXTENSIONS)})")
        return Path(path).read_bytes(), ext
    image = load_image(path).resize((resize[1], resize[0]), Image.BICUBIC)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=95)
    return out.getvalue(), "jpg"


def _corpus_samples(corpora: Sequence[dict]) -> Iterator[tuple[str, str, str]]:
    """(image path, caption, identity) of every caption of ``corpora`` (common format), empty ones included."""
    for entry in corpora:
        annotation, root = entry["annotation"], entry["image_root"]
        for index, item in enumerate(iter_json_list(annotation, "a JSON list of {image, caption} objects")):
            if not isinstance(item, dict) or not isinstance(item.get("image"), str):
                raise DataFormatError(annotation, "an object with an 'image' string", index=index, field="image")
            captions = item.get("caption")
            captions = [captions] if isinstance(captions, str) else captions
            if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
                raise DataFormatError(annotation, "a caption string or a list of them", index=index, field="caption")
            image = item["image"] if os.path.isabs(item["image"]) else os.path.join(root, item["image"])
            for caption in captions:
                yield image, caption, str(item.get("identity", item["image"]))


def _write_samples(corpora: Sequence[dict], buffer: _ShardBuffer, records: Any, skipped: Counter,
                   resize: tuple[int, int] | None) -> int:
    """Every usable caption of ``corpora`` into ``buffer`` (and its entry into the ``records`` file); returns
    the count, and counts what it skips in ``skipped``."""
    count = 0
    last: tuple[str, tuple[bytes, str] | None] = ("", None)
    for image, caption, identity in _corpus_samples(corpora):
        if not caption.strip():
            skipped["empty_caption"] += 1
            continue
        if last[0] != image:  # an image's captions are adjacent: read it once
            try:
                last = (image, _image_bytes(image, resize))
            except OSError as exc:
                last = (image, None)
                logger.warning("skipped %s: %s", image, exc)
        if last[1] is None:
            skipped["missing_or_unreadable_image"] += 1
            continue
        key = f"{count:09d}"
        buffer.add(key, last[1][1], last[1][0], {"caption": caption.strip(), "identity": identity, "index": count})
        records.write(("," if count else "") + json.dumps({"image": key, "caption": caption.strip(),
                                                           "identity": identity}))
        count += 1
    return count


def write_shards(corpora: Sequence[dict], out: str | os.PathLike[str], samples_per_shard: int,
                 resize: tuple[int, int] | None = None) -> dict:
    """Write ``corpora`` (entries ``{"annotation", "image_root"}``) as shards in ``out``; returns the manifest."""
    if samples_per_shard < 1:
        raise ValueError(f"--samples-per-shard must be >= 1, got {samples_per_shard}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").unlink(missing_ok=True)  # the folder is unfinished until the new manifest exists
    buffer = _ShardBuffer(out, samples_per_shard)
    skipped: Counter = Counter()
    partial = out / "records.json.partial"  # the captions, streamed: 5M of them never sit in memory at once
    with open(partial, "w", encoding="utf-8") as records:
        records.write("[")
        count = _write_samples(corpora, buffer, records, skipped, resize)
        records.write("]")
        records.flush()
        os.fsync(records.fileno())
    buffer.flush()
    if not count:
        partial.unlink()
        raise DataFormatError(str(out), "at least one record with a caption and an image", got="none")
    os.replace(partial, out / "records.json")
    manifest = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "samples": count,
                "corpus_sha256": buffer.corpus_hash.hexdigest(), "samples_per_shard": samples_per_shard,
                "resize": list(resize) if resize else None, "skipped": dict(skipped),
                "sources": [str(c["annotation"]) for c in corpora], "shards": buffer.shards}
    atomic_write(out / "manifest.json", lambda handle: handle.write(json.dumps(manifest, indent=1).encode("utf-8")))
    return manifest


# ------------------------------------------------------------------------------------------------ reading
@dataclass(frozen=True)
class ShardManifest:
    path: Path
    samples: int
    corpus_sha256: str
    shards: tuple[dict, ...]

    @property
    def folder(self) -> Path:
        return self.path.parent

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "ShardManifest":
        path = Path(path)
        if not path.is_file():
            raise ShardError(f"{path}: no shard manifest there (write the shards with python -m datasets.shards; "
                             "a folder without manifest.json is an unfinished write)")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ShardError(f"{path}: not a valid manifest ({exc})") from None
        if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
            raise ShardError(f"{path}: expected a manifest of format '{MANIFEST_FORMAT}'")
        shards = tuple(data.get("shards") or ())
        if not shards or sum(s["samples"] for s in shards) != data.get("samples"):
            raise ShardError(f"{path}: the shard sample counts do not add up to 'samples' ({data.get('samples')})")
        return cls(path, int(data["samples"]), str(data["corpus_sha256"]), shards)

    def verify_files(self) -> None:
        """Every shard exists with the size the manifest gives (the sha256 is checked by ``verify_checksums``)."""
        for shard in self.shards:
            target = self.folder / shard["name"]
            if not target.is_file() or target.stat().st_size != shard["bytes"]:
                got = target.stat().st_size if target.is_file() else "no file"
                raise ShardError(f"{target}: expected {shard['bytes']} bytes as the manifest says, got {got} "
                                 "(a truncated or replaced shard: write the shards again)")

    def verify_checksums(self) -> list[str]:
        """Names of the shards whose sha256 differs from the manifest's."""
        return [s["name"] for s in self.shards
                if hashlib.sha256((self.folder / s["name"]).read_bytes()).hexdigest() != s["sha256"]]


def read_shard(path: Path, expected: int) -> Iterator[dict]:
    """The samples of one tar (``__key__`` plus one entry per member suffix), through webdataset's tar reader;
    a truncated tar or a sample count other than ``expected`` raises ShardError naming the shard."""
    from webdataset.tariterators import group_by_keys, tar_file_expander
    count = 0
    try:
        with open(path, "rb") as handle:
            for sample in group_by_keys(tar_file_expander([{"url": str(path), "stream": handle}])):
                count += 1
                yield sample
    except (tarfile.TarError, EOFError, ValueError, OSError) as exc:
        raise ShardError(f"{path}: unreadable after {count} samples ({exc}); the manifest says {expected}: "
                         "the shard is truncated or corrupt, write the shards again") from None
    if count != expected:
        raise ShardError(f"{path}: {count} samples but the manifest says {expected}: write the shards again")


def worker_shards(manifest: ShardManifest, seed: int, epoch: int, rank: int, world_size: int, worker: int,
                  workers: int, epoch_samples: int) -> list[int]:
    """Indices of the shards worker ``worker`` of rank ``rank`` reads in ``epoch``, in order."""
    n = len(manifest.shards)
    if epoch_samples > 0:  # resampled: draw shards with replacement until this worker's share is covered
        rng = np.random.default_rng(np.random.SeedSequence([seed, epoch, rank, worker, 1]))
        share, picked, total = epoch_samples // (world_size * workers), [], 0
        while total < share:
            picked.append(int(rng.integers(n)))
            total += manifest.shards[picked[-1]]["samples"]
        return picked
    order = np.random.default_rng(np.random.SeedSequence([seed, epoch])).permutation(n).tolist()
    return order[rank::world_size][worker::workers]


def _split(shards: list[int], rank: int, world_size: int, worker: int, workers: int) -> list[int]:
    """The same split through webdataset's own functions (their rank and worker must agree with ours)."""
    from webdataset.shardlists import split_by_node, split_by_worker
    from webdataset.utils import pytorch_worker_info
    seen = pytorch_worker_info()
    if seen != (rank, world_size, worker, workers):
        ours = (rank, world_size, worker, workers)
        raise ShardError(f"webdataset sees rank/world/worker/workers {seen}, the loader {ours}: set RANK and "
                         "WORLD_SIZE as torchrun does")
    return list(split_by_worker(split_by_node(shards)))


def _shuffled(samples: Iterator[dict], size: int, rng: random.Random) -> Iterator[dict]:
    """A shuffle buffer of ``size`` samples (1: no shuffling); the order is a function of ``rng``'s seed."""
    buffer: list[dict] = []
    for sample in samples:
        buffer.append(sample)
        if len(buffer) >= size:
            at = rng.randrange(len(buffer))
            buffer[at], buffer[-1] = buffer[-1], buffer[at]
            yield buffer.pop()
    rng.shuffle(buffer)
    yield from buffer


def delivered_batches(counts: Sequence[int], consumed: int) -> list[int]:
    """Batches of each worker among the first ``consumed`` a DataLoader delivered: it takes them round-robin from
    the workers in order, leaving out a worker once it has no more."""
    done = [0] * len(counts)
    worker = 0
    for _ in range(min(consumed, sum(counts))):
        while done[worker] >= counts[worker]:
            worker = (worker + 1) % len(counts)
        done[worker] += 1
        worker = (worker + 1) % len(counts)
    return done


def decode_sample(sample: dict) -> tuple[Any, str, int]:
    """(RGB image, caption, index) of a shard sample; OSError for a missing or undecodable image or caption."""
    key = sample.get("__key__", "?")
    image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in sample), None)
    if image_ext is None or "json" not in sample:
        raise OSError(f"sample {key}: no {'image' if image_ext is None else 'json'} member")
    try:
        meta = json.loads(sample["json"])
        caption, index = meta["caption"], int(meta["index"])
    except (ValueError, KeyError, TypeError) as exc:
        raise OSError(f"sample {key}: unreadable json member ({exc})") from None
    if not isinstance(caption, str) or not caption.strip():
        raise OSError(f"sample {key}: empty caption")
    return load_image(io.BytesIO(sample[image_ext])), caption, index


@dataclass
class StreamSettings:
    batch_size: int
    seed: int
    rank: int = 0
    world_size: int = 1
    workers: int = 1  # DataLoader workers per rank (0 counts as 1: the main process reads)
    shuffle_buffer: int = 1000
    epoch_samples: int = 0  # 0: exactly-once epochs; N: resampled epochs of about N samples
    max_bad_images: int = 10


class ShardStream(IterableDataset):
    """The training stream of one rank: whole batches of items (``make_item(image, caption, index, epoch)``)."""

    def __init__(self, manifest: ShardManifest, settings: StreamSettings,
                 make_item: Callable[[Any, str, int, int], dict]):
        self.manifest, self.settings, self.make_item = manifest, settings, make_item
        self.epoch = 0
        self.start_batch = 0
        self.restart_epoch = False  # resumed with other ranks/workers: replay impossible, start the stream over
        self.bad_images: dict[str, str] = {}

    # epoch bookkeeping (the sampler interface of datasets.build)
    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def set_start_batch(self, n: int) -> None:
        self.start_batch = n

    def worker_samples(self, rank: int, worker: int) -> int:
        s = self.settings
        shards = worker_shards(self.manifest, s.seed, self.epoch, rank, s.world_size, worker, s.workers,
                               s.epoch_samples)
        return sum(self.manifest.shards[i]["samples"] for i in shards)

    def worker_batches(self, rank: int) -> list[int]:
        return [self.worker_samples(rank, w) // self.settings.batch_size for w in range(self.settings.workers)]

    def num_batches(self) -> int:
        """Steps every rank trains this epoch: the smallest rank's full batches."""
        return min(sum(self.worker_batches(rank)) for rank in range(self.settings.world_size))

    def __len__(self) -> int:
        return self.num_batches()

    def epoch_report(self) -> str:
        s = self.settings
        steps = self.num_batches()
        read = sum(self.worker_samples(r, w) for r in range(s.world_size) for w in range(s.workers))
        untrained = read - steps * s.batch_size * s.world_size
        return (f"shards epoch {self.epoch}: {read} samples read over {s.world_size} rank(s) x {s.workers} "
                f"worker(s), {steps} steps of {s.batch_size} per rank; {untrained} sample(s) fall outside those "
                f"steps this epoch (partial batches of a worker, ranks holding more full batches than the smallest)")

    # resume
    def position_record(self) -> dict:
        s = self.settings
        return {"corpus_sha256": self.manifest.corpus_sha256, "world_size": s.world_size, "workers": s.workers}

    def check_resume(self, record: dict | None) -> None:
        """Refuse another corpus's checkpoint; with other ranks/workers the interrupted epoch starts over."""
        if not record:
            return
        if record.get("corpus_sha256") != self.manifest.corpus_sha256:
            raise ShardError(f"{self.manifest.path}: the run being resumed trained on shards of another corpus "
                             f"(corpus_sha256 {str(record.get('corpus_sha256'))[:12]} in the checkpoint, "
                             f"{self.manifest.corpus_sha256[:12]} here): point data.pretrain_shards at its manifest")
        s = self.settings
        self.restart_epoch = (record.get("world_size"), record.get("workers")) != (s.world_size, s.workers)

    # the stream
    def __iter__(self) -> Iterator[list[dict]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        s = self.settings
        if workers != s.workers:
            raise ShardError(f"the shard stream was planned for {s.workers} worker(s) per rank, the loader has "
                             f"{workers}")
        counts = self.worker_batches(s.rank)
        skip = [0] * len(counts) if self.restart_epoch else delivered_batches(counts, self.start_batch)
        yield from self._batches(worker, counts[worker], skip[worker])

    def _shards(self, worker: int) -> list[int]:
        s = self.settings
        if s.epoch_samples > 0:
            return worker_shards(self.manifest, s.seed, self.epoch, s.rank, s.world_size, worker, s.workers,
                                 s.epoch_samples)
        order = np.random.default_rng(np.random.SeedSequence([s.seed, self.epoch])).permutation(
            len(self.manifest.shards)).tolist()
        return _split(order, s.rank, s.world_size, worker, s.workers)

    def _batches(self, worker: int, count: int, skip: int) -> Iterator[list[dict]]:
        """This worker's ``count`` batches of the epoch, the first ``skip`` read but not decoded (a resume)."""
        s = self.settings
        shards = [self.manifest.shards[i] for i in self._shards(worker)]
        samples = (sample for shard in shards for sample in read_shard(self.manifest.folder / shard["name"],
                                                                          shard["samples"]))
        seed = int(np.random.SeedSequence([s.seed, self.epoch, s.rank, worker, 2]).generate_state(1)[0])
        stream = _shuffled(samples, s.shuffle_buffer, random.Random(seed))
        for number in range(count):
            batch = [sample for _, sample in zip(range(s.batch_size), stream)]
            if number >= skip:
                yield self._items(batch)

    def _items(self, batch: list[dict]) -> list[dict]:
        """Decoded items; a sample that cannot be decoded is replaced by another of the same batch (counted), so
        that batch b of a worker is always samples [b*B, (b+1)*B) of its stream, which a resume relies on."""
        decoded: list[tuple[Any, str, int] | None] = []
        for sample in batch:
            try:
                decoded.append(decode_sample(sample))
            except OSError as exc:
                decoded.append(None)
                self._mark_bad(str(sample.get("__key__")), exc)
        good = [d for d in decoded if d is not None]
        if not good:
            raise ShardError(f"no sample of a batch of {len(batch)} could be decoded (keys "
                             f"{batch[0].get('__key__')}..{batch[-1].get('__key__')}): the shards are damaged")
        items = []
        for position, entry in enumerate(decoded):
            image, caption, index = entry if entry is not None else good[position % len(good)]
            items.append(self.make_item(image, caption, index, self.epoch))
        return items

    def _mark_bad(self, key: str, exc: OSError) -> None:
        from datasets.records import MissingImagesError
        self.bad_images[key] = str(exc)
        logger.warning("shard sample %s skipped (%s); replaced by another sample of its batch; %d bad sample(s) "
                       "in this worker so far, limit %d", key, exc, len(self.bad_images), self.settings.max_bad_images)
        if len(self.bad_images) > self.settings.max_bad_images:
            raise MissingImagesError(f"{len(self.bad_images)} shard samples could not be decoded in this worker, more "
                                     f"than the limit of {self.settings.max_bad_images} (data.max_bad_images); last: "
                                     f"{exc}")


# ------------------------------------------------------------------------------------------------ command line
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--corpora", help="corpora list (JSON: [{annotation, image_root}], as prepare_pretrain writes)")
    source.add_argument("--root", help="a folder holding pretrain.json (the synthetic corpus's layout)")
    parser.add_argument("--out", required=True, help="folder for the shards, manifest.json and records.json")
    parser.add_argument("--samples-per-shard", type=int, default=2000)
    parser.add_argument("--resize", type=int, nargs=2, metavar=("H", "W"), help="resize images (JPEG) to H x W")
    parser.add_argument("--verify", action="store_true", help="check an existing manifest's shards (sha256)")
    args = parser.parse_args(argv)
    if not (args.verify or args.corpora or args.root):
        parser.error("give --corpora or --root (or --verify to check the shards in --out)")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    with user_errors_as_one_line():
        if args.verify:
            manifest = ShardManifest.load(Path(args.out) / "manifest.json")
            manifest.verify_files()
            bad = manifest.verify_checksums()
            if bad:
                raise ShardError(f"{manifest.folder}: {len(bad)} shard(s) differ from their sha256: {', '.join(bad[:5])}")
            print(f"{manifest.folder}: {len(manifest.shards)} shards, {manifest.samples} samples, checksums match")
            return {"shards": len(manifest.shards), "samples": manifest.samples}
        if args.corpora:
            corpora = json.loads(Path(args.corpora).read_text(encoding="utf-8"))
        else:
            corpora = [{"annotation": str(Path(args.root) / "pretrain.json"), "image_root": args.root}]
        result = write_shards(corpora, args.out, args.samples_per_shard, tuple(args.resize) if args.resize else None)
    print(f"{args.out}: {len(result['shards'])} shards, {result['samples']} samples, skipped {result['skipped']}; "
          f"train on them with data.pretrain_shards={Path(args.out) / 'manifest.json'}")
    return result


if __name__ == "__main__":
    main()
