"""Evaluation speed and memory: ranking + R@k/mAP/mINP on random features with each test set's shape.

    python -m bench.bench_eval [--device cpu|cuda] [--sizes cuhk,icfg,rstp] [--repeats 3]
                               [--chunk-size N | --sweep 128,256,...]

Features are random, L2-normalised, 768-d, with the test sets' pid structure (queries = captions, gallery =
unique images, a match = same pid). Without --chunk-size the chunk sizes in --sweep are timed on the first
dataset; the smallest within 10% of the fastest is used for every row (printed as the device's default).
Peak memory is torch.cuda.max_memory_allocated on GPU, and on CPU the increase of the process's peak RSS
(VmHWM, reset through /proc/self/clear_refs) during the measured calls, above the features already held.
"""
from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.base import machine_line, machine_record
from utils.errors import user_errors_as_one_line
from utils.metrics import default_chunk_size, format_metrics_table, retrieval_metrics


@dataclass(frozen=True)
class Shape:
    name: str
    num_ids: int
    num_images: int  # spread over the ids as evenly as possible (image i has pid i % num_ids)
    captions_per_image: int
    extra_captions: int = 0  # CUHK-PEDES test has 6156 captions for 3074 images: 8 images carry a third one


SHAPES = {
    "cuhk": Shape("CUHK-PEDES", num_ids=1000, num_images=3074, captions_per_image=2, extra_captions=8),
    "icfg": Shape("ICFG-PEDES", num_ids=1000, num_images=19848, captions_per_image=1),
    "rstp": Shape("RSTPReid", num_ids=200, num_images=1000, captions_per_image=2),
}


def make_features(shape: Shape, dim: int, device: torch.device, seed: int = 0):
    """Returns query feats [Q, dim], gallery feats [G, dim] (unit norm), query pids [Q], gallery pids [G]."""
    g = torch.Generator().manual_seed(seed)
    num_images = shape.num_images
    gallery_pids = torch.arange(num_images) % shape.num_ids
    image_of_query = torch.arange(num_images).repeat_interleave(shape.captions_per_image)
    image_of_query = torch.cat([image_of_query, torch.randint(0, num_images, (shape.extra_captions,), generator=g)])
    query_pids = gallery_pids[image_of_query]
    # identity centre + image noise; a caption shares a little of its image's noise and adds its own.
    # The scales put R@1 near 50-60% and mAP near 30% on CUHK's shape, like a real model.
    centres = torch.randn(shape.num_ids, dim, generator=g)
    image_noise = torch.randn(num_images, dim, generator=g)
    images = centres[gallery_pids] + 3.0 * image_noise
    queries = (
        centres[query_pids]
        + 0.45 * image_noise[image_of_query]
        + 5.5 * torch.randn(len(image_of_query), dim, generator=g)
    )
    normalise = torch.nn.functional.normalize
    return (
        normalise(queries, dim=1).to(device),
        normalise(images, dim=1).to(device),
        query_pids.to(device),
        gallery_pids.to(device),
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_bytes(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _release_freed_cpu_memory() -> None:
    """Makes glibc return large freed blocks to the OS at once, so that RSS follows the live tensors.

    By default glibc raises its mmap threshold after the first large free and then keeps freed chunks in
    the heap: the peak RSS of every later call would read as no increase at all.
    """
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD = 1 MiB, fixed
        except OSError:
            pass


def _reset_peak(device: torch.device) -> int:
    """Resets the peak counter and returns the current usage it is measured against."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    try:
        Path("/proc/self/clear_refs").write_text("5")  # "5" resets VmHWM to the current RSS (Linux >= 4.0)
        return _rss_bytes("VmRSS") or 0
    except OSError:
        # elsewhere only the process-wide peak exists; the increase is then a lower bound
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def _peak(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    hwm = _rss_bytes("VmHWM")
    if hwm is not None:
        return hwm
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def time_metrics(feats, device: torch.device, chunk_size: int, repeats: int):
    """Warm-up once, then `repeats` timed calls.

    Returns (median wall s, median process CPU s, peak bytes above baseline, metrics). CPU time (all threads)
    is reported because wall time on a shared machine mostly measures the other tenants.
    """
    metrics = retrieval_metrics(*feats, chunk_size=chunk_size)
    _sync(device)
    base = _reset_peak(device)
    wall, cpu = [], []
    for _ in range(repeats):
        _sync(device)
        start, start_cpu = time.perf_counter(), time.process_time()
        metrics = retrieval_metrics(*feats, chunk_size=chunk_size)
        _sync(device)
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall), statistics.median(cpu), max(0, _peak(device) - base), metrics


def choose_chunk_size(feats, device: torch.device, candidates: list[int]) -> int:
    """The smallest candidate within 10% of the fastest: memory grows linearly with the chunk, speed barely.

    Judged on wall time on GPU and on process CPU time on CPU (wall time there depends on the other tenants).
    """
    timings = {}
    for chunk in sorted(candidates):
        median, cpu, peak, _ = time_metrics(feats, device, chunk, repeats=1)
        timings[chunk] = median if device.type == "cuda" else cpu
        print(f"  sweep chunk_size={chunk:>6}: {median:8.3f} s wall, {cpu:8.3f} s CPU, peak {peak / 2**20:9.1f} MiB",
              flush=True)
    fastest = min(timings.values())
    return min(c for c, t in timings.items() if t <= 1.1 * fastest)


@user_errors_as_one_line()
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", default="cuhk,icfg,rstp", help="comma-separated subset of " + ",".join(SHAPES))
    parser.add_argument("--repeats", type=int, default=3, help="timed runs after one warm-up (median reported)")
    parser.add_argument("--chunk-size", type=int, default=None, help="fixed chunk size (skips the sweep)")
    parser.add_argument("--sweep", default=None, help="chunk sizes to try on the first dataset (default per device)")
    parser.add_argument("--dim", type=int, default=768)
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cpu":
        _release_freed_cpu_memory()
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False")
    names = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [n for n in names if n not in SHAPES]
    if unknown:
        parser.error(f"unknown --sizes {unknown}; choose from {list(SHAPES)}")
    print(machine_line(machine_record(device)) + f"; repeats={args.repeats}", flush=True)

    chunk = args.chunk_size
    if chunk is None:
        default_sweep = "1024,2048,4096,8192" if device.type == "cuda" else "256,1024,2048"
        candidates = [int(c) for c in (args.sweep or default_sweep).split(",")]
        print(f"choosing the chunk size on {SHAPES[names[0]].name} (library default {default_chunk_size(device)}):")
        chunk = choose_chunk_size(make_features(SHAPES[names[0]], args.dim, device), device, candidates)
        print(f"  chosen (smallest within 10% of the fastest): {chunk}", flush=True)

    header = f"{'dataset':<11} {'queries':>7} {'gallery':>7} {'ids':>5} {'chunk':>6} {'wall s':>8} {'CPU s':>8} " \
             f"{'queries/s':>10} {'peak MiB':>9} {'R1':>6} {'mAP':>6}"
    rows = []
    for name in names:
        shape = SHAPES[name]
        feats = make_features(shape, args.dim, device)
        median, cpu, peak, metrics = time_metrics(feats, device, chunk, args.repeats)
        num_q, num_g = feats[0].shape[0], feats[1].shape[0]
        rows.append(
            f"{shape.name:<11} {num_q:>7} {num_g:>7} {shape.num_ids:>5} {chunk:>6} {median:>8.3f} {cpu:>8.3f} "
            f"{num_q / median:>10.0f} {peak / 2**20:>9.1f} {metrics['R1']:>6.2f} {metrics['mAP']:>6.2f}"
        )
        print(rows[-1], flush=True)
        del feats
    print()
    print(header)
    print("\n".join(rows))
    print()
    print(format_metrics_table(metrics, f"last dataset ({SHAPES[names[-1]].name}) metrics, for reference"))


if __name__ == "__main__":
    main()
