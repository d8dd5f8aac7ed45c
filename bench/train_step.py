"""Training throughput of the IVT fine-tuning step: model FLOPs, achieved FLOP/s, MFU and a per-phase breakdown.

    python -m bench.train_step --device cpu --sizes tiny                 # CI-sized: seconds
    python -m bench.train_step --device cuda --sizes base                # the recipe: 28 records x 3 views, bf16
    python -m bench.train_step --device cuda --sizes base --variants baseline,foreach,pad16,compile,after

The real training step, ``engine.training.optimizer_step`` (host-to-device copy, the device augmentation when
data.augment_on=device, autocast forward, backward, optimizer), set up by the engine's own phases
(``build_network``, ``new_run``, ``set_train_module``, ``set_optimizer``: the objective, train.compile and the
optimizer exactly as training builds them; bench/base.py), runs on batches shaped like the collator's:
``--batch`` records x input.num_views views of random pixels at input.image_size, and input.num_views x levels
texts of random tokens whose lengths are uniform in ``--text-lens`` (each batch padded to its longest, as the
collator does). Time per step is the median of ``--steps`` steps after ``--warmup`` (the device synchronised
around each timed step).

FLOPs per step (models/flops.py has the derivation and a hand-checked test): per block and per sequence of n
tokens, width d, MLP hidden h = 4d, 8 n d^2 (qkv + output projections) + 4 n^2 d (scores and weights @ v) +
4 n d h (MLP) FLOPs, times depth, over every image view at the length BMM leaves it (1 + patches - k,
k ~ U{0..floor(0.2 N)}: the exact mean over k) and every text at its padded batch length minus BMM's drop (padded
again to model.text_pad_multiple when set), plus the patch embedding (2 P 3 p^2 d per view); a training step is
3 x that forward (backward = 2 x forward). LayerNorm, softmax, GELU, embeddings and the loss matrices (< 1%) are
not counted, nor recomputation under activation checkpointing. Achieved TFLOP/s = FLOPs per step / time per step;
MFU = that / the device's peak dense bf16 rate (bench/base.py's PEAK_TFLOPS, from the vendors' datasheets;
--peak-tflops overrides, and is needed on CPU). A hook count of the tokens the blocks really saw is printed beside
it (eager).

Phase breakdown (torch.profiler over ``--profile-steps`` steps, after the timed ones): host time per step in
data (copy to the device + device augmentation), forward, backward, optimizer, found by hooks on the objective
and the optimizer around the unmodified optimizer_step; on a GPU also device time per phase (CUDA events at the
same boundaries) and the host-device syncs the profiler saw (cudaStreamSynchronize / cudaDeviceSynchronize /
cudaEventSynchronize / synchronous cudaMemcpy, and aten::_local_scalar_dense = .item()/bool()). On every device
bench.host_sync.HostSyncCounter lists the value reads a GPU would wait for, by call site (BMM's draws live on
the host by design and never wait).

Each variant (``--variants``) is a set of config overrides a recipe can select, measured alone and together
("after"); a failing variant is reported and the others still run. ``--json PATH`` writes every row with the
machine record.
"""
from __future__ import annotations

import argparse
import itertools
import resource
import statistics
import time
from typing import Iterator

import torch

from bench.base import (Bench, add_common_arguments, batch_flops, build_step, free, make_batch, start, step_config,
                        sync, text_lens)
from bench.host_sync import HostSyncCounter
from engine.training import optimizer_step
from models.config import IVTConfig
from models.flops import TokenCounter
from utils.errors import user_errors_as_one_line

# Named sets of config overrides for --variants, each a setting a recipe can select: measured alone and
# together ("after").
VARIANTS = {
    "baseline": [],
    "foreach": ["train.optimizer_impl=foreach"],
    "fused": ["train.optimizer_impl=fused"],
    "pad16": ["model.text_pad_multiple=16"],
    "compile": ["train.compile=true"],
    "device_aug": ["data.augment_on=device"],
    "after": ["train.optimizer_impl=fused", "model.text_pad_multiple=16", "loss.itm_negative_check=device",
              "train.compile=true"],
}


# ---------------------------------------------------------------------------------------------- phases
class PhaseMarks:
    """Phase boundaries of optimizer_step from hooks: profiler ranges, and CUDA events on a GPU.

    data = step start -> forward start (copy to the device, device augmentation); forward = the objective's
    call; backward = forward end -> optimizer.step (loss sum, backward, output sums); optimizer = step and
    zero_grad, up to the step's end.
    """

    NAMES = ("data", "forward", "backward", "optimizer")

    def __init__(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device):
        self.cuda = device.type == "cuda"
        self.events: list[list] = []
        self._range = None
        self._handles = [
            module.register_forward_pre_hook(lambda *_: self.mark("forward")),
            module.register_forward_hook(lambda *_: self.mark("backward")),
            optimizer.register_step_pre_hook(lambda *_: self.mark("optimizer")),
        ]

    def _stamp(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def mark(self, phase: str) -> None:
        if self._range is not None:
            self._range.__exit__(None, None, None)
        self._range = torch.profiler.record_function(f"phase:{phase}")
        self._range.__enter__()
        self.events[-1].append((phase, self._stamp()))

    def start_step(self) -> None:
        self.events.append([])
        self.mark("data")

    def end_step(self) -> None:
        self._range.__exit__(None, None, None)
        self._range = None
        self.events[-1].append(("end", self._stamp()))

    def device_ms(self) -> dict[str, float]:
        """Mean device (CUDA) or wall (CPU) ms per step of each phase over the marked steps."""
        if self.cuda:
            torch.cuda.synchronize()
        totals = {name: 0.0 for name in self.NAMES}
        for step in self.events:
            for (phase, a), (_, b) in zip(step, step[1:]):
                totals[phase] += a.elapsed_time(b) if self.cuda else (b - a) * 1e3
        return {k: v / max(1, len(self.events)) for k, v in totals.items()}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


SYNC_EVENTS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")


def profile_summary(prof, steps: int) -> dict:
    host_ms = {name: 0.0 for name in PhaseMarks.NAMES}
    syncs, sync_ms, scalar_reads = 0, 0.0, 0
    for evt in prof.key_averages():
        if evt.key.startswith("phase:"):
            host_ms[evt.key[6:]] += evt.cpu_time_total / 1e3 / steps
        elif evt.key in SYNC_EVENTS:
            syncs += evt.count
            sync_ms += evt.cpu_time_total / 1e3
        elif evt.key == "aten::_local_scalar_dense":
            scalar_reads += evt.count
    return {"host_ms": host_ms, "cuda_syncs_per_step": syncs / steps, "cuda_sync_ms_per_step": sync_ms / steps,
            "scalar_reads_per_step": scalar_reads / steps}



# ---------------------------------------------------------------------------------------------- step
def bench_step(size: str, device: torch.device, records: int, steps: int, warmup: int | None,
               lens: tuple[int, int], overrides: list[str], profile_steps: int, peak: float | None,
               label: str = "") -> dict:
    """One row: ``steps`` timed steps of ``records`` records at ``size`` with ``overrides``, after ``warmup``
    untimed ones, then ``profile_steps`` profiled ones and one with the host-sync counter."""
    cfg = step_config(size, records, overrides)
    run = build_step(cfg, device)
    compiled = bool(cfg.train.compile)
    if warmup is None:
        warmup = 6 if compiled else 3  # compilation happens in the first steps
    pin = device.type == "cuda"
    batches = [make_batch(cfg, records, lens, seed, pin) for seed in range(4)]
    flops = statistics.mean(batch_flops(cfg, b) for b in batches) * cfg.train.grad_accum_steps
    stream: Iterator[dict] = itertools.cycle(batches)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    counter = TokenCounter(enabled=False)
    started = time.perf_counter()
    if not compiled:
        # Count only inside the objective's forward: checkpointing runs the blocks again in backward.
        handles = [run.train_module.register_forward_pre_hook(lambda *_: setattr(counter, "enabled", True)),
                   run.train_module.register_forward_hook(lambda *_: setattr(counter, "enabled", False))]
        with counter.attach(run.model.encoder):
            for _ in range(warmup):
                optimizer_step(run, stream)
        for handle in handles:
            handle.remove()
    else:
        for _ in range(warmup):
            optimizer_step(run, stream)
    sync(device)
    warmup_s = time.perf_counter() - started
    times = []
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        optimizer_step(run, stream)
        sync(device)
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    marks = PhaseMarks(run.train_module, run.optimizer, device)
    activities = [torch.profiler.ProfilerActivity.CPU] + (
        [torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(profile_steps):
            marks.start_step()
            optimizer_step(run, stream)
            marks.end_step()
        sync(device)
    phases = profile_summary(prof, profile_steps)
    phases["device_ms" if device.type == "cuda" else "wall_ms"] = marks.device_ms()
    marks.remove()
    syncs = HostSyncCounter()
    if not compiled:
        with syncs:
            optimizer_step(run, stream)
    pairs = records * cfg.input.num_views * cfg.train.grad_accum_steps
    peak_mem = (torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda"
                else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 2**20)
    reserved = torch.cuda.max_memory_reserved(device) / 2**30 if device.type == "cuda" else None
    measured_flops = (3.0 * counter.forward_flops(IVTConfig.from_config(cfg)) / warmup
                      if counter.sequences and warmup else None)
    tflops = flops / step_s / 1e12
    row = {"variant": label or "custom", "size": size, "device": str(device), "amp": cfg.train.amp if
           device.type == "cuda" else "fp32 (CPU)", "records": records, "accum": cfg.train.grad_accum_steps,
           "pairs": pairs, "params_M": sum(p.numel() for p in run.model.parameters()) / 1e6,
           "overrides": overrides, "compile": "model" if compiled else "none", "warmup_s": warmup_s, "step_s": step_s,
           "step_s_min": min(times), "step_s_max": max(times), "pairs_per_s": pairs / step_s,
           "TFLOP_per_step": flops / 1e12, "TFLOP_per_step_hooks": measured_flops and measured_flops / 1e12,
           "TFLOPs": tflops, "MFU": tflops / peak if peak else None, "peak_GiB": peak_mem,
           "peak_reserved_GiB": reserved, "phases": phases, "host_sync_sites": dict(syncs.sites),
           "graphs": _graph_count() if compiled else None}
    del run, batches
    free(device)
    return row


def _graph_count() -> int | None:
    try:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])
    except Exception:  # noqa: BLE001 - internal counters differ across versions
        return None


def print_step_row(r: dict, peak_note: str) -> None:
    mfu = f"{100 * r['MFU']:.1f}%" if r["MFU"] is not None else "n/a"
    hooks = f" (hooks {r['TFLOP_per_step_hooks']:.4g})" if r["TFLOP_per_step_hooks"] else ""
    mem = (f"peak {r['peak_GiB']:.2f} GiB alloc / {r['peak_reserved_GiB']:.2f} reserved" if r["peak_reserved_GiB"]
           is not None else f"peak RSS growth {r['peak_GiB']:.2f} GiB")
    print(f"[{r['variant']}] {r['size']} {r['device']} {r['amp']} compile={r['compile']} {r['overrides']}\n"
          f"  params {r['params_M']:.1f}M  records {r['records']} x accum {r['accum']} (pairs {r['pairs']})  "
          f"step {1e3 * r['step_s']:.1f} ms (min {1e3 * r['step_s_min']:.1f}, max {1e3 * r['step_s_max']:.1f})  "
          f"{r['pairs_per_s']:.1f} pairs/s  warm-up {r['warmup_s']:.1f} s\n"
          f"  model FLOPs/step {r['TFLOP_per_step']:.4g} TFLOP{hooks}  achieved {r['TFLOPs']:.3g} TFLOP/s  "
          f"MFU {mfu} ({peak_note})  {mem}", flush=True)
    ph = r["phases"]
    timed = ph.get("device_ms") or ph.get("wall_ms")
    kind = "device" if "device_ms" in ph else "wall"
    cells = "  ".join(f"{name} {ph['host_ms'][name]:.1f}/{timed[name]:.1f}" for name in PhaseMarks.NAMES)
    print(f"  phases ms/step host/{kind} (profiled): {cells}\n"
          f"  host syncs/step: CUDA sync calls {ph['cuda_syncs_per_step']:.1f} ({ph['cuda_sync_ms_per_step']:.2f} ms), "
          f"scalar reads {ph['scalar_reads_per_step']:.1f}; value reads by site: "
          f"{r['host_sync_sites'] or ('none' if r['compile'] == 'none' else 'not counted when compiled')}"
          + (f"; compiled graphs {r['graphs']}" if r["graphs"] is not None else ""), flush=True)


# ------------------------------------------------------------------------------------------------- main
def run_variant(bench: Bench, args: argparse.Namespace, size: str, variant: str | None) -> None:
    """Measure one size x variant and add its row; with --variants a failure becomes an error row."""
    device = bench.device
    records = args.batch or (28 if device.type == "cuda" else (2 if size == "base" else 8))
    steps = args.steps or (20 if device.type == "cuda" else 3)
    row = None
    try:
        row = bench_step(size, device, records, steps, args.warmup, text_lens(args.text_lens),
                         args.set + (VARIANTS[variant] if variant else []), args.profile_steps, bench.peak,
                         label=variant or "custom")
    except Exception as exc:  # noqa: BLE001 - one failing variant must not cost the others their figures
        if not args.variants:
            raise
        print(f"[{variant}] {size}: failed: {type(exc).__name__}: {exc}", flush=True)
        bench.add({"variant": variant, "size": size, "error": f"{type(exc).__name__}: {exc}"})
    if row is None:
        free(device)  # after the except block, whose traceback held the failed step's tensors
        return
    bench.add(row)
    print_step_row(row, bench.peak_note)


@user_errors_as_one_line()
def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    add_common_arguments(parser)
    parser.add_argument("--profile-steps", type=int, default=3)
    parser.add_argument("--variants", default=None, help="comma list of " + ", ".join(VARIANTS) + " (each on top "
                        "of --set)")
    args = parser.parse_args(argv)
    unknown = sorted(set((args.variants or "").split(",")) - set(VARIANTS) - {""})
    if unknown:
        parser.error(f"--variants: unknown {', '.join(unknown)} (known: {', '.join(VARIANTS)})")
    bench = start(parser, args)
    variants = args.variants.split(",") if args.variants else [None]
    for size, variant in itertools.product(args.sizes.split(","), variants):
        run_variant(bench, args, size, variant)
    bench.dump()
    return bench.rows


if __name__ == "__main__":
    main()
