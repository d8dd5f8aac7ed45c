"""What every bench shares: the model sizes, the machine record, the common options, batch and step construction
through the engine's own phases, and the one way a bench writes its record.

A bench is one module per mode (``python -m bench.<name>`` from the repository root); each builds its parser with
``add_common_arguments``, calls ``start`` (threads, device, peak rate, machine record) and writes its rows with
``write_record``, so that every record holds the same machine description: ``utils.environment``'s record
(versions, commit, device, thread counts) plus the host, its load and, on a GPU, the device's properties.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from datasets.batch_augment import AugmentSpec, draw_view_params, stack_images
from engine import training
from models.config import IVTConfig
from models.flops import expected_step_flops
from utils.checkpoint import atomic_write
from utils.config import Config, load_config
from utils.environment import environment_record

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


# ------------------------------------------------------------------------------------------------ machine
def machine_record(device: str | torch.device | None = None) -> dict[str, Any]:
    """What a figure depends on: utils.environment's record (versions, commit, device, thread counts), the host,
    its CPUs and load average now, and on a GPU the device's memory, CUDA and cuDNN versions. Plain values."""
    record = environment_record(device)
    record.update(time=time.strftime("%Y-%m-%d %H:%M:%S %Z"), host=platform.node(), nproc=os.cpu_count(),
                  sched_cpus=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
                  loadavg=[round(x, 2) for x in os.getloadavg()], cpu=platform.processor() or platform.machine())
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        record.update(gpu=torch.cuda.get_device_name(0), gpu_memory_GiB=round(props.total_memory / 2**30, 1),
                      cudnn=torch.backends.cudnn.version())
    return record


def machine_line(record: dict[str, Any]) -> str:
    """The record as one console line."""
    return "machine: " + ", ".join(f"{k}={v}" for k, v in record.items())


def peak_tflops(device: torch.device, override: float | None) -> tuple[float | None, str]:
    """(peak dense bf16 TFLOP/s for MFU, where it comes from); None when unknown (a CPU, an unlisted GPU)."""
    if override:
        return override, "--peak-tflops"
    if device.type != "cuda":
        return None, "no peak known for a CPU (give --peak-tflops)"
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_TFLOPS:
        if key in name:
            return value, f"{name}: {key} dense bf16 datasheet"
    return None, f"{name}: not in PEAK_TFLOPS (give --peak-tflops)"


# ------------------------------------------------------------------------------------------------ options
def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every training bench takes: device, size, batch, steps, texts, overrides, output, threads."""
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--sizes", default="tiny", help="comma list of " + ", ".join(SIZES))
    parser.add_argument("--batch", type=int, default=None, help="records per step (default: 28 on GPU, 8 tiny/"
                        "small, 2 base on CPU)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 20 on GPU, 3 on CPU; 5 per "
                        "memory candidate)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; compile: 6)")
    parser.add_argument("--text-lens", default="8,58", help="min,max real tokens per text (incl. [CLS]/[SEP])")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--json", default=None, help="write the rows (and the machine record) to this file")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU figures on a shared "
                        "machine are steadier with 1)")


@dataclass
class Bench:
    """One bench run: its device, the peak rate for MFU, the machine record and the rows measured so far."""

    device: torch.device
    peak: float | None
    peak_note: str
    machine: dict[str, Any]
    json_path: str | None = None
    rows: list[dict] = field(default_factory=list)

    def add(self, row: dict) -> None:
        """Keep a row and rewrite the record, so a stage cut short by a time limit keeps what it measured."""
        self.rows.append(row)
        self.dump()

    def dump(self) -> None:
        if self.json_path:
            write_record(self.json_path, {"machine": self.machine, "peak_tflops": self.peak,
                                          "peak_source": self.peak_note, "rows": self.rows})


def start(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Bench:
    """Apply --threads (before the machine record, which states them), check the device, print the machine."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device")
    peak, note = peak_tflops(device, args.peak_tflops)
    machine = machine_record(device)
    print(machine_line(machine), flush=True)
    return Bench(device, peak, note, machine, args.json)


def write_record(path: str | Path, payload: dict) -> None:
    """A bench's JSON record, written whole or not at all."""
    text = json.dumps(payload, indent=1, default=str).encode()
    atomic_write(path, lambda handle: handle.write(text))


def report(payload: dict, out: str | Path | None) -> dict:
    """Print a bench's record, write it to ``out`` when given, and return it."""
    if out:
        write_record(out, payload)
    print(json.dumps(payload, indent=2, default=str))
    return payload


def text_lens(spec: str) -> tuple[int, int]:
    """"8,58" -> (8, 58): the fewest and most real tokens per text."""
    low, high = (int(x) for x in spec.split(","))
    return low, high


# ------------------------------------------------------------------------------------------ batch and step
def step_config(size: str, records: int, overrides: list[str]) -> Config:
    """The config of a bench step: the size, no pretrained weights, ``records`` per step, then the overrides."""
    return load_config(None, SIZES[size] + NO_WEIGHTS + [f"train.batch_size_per_gpu={records}"] + overrides)


def make_batch(cfg: Config, records: int, lens: tuple[int, int], seed: int, pin: bool) -> dict:
    """One collated batch of random content with the collator's keys, shapes and padding (on the CPU).

    images [V*B, 3, H, W] (or, with data.augment_on=device, uint8 originals and V*B view parameters); texts
    [L*B, T] with T the longest of lengths uniform in ``lens``; pids [B] in groups of sampler.num_instances.
    """
    g = torch.Generator().manual_seed(seed)
    views, levels = cfg.input.num_views, len(cfg.text.levels)
    height, width = cfg.input.image_size
    pids = torch.arange(records) // cfg.sampler.num_instances
    lengths = torch.randint(lens[0], lens[1] + 1, (levels * records,), generator=g)
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
        params = torch.stack([draw_view_params(spec, random.Random(seed * 1000 + r), views) for r in range(records)])
        batch["image_uint8"], batch["image_sizes"] = stack_images(originals)
        batch["view_params"] = params.transpose(0, 1).reshape(views * records, -1)
        batch["augment_seed"] = seed
    else:
        batch["images"] = torch.randn(views * records, 3, height, width, generator=g)
    if pin:
        batch = {k: v.pin_memory() if torch.is_tensor(v) else v for k, v in batch.items()}
    return batch


def batch_flops(cfg: Config, batch: dict) -> float:
    """Expected training FLOPs of one batch (models/flops.py), at the batch's padded text length."""
    config = IVTConfig.from_config(cfg)
    views = batch["image_pids"].shape[0]
    texts, length = batch["text_ids"].shape
    return expected_step_flops(config, views, texts, length, cfg.model.text_pad_multiple).train


def build_step(cfg: Config, device: torch.device) -> training.Run:
    """The training step's Run without data (the bench feeds its own batches), built by the engine's phases."""
    torch.manual_seed(0)
    run = training.new_run(cfg, Path("."), device, training.build_network(cfg, device, None, None))
    run.objective.train()
    training.set_train_module(run)
    run.nominal_steps = 1  # the schedule is not stepped here
    training.set_optimizer(run)
    return run


def sync(device: torch.device) -> None:
    """Wait for the device, so that a host clock brackets its work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    """Return what the last measurement held, so that the next one's peak memory starts from nothing."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
