"""One training epoch end to end with the loader: start-up, the loader alone, steps with the loader, evaluation
at full size and the projected time of the whole recipe.

    python -m bench.train_epoch --device cuda --data-dir runs/e2e_cuhk --max-steps 300
    python -m bench.train_epoch --device cpu --data-dir runs/e2e_small --train-images 300 --train-captions 600 \
        --eval-images 40 --eval-captions 80 --train-ids 100 --eval-ids 20 --max-steps 5

bench/e2e_data.py writes a synthetic dataset with CUHK-PEDES's counts and image sizes (configurable, so a CPU run
can be small), then the real reader, loader (data.num_workers as set, the recipe's transforms or
data.augment_on=device, data.image_cache when given), model and optimizer_step (the step built as in
bench/train_step.py) train ``--max-steps`` steps of the epoch (0 = all of it). Reported: start-up phases, the
loader alone (batches/s), the time per step with the loader and the share of it spent waiting for data, the epoch
(measured when it ran whole, else projected from the measured steps), evaluation of the test split at full size
(engine.evaluation, loader included), and the 120-epoch projection = 120 x (epoch + evaluation of the val split) +
the final test. ``--json PATH`` writes the row with the machine record.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Iterator

import torch

from bench.base import add_common_arguments, batch_flops, build_step, free, start, step_config, sync
from bench.e2e_data import CUHK_COUNTS, make_e2e_dataset
from datasets.build import build_train_loader, set_train_epoch
from engine.data import build_run_tokenizer, load_data
from engine.evaluation import evaluate_model
from engine.training import Run, optimizer_step
from utils.errors import user_errors_as_one_line


def bench_end_to_end(args: argparse.Namespace, device: torch.device, peak: float | None) -> dict:
    """One row: the dataset written, the start-up phases, the loader alone, ``--max-steps`` trained steps with the
    loader, the epoch (measured or projected), evaluation at full size and the whole recipe's projected time."""
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    root = make_e2e_dataset(args.data_dir, args.train_ids, args.train_images, args.train_captions, args.eval_ids,
                            args.eval_images, args.eval_captions, workers=args.data_workers)
    timings["write_dataset_s"] = time.perf_counter() - t0
    cfg = step_config(args.sizes.split(",")[0], args.batch or (28 if device.type == "cuda" else 8),
                      [f"data.root={root}", "data.format=cuhkpedes", "text.tokenizer=train"]
                      + (["train.amp=none"] if device.type != "cuda" else []) + args.set)
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
    free(device)
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


def time_steps_with_loader(run: Run, loader, steps: int, warmup: int) -> dict:
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
            sync(run.device)
            t_warm, waits_before = time.perf_counter(), len(waits)
        optimizer_step(run, stream)
    sync(run.device)
    t_end = time.perf_counter()
    return {"warm": warm, "step_s": (t_end - t_warm) / (steps - warm), "total_s": t_end - t0,
            "warm_s": t_warm - t0, "wait_share": sum(waits[waits_before:]) / (t_end - t_warm)}


def time_evaluation(run: Run, splits, tokenizer) -> dict:
    """Seconds (and encoding seconds, counts) to evaluate the test and val splits at full size."""
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


@user_errors_as_one_line()
def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    add_common_arguments(parser)
    parser.add_argument("--data-dir", default="runs/e2e_data")
    parser.add_argument("--max-steps", type=int, default=0, help="steps of the epoch to run (0: the whole epoch)")
    parser.add_argument("--data-workers", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                        help="processes writing the synthetic JPEGs")
    for key, value in CUHK_COUNTS.items():
        parser.add_argument("--" + key.replace("_", "-"), type=int, default=value)
    args = parser.parse_args(argv)
    bench = start(parser, args)
    bench.add(bench_end_to_end(args, bench.device, bench.peak))
    print_e2e(bench.rows[-1])
    return bench.rows


if __name__ == "__main__":
    main()
