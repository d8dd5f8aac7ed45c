"""Training-step throughput and peak memory of the IVT fine-tuning step (CMPM over MLA x BMM).

    python bench/bench_train.py                       # tiny and base on CPU (base with a small batch)
    python bench/bench_train.py --device cuda         # GPU: bf16 autocast, 28 records x 3 views per step
    python bench/bench_train.py --device cuda --sizes base --batch 28 --steps 20

Random images and token ids of realistic shape stand in for data (no loader in the loop), so the figures are
the model's own cost: forward + backward + SGD step of the authors' recipe (stride 12, 384x128 for base).
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.ivt import build_model  # noqa: E402
from models.objectives import RetrievalObjective  # noqa: E402
from utils.config import load_config  # noqa: E402
from utils.optim import build_optimizer  # noqa: E402

SIZES = {
    "tiny": ["model.embed_dim=192", "model.depth=4", "model.num_heads=3", "input.image_size=[128,64]",
             "model.vocab_size=1000"],
    "base": [],  # the recipe itself: ViT-B/16 + BERT-base widths, stride 12, 384x128
}


def make_batch(cfg, records: int, text_len: int, device) -> dict:
    views, levels = cfg.input.num_views, len(cfg.text.levels)
    height, width = cfg.input.image_size
    pids = torch.arange(records, device=device) // cfg.sampler.num_instances
    ids = torch.randint(5, cfg.model.vocab_size, (levels * records, text_len), device=device)
    ids[:, 0] = 101
    return {
        "images": torch.randn(views * records, 3, height, width, device=device),
        "image_pids": pids.repeat(views),
        "text_ids": ids,
        "text_mask": torch.ones_like(ids),
        "text_pids": pids.repeat(levels),
        "pids": pids,
    }


def bench(size: str, device: torch.device, records: int, steps: int, warmup: int, text_len: int) -> dict:
    cfg = load_config(None, SIZES[size] + ["model.vit_weights=null", "model.bert_weights=null"])
    torch.manual_seed(0)
    model = build_model(cfg).to(device)
    objective = RetrievalObjective(model, cfg.loss).train()
    optimizer = build_optimizer(model, cfg.train)
    batch = make_batch(cfg, records, text_len, device)
    use_amp = device.type == "cuda"
    if use_amp:
        torch.cuda.reset_peak_memory_stats(device)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            loss = sum(v for k, v in objective(batch).items() if k.endswith("_loss"))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    if use_amp:
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if use_amp:
        torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - start) / steps
    pairs = records * cfg.input.num_views
    peak = (torch.cuda.max_memory_allocated(device) / 2**30 if use_amp
            else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 2**20)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    return {"size": size, "device": str(device), "records": records, "pairs": pairs, "params_M": params,
            "step_s": seconds, "pairs_per_s": pairs / seconds, "peak_GiB": peak}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--sizes", default="tiny,base")
    parser.add_argument("--batch", type=int, default=None, help="records per step (default: 8 tiny/CPU-base 2, "
                        "GPU 28)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--text-len", type=int, default=64, help="tokens per caption (CUHK-PEDES mean ~25-60)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    rows = []
    for size in args.sizes.split(","):
        records = args.batch or (28 if device.type == "cuda" else (8 if size == "tiny" else 4))
        steps = args.steps or (20 if device.type == "cuda" else (10 if size == "tiny" else 2))
        rows.append(bench(size, device, records, steps, warmup=2 if device.type == "cuda" else 1,
                          text_len=args.text_len))
        r = rows[-1]
        peak_name = "peak GPU GiB" if device.type == "cuda" else "peak RSS growth GiB"
        print(f"{r['size']:5s} {r['device']:5s} params {r['params_M']:7.1f}M  records {r['records']:3d} "
              f"(pairs {r['pairs']:3d})  step {r['step_s']:.3f}s  {r['pairs_per_s']:8.1f} pairs/s  "
              f"{peak_name} {r['peak_GiB']:.2f}", flush=True)
    return rows


if __name__ == "__main__":
    main()
