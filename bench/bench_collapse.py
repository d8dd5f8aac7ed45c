"""Why a from-scratch IVT sits on a plateau: how alike its features are in the first steps of training.

    python -m bench.bench_collapse --steps 200                       # configs/demo.yaml, classic style
    python -m bench.bench_collapse --style street model.feature_pool=mean

Trains the config for --steps optimizer steps (the engine's own step, schedule and loader; one process,
``data.num_workers=0``) and every --every steps prints, for one fixed batch: the mean cosine similarity between
the image features of different records' views, the same for the texts, the spread (std over a row) of the CMPM
logits, and the CMPM loss of the step. CMPM on features that do not depend on the input is exactly the uniform
softmax: with B records, V views, L levels and K records per identity, 2 x [(1 - f) (log(1/n) + 18.42) +
f (log(1/n) + log(sqrt(n f)))] with n = B V = B L and f = K V / n, i.e. 23.4 at K=4 and 25.5 at K=2 (B=32, V=L=3).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.base import machine_line, machine_record
from bench.bench_learning import dataset
from engine import training
from utils.config import load_config
from utils.errors import user_errors_as_one_line
from utils.optim import set_schedule

ROOT = Path(__file__).resolve().parents[1]


def mean_off_diagonal_cosine(features: torch.Tensor) -> float:
    """features [n, D] -> the mean cosine similarity over the n (n - 1) ordered pairs of different rows."""
    unit = F.normalize(features, dim=1)
    cosine = unit @ unit.t()
    n = cosine.shape[0]
    return float((cosine.sum() - cosine.diagonal().sum()) / (n * (n - 1)))


@torch.no_grad()
def feature_report(model: torch.nn.Module, batch: dict) -> str:
    was_training = model.training
    model.eval()
    _, image_feats = model.encode_image(batch["images"], bmm=False)
    _, text_feats = model.encode_text(batch["text_ids"], batch["text_mask"], bmm=False)
    model.train(was_training)
    logits = image_feats @ F.normalize(text_feats, dim=1).t()  # CMPM's image-to-text logits
    return (f"image cos {mean_off_diagonal_cosine(image_feats):.3f}  text cos {mean_off_diagonal_cosine(text_feats):.3f}"
            f"  logit spread {float(logits.std(dim=1).mean()):.3f}")


@user_errors_as_one_line()
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--style", default="classic")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--every", type=int, default=20)
    parser.add_argument("--data-dir", default="runs/bench_learning/data")
    parser.add_argument("--out-dir", default="runs/bench_collapse")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    root = dataset(Path(args.data_dir), args.style, 400, 0)
    cfg = load_config(ROOT / args.config, [f"data.root={root}", "data.synthesize_if_missing=false",
                                           "data.num_workers=0", *args.overrides])
    out_dir = Path(args.out_dir)
    device = training.set_up_process(cfg, out_dir)
    run = training.prepare_run(cfg, out_dir, device, None, None)
    training.prepare_optimisation(run)
    batches = iter(run.loader)
    probe = next(iter(run.loader))
    print(machine_line(machine_record(device)), flush=True)
    print(f"{args.config} {' '.join(args.overrides)} on {args.style}", flush=True)
    for step in range(args.steps + 1):
        if step % args.every == 0:
            print(f"step {step:4d}  {feature_report(run.model, probe)}", end="", flush=True)
        if step == args.steps:
            print()
            break
        try:
            batch = next(batches)
        except StopIteration:
            batches = iter(run.loader)
            batch = next(batches)
        out = training.optimizer_step(run, iter([batch]))
        set_schedule(run.scheduler, cfg.train, 0, step + 1)
        if step % args.every == 0:
            print(f"  cmpm loss {float(out['loss']):.2f}", flush=True)


if __name__ == "__main__":
    main()
