"""Memory of the pretraining records: today's list of Record objects vs the RecordStore, with 2 loader workers.

    python -m bench.records_memory --generate 5000000 --annotation runs/records5m.json
    python -m bench.records_memory --annotation runs/records5m.json --out bench/results/records_memory_5m.json

Each layout runs in a fresh process: it loads the annotation file, then iterates one whole epoch through a
DataLoader with 2 forked workers and the pretraining sampler, each item reading its record's caption and image path
(what the training dataset reads before it opens the image; no images exist, the data structure alone is measured).
A thread samples the resident memory (RSS) of the process and of its workers, and their proportional share (PSS,
shared pages divided among the processes sharing them); the peaks are written with the machine's load.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import torch
from torch.utils.data import DataLoader, Dataset

from bench.base import machine_record, report
from datasets.readers import load_pretrain_corpora
from datasets.records import Record
from datasets.sampler import ShardedShuffleSampler
from utils.errors import user_errors_as_one_line

VOCABULARY = 20000
MIN_AVAILABLE_GIB = 3.0  # the shared machine keeps this much free: a layout that would take it stops and says so


def _vocabulary(rng: random.Random) -> tuple[list[str], list[float]]:
    """Pseudo-words of 1-4 syllables and their cumulative Zipf weights (rank r: 1/r), as words of real captions
    are drawn; a small fixed vocabulary would compress far better than real text."""
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"] + ["the", "and", "in", "a", "of"]
    words = sorted({"".join(rng.choices(syllables, k=rng.randint(1, 4))) for _ in range(VOCABULARY * 2)})
    rng.shuffle(words)
    words = words[:VOCABULARY]
    return words, list(itertools.accumulate(1.0 / rank for rank in range(1, len(words) + 1)))


def generate(path: Path, records: int, seed: int = 0) -> None:
    """A corpus of ``records`` captions, two per image, 20-40 words each (the person corpora's caption length)."""
    rng = random.Random(seed)
    words, cumulative = _vocabulary(rng)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("[")
        for index in range(records):
            caption = " ".join(rng.choices(words, cum_weights=cumulative, k=rng.randint(20, 40)))
            entry = {"image": f"gene_crop/c_g_a_{index // 40000}/{index // 2}.jpg", "caption": caption}
            handle.write(("," if index else "") + json.dumps(entry))
        handle.write("]")


def legacy_records(annotation: str, image_root: str) -> list[Record]:
    """The records as the reader built them before the store: the parsed file, then one Record per caption."""
    with open(annotation, encoding="utf-8") as handle:
        data = json.load(handle)
    records: list[Record] = []
    for item in data:
        records.append(Record(os.path.join(image_root, item["image"]), item["caption"].strip(), len(records),
                              len(records)))
    return records


class _TextOnly(Dataset):
    """What TrainDataset reads of a record before it opens the image."""

    def __init__(self, records):
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> int:
        record = self.records[index]
        return len(record.caption) + len(record.image_path) + record.pid


class _Peaks(threading.Thread):
    def __init__(self, every_s: float = 0.5):
        super().__init__(daemon=True)
        self.every_s, self.done = every_s, threading.Event()
        self.rss: dict[str, int] = {}
        self.pss: dict[str, int] = {}
        self.uss: dict[str, int] = {}
        self.low_memory = False

    def sample(self) -> None:
        me = psutil.Process()
        for name, process in [("main", me)] + [(f"worker{i}", c) for i, c in enumerate(me.children())]:
            try:
                info = process.memory_full_info()
            except psutil.Error:
                continue
            self.rss[name] = max(self.rss.get(name, 0), info.rss)
            self.pss[name] = max(self.pss.get(name, 0), info.pss)
            self.uss[name] = max(self.uss.get(name, 0), info.uss)
        if psutil.virtual_memory().available < MIN_AVAILABLE_GIB * 2**30:
            self.low_memory = True

    def run(self) -> None:
        while not self.done.is_set():
            self.sample()
            time.sleep(self.every_s)


def measure(layout: str, annotation: str, batch: int, workers: int) -> dict:
    before_load = psutil.Process().memory_info().rss  # the interpreter, torch and the readers, no records yet
    peaks = _Peaks()
    peaks.start()
    start = time.perf_counter()
    if layout == "list":
        records = legacy_records(annotation, "images")
    else:
        records = load_pretrain_corpora([{"annotation": annotation, "image_root": "images"}])
    load_s = time.perf_counter() - start
    peaks.sample()
    after_load = dict(peaks.rss)
    loader = DataLoader(_TextOnly(records), batch_size=batch, num_workers=workers, drop_last=True,
                        sampler=ShardedShuffleSampler(len(records), batch, seed=0))
    start = time.perf_counter()
    total = batches = 0
    for batch_values in loader:
        total += int(batch_values.sum())
        batches += 1
        if peaks.low_memory:
            break
    epoch_s = time.perf_counter() - start
    peaks.done.set()
    peaks.join()
    mib = 2**20
    return {"layout": layout, "records": len(records), "load_s": round(load_s, 1), "epoch_s": round(epoch_s, 1),
            "checksum": total, "batches": batches, "batches_in_epoch": len(loader),
            "stopped_for_memory": peaks.low_memory, "rss_before_load_mib": round(before_load / mib),
            "rss_after_load_mib": {k: round(v / mib) for k, v in after_load.items()},
            "peak_rss_mib": {k: round(v / mib) for k, v in peaks.rss.items()},
            "peak_pss_mib": {k: round(v / mib) for k, v in peaks.pss.items()},
            "peak_uss_mib": {k: round(v / mib) for k, v in peaks.uss.items()},
            "store_array_mib": round(records.nbytes() / mib) if layout == "store" else None}


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--annotation", required=True)
    parser.add_argument("--generate", type=int, default=0, help="write a corpus of this many records and stop")
    parser.add_argument("--layout", choices=("list", "store"), help="measure one layout in this process")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--layouts", nargs="+", choices=("list", "store"), default=["list", "store"],
                        help="the layouts to measure, each in a fresh process")
    parser.add_argument("--out", help="JSON results file")
    args = parser.parse_args(argv)
    with user_errors_as_one_line():
        torch.set_num_threads(1)
        if args.generate:
            generate(Path(args.annotation), args.generate)
            return None
        if args.layout:
            result = measure(args.layout, args.annotation, args.batch, args.workers)
            print(json.dumps(result))
            return result
        results = []
        for layout in args.layouts:
            command = [sys.executable, "-m", "bench.records_memory", "--annotation", args.annotation,
                       "--layout", layout, "--batch", str(args.batch), "--workers", str(args.workers)]
            load = os.getloadavg()
            line = subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            results.append({**json.loads(line), "load_avg_1_5_15_before": [round(x, 2) for x in load],
                            "load_avg_1_5_15_after": [round(x, 2) for x in os.getloadavg()]})
        result = {"command": "python -m bench.records_memory " + " ".join(argv if argv is not None else sys.argv[1:]),
                  "annotation_bytes": os.path.getsize(args.annotation), "machine": "2 CPU cores, no GPU, shared",
                  "threads": 1, "environment": machine_record(), "results": results}
        return report(result, args.out)


if __name__ == "__main__":
    main()
