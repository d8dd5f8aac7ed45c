"""Training throughput of the IVT fine-tuning step: model FLOPs, achieved FLOP/s, MFU, a per-phase breakdown, one
epoch end to end with the loader, and the fastest setting per GPU memory budget.

    python bench/bench_train.py --device cpu --sizes tiny                 # CI-sized: seconds
    python bench/bench_train.py --device cuda --sizes base                # the recipe: 28 records x 3 views, bf16
    python bench/bench_train.py --device cuda --sizes base --variants baseline,foreach,pad16,compile,after
    python bench/bench_train.py --device cuda --end-to-end --data-dir runs/e2e_cuhk --max-steps 300
    python bench/bench_train.py --device cuda --memory-budgets 12,16,24,40,80

Step mode. The real training step, ``engine.training.optimizer_step`` (host-to-device copy, the device augmentation
when data.augment_on=device, autocast forward, backward, optimizer), set up by the engine's own phases
(``build_network``, ``new_run``, ``set_train_module``, ``set_optimizer``: the objective, train.compile and the
optimizer exactly as training builds them), runs on batches shaped like the collator's:
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
MFU = that / the device's peak dense bf16 rate (PEAK_TFLOPS below, from the vendors' datasheets; --peak-tflops
overrides, and is needed on CPU). A hook count of the tokens the blocks really saw is printed beside it (eager).

Phase breakdown (torch.profiler over ``--profile-steps`` steps, after the timed ones): host time per step in
data (copy to the device + device augmentation), forward, backward, optimizer, found by hooks on the objective
and the optimizer around the unmodified optimizer_step; on a GPU also device time per phase (CUDA events at the
same boundaries) and the host-device syncs the profiler saw (cudaStreamSynchronize / cudaDeviceSynchronize /
cudaEventSynchronize / synchronous cudaMemcpy, and aten::_local_scalar_dense = .item()/bool()). On every device
utils.host_sync.HostSyncCounter lists the value reads a GPU would wait for, by call site (BMM's draws live on
the host by design and never wait).

End-to-end mode (--end-to-end): bench/e2e_data.py writes a synthetic dataset with CUHK-PEDES's counts and image
sizes (configurable, so a CPU run can be small), then the real reader, loader (data.num_workers as set, the
recipe's transforms or data.augment_on=device, data.image_cache when given), model and optimizer_step train
``--max-steps`` steps of the epoch (0 = all of it). Reported: start-up phases, the loader alone (batches/s), the
time per step with the loader and the share of it spent waiting for data, the epoch (measured when it ran whole,
else projected from the measured steps), evaluation of the test split at full size (engine.evaluation, loader
included), and the 120-epoch projection = 120 x (epoch + evaluation of the val split) + the final test.

Memory mode (--memory-budgets GB,...): each candidate setting (records x accumulation, activation checkpointing)
is timed once without a cap and its peak reserved memory noted; per budget the fastest setting that fits is then
re-run under torch.cuda.set_per_process_memory_fraction(budget / total). Activation checkpointing is exact;
accumulation over smaller micro-batches changes the recipe (CMPM compares fewer pairs per micro-batch) and is
marked so.

``--json PATH`` writes every row.
"""
from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Iterator

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datasets.batch_augment import AugmentSpec, draw_view_params, stack_images  # noqa: E402
from engine import training  # noqa: E402
from engine.training import optimizer_step  # noqa: E402
from models.config import IVTConfig  # noqa: E402
from models.flops import TokenCounter, expected_step_flops  # noqa: E402
from utils.config import load_config  # noqa: E402
from utils.errors import user_errors_as_one_line  # noqa: E402
from utils.host_sync import HostSyncCounter  # noqa: E402

SIZES = {
    "tiny": ["model.embed_dim=192", "model.depth=4", "model.num_heads=3", "input.image_size=[128,64]",
             "model.vocab_size=1000", "model.max_text_positions=128"],
    "small": ["model.embed_dim=384", "model.depth=6", "model.num_heads=6", "input.image_size=[192,64]",
              "model.vocab_size=8000"],
    "base": [],  # the recipe itself: ViT-B/16 + BERT-base widths, stride 12, 384x128
}
NO_WEIGHTS = ["model.vit_weights=null", "model.bert_weights=null", "data.check_images=none"]

# Peak dense (no sparsity) bf16 tensor-core TFLOP/s from the vendors' datasheets, matched in order against
# torch.cuda.get_device_name(); the first match wins.
PEAK_TFLOPS = [
    ("GH200", 989.4), ("H200", 989.4), ("H100 PCIe", 756.0), ("H100 NVL", 835.5), ("H100", 989.4),  # SXM
    ("H800", 989.4), ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.05), ("L40", 181.05),
    ("L4", 121.0), ("A10G", 70.0), ("A10", 125.0), ("RTX 4090", 165.2), ("RTX 6000 Ada", 364.2),
    ("RTX A6000", 154.8), ("V100", 125.0), ("T4", 65.0),  # V100 / T4: fp16 (no bf16 tensor cores)
]

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


def peak_tflops(device: torch.device, override: float | None) -> tuple[float | None, str]:
    if override:
        return override, "--peak-tflops"
    if device.type != "cuda":
        return None, "no peak known for a CPU (give --peak-tflops)"
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_TFLOPS:
        if key in name:
            return value, f"{name}: {key} dense bf16 datasheet"
    return None, f"{name}: not in PEAK_TFLOPS (give --peak-tflops)"


def machine_state() -> dict:
    """What the figures depend on: host, load, versions, device."""
    import timm
    import transformers

    state = {"time": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "host": platform.node(), "nproc": os.cpu_count(),
             "sched_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
             "loadavg": os.getloadavg(), "python": platform.python_version(), "torch": torch.__version__,
             "timm": timm.__version__, "transformers": transformers.__version__,
             "torch_threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        state.update(gpu=torch.cuda.get_device_name(0), gpu_memory_GiB=round(props.total_memory / 2**30, 1),
                     cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    return state


# ------------------------------------------------------------------------------------------------ batches
def make_batch(cfg, records: int, text_lens: tuple[int, int], seed: int, pin: bool) -> dict:
    """One collated batch of random content with the collator's keys, shapes and padding (on the CPU)."""
    g = torch.Generator().manual_seed(seed)
    views, levels = cfg.input.num_views, len(cfg.text.levels)
    height, width = cfg.input.image_size
    pids = torch.arange(records) // cfg.sampler.num_instances
    lengths = torch.randint(text_lens[0], text_lens[1] + 1, (levels * records,), generator=g)
    longest = int(lengths.max())
    ids = torch.randint(5, cfg.model.vocab_size, (levels * records, longest), generator=g)
    ids[:, 0] = 101
    mask = (torch.arange(longest)[None] < lengths[:, None]).long()
    ids = ids * mask
    batch = {"image_pids": pids.repeat(views), "text_ids": ids, "text_mask": mask, "text_pids": pids.repeat(levels),
             "pids": pids, "indices": torch.arange(records), "caption_ids": ids[-records:].clone(),
             "caption_mask": mask[-records:].clone()}
    if cfg.data.augment_on == "device":
        spec = AugmentSpec.from_config(cfg.input)
        originals = [torch.randint(0, 256, (int(torch.randint(200, 401, (1,), generator=g)),
                                            int(torch.randint(80, 201, (1,), generator=g)), 3),
                                   generator=g, dtype=torch.uint8) for _ in range(records)]
        import random

        params = torch.stack([draw_view_params(spec, random.Random(seed * 1000 + r), views) for r in range(records)])
        batch["image_uint8"], batch["image_sizes"] = stack_images(originals)
        batch["view_params"] = params.transpose(0, 1).reshape(views * records, -1)
        batch["augment_seed"] = seed
    else:
        batch["images"] = torch.randn(views * records, 3, height, width, generator=g)
    if pin:
        batch = {k: v.pin_memory() if torch.is_tensor(v) else v for k, v in batch.items()}
    return batch


def batch_flops(cfg, batch: dict) -> float:
    """Expected training FLOPs of one batch (models/flops.py), at the batch's padded text length."""
    config = IVTConfig.from_config(cfg)
    views = batch["image_pids"].shape[0]
    texts, length = batch["text_ids"].shape
    return expected_step_flops(config, views, texts, length, cfg.model.text_pad_multiple).train


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


# ---------------------------------------------------------------------------------------------- step mode
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_step(cfg, device: torch.device) -> training.Run:
    """The training step's Run without data (the bench feeds its own batches), built by the engine's phases."""
    torch.manual_seed(0)
    run = training.new_run(cfg, Path("."), device, training.build_network(cfg, device, None, None))
    run.objective.train()
    training.set_train_module(run)
    run.nominal_steps = 1  # the schedule is not stepped here
    training.set_optimizer(run)
    return run


def bench_step(size: str, device: torch.device, records: int, steps: int, warmup: int | None,
               text_lens: tuple[int, int],
               overrides: list[str], profile_steps: int, peak: float | None,
               label: str = "") -> dict:
    cfg = load_config(None, SIZES[size] + NO_WEIGHTS + [f"train.batch_size_per_gpu={records}"] + overrides)
    run = build_step(cfg, device)
    compiled = bool(cfg.train.compile)
    if warmup is None:
        warmup = 6 if compiled else 3  # compilation happens in the first steps
    pin = device.type == "cuda"
    batches = [make_batch(cfg, records, text_lens, seed, pin) for seed in range(4)]
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
    _sync(device)
    warmup_s = time.perf_counter() - started
    times = []
    for _ in range(steps):
        _sync(device)
        t0 = time.perf_counter()
        optimizer_step(run, stream)
        _sync(device)
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
        _sync(device)
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
    _free(device)
    return row


def _graph_count() -> int | None:
    try:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])
    except Exception:  # noqa: BLE001 - internal counters differ across versions
        return None


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


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


# ------------------------------------------------------------------------------------------- end to end
def bench_end_to_end(args, device: torch.device, peak: float | None) -> dict:
    from bench.e2e_data import make_e2e_dataset
    from datasets.build import build_train_loader, set_train_epoch
    from engine.data import build_run_tokenizer, load_data

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    root = make_e2e_dataset(args.data_dir, args.train_ids, args.train_images, args.train_captions, args.eval_ids,
                            args.eval_images, args.eval_captions, workers=args.data_workers)
    timings["write_dataset_s"] = time.perf_counter() - t0
    overrides = (SIZES[args.sizes.split(",")[0]] + NO_WEIGHTS
                 + [f"data.root={root}", "data.format=cuhkpedes", "text.tokenizer=train",
                    f"train.batch_size_per_gpu={args.batch or (28 if device.type == 'cuda' else 8)}"]
                 + (["train.amp=none"] if device.type != "cuda" else []) + args.set)
    cfg = load_config(None, overrides)
    t0 = time.perf_counter()
    records, splits = load_data(cfg)
    timings["read_annotations_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    tokenizer = build_run_tokenizer(cfg, records, None)
    timings["tokenizer_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    loader, sampler, dataset = build_train_loader(cfg, records, tokenizer)
    timings["loader_and_cache_s"] = time.perf_counter() - t0
    set_train_epoch(sampler, dataset, 0)
    steps_per_epoch = len(loader) // cfg.train.grad_accum_steps
    steps = min(steps_per_epoch, args.max_steps) if args.max_steps > 0 else steps_per_epoch
    first_batch_s, loader_alone = time_loader_alone(loader, steps)
    run = build_step(cfg, device)
    set_train_epoch(sampler, dataset, 0)
    trained = time_steps_with_loader(run, loader, steps, args.warmup if args.warmup is not None else 5)
    step_s, warm = trained["step_s"], trained["warm"]
    epoch_s = (trained["total_s"] if steps == steps_per_epoch
               else step_s * steps_per_epoch + trained["warm_s"] - warm * step_s)
    # FLOPs per step at the padded text length of a few of the loader's own batches.
    sample_it = iter(loader)
    flops = statistics.mean(batch_flops(cfg, next(sample_it)) for _ in range(min(4, len(loader))))
    del sample_it
    _free(device)
    evals = time_evaluation(run, splits, tokenizer)
    epochs = cfg.train.epochs
    total_s = epochs * (epoch_s + evals["val"]["seconds"]) + evals["test"]["seconds"]
    tflops = flops / step_s / 1e12
    return {"mode": "end-to-end", "device": str(device), "size": args.sizes.split(",")[0], "overrides": args.set,
            "num_workers": cfg.data.num_workers, "augment_on": cfg.data.augment_on, "image_cache": cfg.data.image_cache,
            "records": len(records), "batch": cfg.train.batch_size_per_gpu, "steps_per_epoch": steps_per_epoch,
            "steps_run": steps, "steps_timed": steps - warm, "timings": timings, "first_batch_s": first_batch_s,
            "loader_alone_batches_per_s": loader_alone, "step_s_with_loader": step_s,
            "data_wait_share": trained["wait_share"], "epoch_s": epoch_s,
            "epoch_measured_whole": steps == steps_per_epoch, "TFLOPs": tflops, "MFU": tflops / peak if peak else None,
            "eval": evals, "epochs": epochs, "projected_total_h": total_s / 3600}


def time_loader_alone(loader, steps: int) -> tuple[float, float]:
    """(seconds to the first batch, batches per second after it): what the loader delivers with data.num_workers."""
    t0 = time.perf_counter()
    it = iter(loader)
    next(it)
    first_batch_s = time.perf_counter() - t0
    n_alone = min(len(loader) - 1, max(4, steps // 2))
    t1 = time.perf_counter()
    for _ in range(n_alone):
        next(it)
    return first_batch_s, n_alone / (time.perf_counter() - t1)


def time_steps_with_loader(run: training.Run, loader, steps: int, warmup: int) -> dict:
    """Train ``steps`` steps from the loader; the time per step after ``warmup`` and the share spent on data."""
    waits: list[float] = []

    def timed_batches() -> Iterator[dict]:
        source = iter(loader)
        while True:
            w0 = time.perf_counter()
            try:
                batch = next(source)
            except StopIteration:
                return
            waits.append(time.perf_counter() - w0)
            yield batch

    stream = timed_batches()
    warm = min(warmup, steps - 1)
    t0 = time.perf_counter()
    for step in range(steps):
        if step == warm:
            _sync(run.device)
            t_warm, waits_before = time.perf_counter(), len(waits)
        optimizer_step(run, stream)
    _sync(run.device)
    t_end = time.perf_counter()
    return {"warm": warm, "step_s": (t_end - t_warm) / (steps - warm), "total_s": t_end - t0,
            "warm_s": t_warm - t0, "wait_share": sum(waits[waits_before:]) / (t_end - t_warm)}


def time_evaluation(run: training.Run, splits, tokenizer) -> dict:
    """Seconds (and encoding seconds, counts) to evaluate the test and val splits at full size."""
    from engine.evaluation import evaluate_model

    run.model.eval()
    evals = {}
    for split in ("test", "val"):
        t0 = time.perf_counter()
        results = evaluate_model(run.model, getattr(splits, split), tokenizer, run.cfg, run.device, split)
        evals[split] = {"seconds": time.perf_counter() - t0, "encode_seconds": results.get("encode_seconds"),
                        "counts": results.get("counts")}
    return evals


def print_e2e(r: dict) -> None:
    t = r["timings"]
    how = "measured" if r["epoch_measured_whole"] else f"projected from {r['steps_timed']} measured steps"
    mfu = f"{100 * r['MFU']:.1f}%" if r["MFU"] is not None else "n/a"
    print(f"[end-to-end] {r['size']} {r['device']} workers {r['num_workers']} augment_on {r['augment_on']} "
          f"image_cache {r['image_cache']} {r['overrides']}\n"
          f"  {r['records']} records, batch {r['batch']}: {r['steps_per_epoch']} steps/epoch; ran {r['steps_run']}\n"
          f"  start-up: dataset {t['write_dataset_s']:.1f} s, annotations {t['read_annotations_s']:.1f} s, tokenizer "
          f"{t['tokenizer_s']:.1f} s, loader (+cache) {t['loader_and_cache_s']:.1f} s, first batch "
          f"{r['first_batch_s']:.1f} s\n"
          f"  loader alone {r['loader_alone_batches_per_s']:.2f} batches/s (= {1 / r['loader_alone_batches_per_s']:.3f} "
          f"s/batch); with the model {r['step_s_with_loader']:.3f} s/step, {100 * r['data_wait_share']:.0f}% of it "
          f"waiting for data; {r['TFLOPs']:.3g} TFLOP/s, MFU {mfu}\n"
          f"  epoch {r['epoch_s'] / 60:.2f} min ({how})\n"
          f"  evaluation: test {r['eval']['test']['seconds']:.1f} s {r['eval']['test']['counts']}, val "
          f"{r['eval']['val']['seconds']:.1f} s\n"
          f"  projected {r['epochs']} epochs + val each epoch + test: {r['projected_total_h']:.2f} h", flush=True)


# ---------------------------------------------------------------------------------------------- memory
MEMORY_CANDIDATES = [  # (records, accumulation, checkpointing); exact = the recipe's contrastive batch of 28
    (28, 1, False), (28, 1, True), (14, 2, False), (14, 2, True), (7, 4, True),
]


def bench_memory(args, device: torch.device, peak: float | None) -> list[dict]:
    if device.type != "cuda":
        budgets = []  # no memory cap on a CPU: the candidates are timed, nothing is capped
    else:
        budgets = [float(b) for b in args.memory_budgets.split(",")]
    size = args.sizes.split(",")[0]
    full = args.batch or 28
    rows = []
    for records, accum, ckpt in MEMORY_CANDIDATES:
        records = max(1, records * full // 28)
        overrides = args.set + [f"train.grad_accum_steps={accum}", f"model.grad_checkpointing={str(ckpt).lower()}"]
        r = None
        try:
            r = bench_step(size, device, records, args.steps or 5, 2, _lens(args), overrides, 1, peak,
                           label=f"{records}x{accum}{' ckpt' if ckpt else ''}")
        except torch.OutOfMemoryError:
            print(f"  {records}x{accum} ckpt={ckpt}: out of memory without a cap", flush=True)
        if r is None:
            _free(device)  # outside the except block, whose traceback still holds the failed step's tensors
            continue
        r["exact"] = accum == 1 and records == full  # the recipe's contrastive batch in one micro-batch
        rows.append(r)
        print_step_row(r, "memory candidate")
    table = []
    total = torch.cuda.get_device_properties(device).total_memory / 2**30 if device.type == "cuda" else None
    for budget in budgets:
        fits = [r for r in rows if r["peak_reserved_GiB"] <= 0.95 * budget]
        exact = [r for r in fits if r["exact"]]
        choice = max(exact or fits, key=lambda r: r["pairs_per_s"], default=None)
        verified = None
        if choice is not None and budget < total:
            torch.cuda.set_per_process_memory_fraction(budget / total, device)
            try:
                again = bench_step(size, device, choice["records"], 2, 1, _lens(args), choice["overrides"],
                                   1, peak, label="verify")
                verified = f"ran under the cap ({again['step_s'] * 1e3:.0f} ms/step)"
            except torch.OutOfMemoryError:
                verified = "OOM under the cap"
            finally:
                torch.cuda.set_per_process_memory_fraction(1.0, device)
            _free(device)
        table.append({"budget_GB": budget, "choice": choice and choice["variant"],
                      "exact": choice and choice["exact"], "step_s": choice and choice["step_s"],
                      "pairs_per_s": choice and choice["pairs_per_s"],
                      "peak_reserved_GiB": choice and choice["peak_reserved_GiB"], "verified": verified})
        print(f"  budget {budget:g} GiB: {table[-1]}", flush=True)
    return rows + [{"memory_table": table}]


def _lens(args) -> tuple[int, int]:
    low, high = (int(x) for x in args.text_lens.split(","))
    return low, high


@user_errors_as_one_line()
def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--sizes", default="tiny", help="comma list of " + ", ".join(SIZES))
    parser.add_argument("--batch", type=int, default=None, help="records per step (default: 28 on GPU, 8 tiny/"
                        "small, 2 base on CPU)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 20 GPU, 5 CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; compile: 6)")
    parser.add_argument("--profile-steps", type=int, default=3)
    parser.add_argument("--text-lens", default="8,58", help="min,max real tokens per text (incl. [CLS]/[SEP])")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--variants", default=None, help="comma list of " + ", ".join(VARIANTS) + " (each on top "
                        "of --set)")
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--json", default=None, help="write the rows (and the machine state) to this file")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU figures on a shared "
                        "machine are steadier with 1)")
    e2e = parser.add_argument_group("end to end")
    e2e.add_argument("--end-to-end", action="store_true")
    e2e.add_argument("--data-dir", default="runs/e2e_data")
    e2e.add_argument("--max-steps", type=int, default=0, help="steps of the epoch to run (0: the whole epoch)")
    e2e.add_argument("--data-workers", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                     help="processes writing the synthetic JPEGs")
    from bench.e2e_data import CUHK_COUNTS

    for key, value in CUHK_COUNTS.items():
        e2e.add_argument("--" + key.replace("_", "-"), type=int, default=value)
    mem = parser.add_argument_group("memory")
    mem.add_argument("--memory-budgets", default=None, help="comma list of GB, e.g. 12,16,24,40,80")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device")
    unknown = sorted(set((args.variants or "").split(",")) - set(VARIANTS) - {""})
    if unknown:
        parser.error(f"--variants: unknown {', '.join(unknown)} (known: {', '.join(VARIANTS)})")
    peak, peak_note = peak_tflops(device, args.peak_tflops)
    state = machine_state()
    print("machine: " + ", ".join(f"{k}={v}" for k, v in state.items()), flush=True)
    rows: list[dict] = []

    def dump() -> None:  # after every row, so a stage cut short by a time limit keeps what it measured
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps({"machine": state, "peak_tflops": peak, "peak_source": peak_note,
                                                   "rows": rows}, indent=1, default=str))

    if args.end_to_end:
        rows.append(bench_end_to_end(args, device, peak))
        print_e2e(rows[-1])
    elif args.memory_budgets:
        rows += bench_memory(args, device, peak)
    else:
        variants = args.variants.split(",") if args.variants else [None]
        for size, variant in itertools.product(args.sizes.split(","), variants):
            overrides = VARIANTS[variant] if variant else []
            records = args.batch or (28 if device.type == "cuda" else (2 if size == "base" else 8))
            steps = args.steps or (20 if device.type == "cuda" else 3)
            row = None
            try:
                row = bench_step(size, device, records, steps, args.warmup, _lens(args), args.set + overrides,
                                 args.profile_steps, peak, label=variant or "custom")
            except Exception as exc:  # noqa: BLE001 - one failing variant must not cost the others their figures
                if not args.variants:
                    raise
                print(f"[{variant}] {size}: failed: {type(exc).__name__}: {exc}", flush=True)
                rows.append({"variant": variant, "size": size, "error": f"{type(exc).__name__}: {exc}"})
            if row is None:
                _free(device)  # after the except block, whose traceback held the failed step's tensors
                dump()
                continue
            rows.append(row)
            print_step_row(row, peak_note)
            dump()
    dump()
    return rows


if __name__ == "__main__":
    main()
