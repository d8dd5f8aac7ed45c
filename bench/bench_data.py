"""Cost of each piece of the training data path, per item, on this machine (one CPU thread unless --threads).

    python -m bench.bench_data --data-dir runs/e2e_cpu [--device cuda] [--records 28]

On images of bench/e2e_data.py's dataset (CUHK-PEDES's size range) at input.image_size (default the recipe's
384x128): decoding a JPEG (PIL) vs reading the decoded image from the image cache; one view through the reference
CPU transforms (resize, pad, crop, flip, ToTensor, normalise, RandomErasing); the device path's worker work per
record (the image as uint8 + drawing its views' parameters); and the device path's batched augmentation of
``--records`` records x input.num_views views on ``--device``. The issue's budget: the loader must deliver
records x views augmented views per step time.
"""
from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

import torch

from bench.base import machine_line, machine_record
from datasets.batch_augment import AugmentSpec, as_uint8_hwc, augment_batch, draw_view_params, stack_images
from datasets.image_cache import open_or_build_image_cache
from datasets.readers import load_annotations
from datasets.transforms import build_train_transform, load_image
from utils.config import load_config
from utils.errors import user_errors_as_one_line


def per_call_ms(fn, items, repeats: int = 1) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for item in items:
            fn(item)
        times.append((time.perf_counter() - t0) / len(items) * 1e3)
    return statistics.median(times)


@user_errors_as_one_line()
def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, help="a dataset written by bench/e2e_data.py")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--records", type=int, default=28)
    parser.add_argument("--images", type=int, default=200, help="images timed per measurement")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(machine_line(machine_record(args.device)), flush=True)
    cfg = load_config(None, args.set)
    paths = list(dict.fromkeys(r.image_path for r in load_annotations("cuhkpedes", args.data_dir).train))
    paths = paths[:args.images]
    cache = open_or_build_image_cache(Path(args.data_dir + ".bench_cache"), paths)
    transform = build_train_transform(cfg.input)
    spec = AugmentSpec.from_config(cfg.input)
    images = [load_image(p) for p in paths]
    views = cfg.input.num_views
    out = {
        "decode_jpeg_ms": per_call_ms(load_image, paths),
        "read_cache_ms": per_call_ms(cache.image, paths),
        "cpu_view_ms": per_call_ms(transform, images[:50]),
        "device_path_worker_ms_per_record": per_call_ms(
            lambda im: (as_uint8_hwc(im), draw_view_params(spec, random.Random(0), views)), images),
    }
    device = torch.device(args.device)
    arrays = [as_uint8_hwc(im) for im in images[:args.records]]
    stacked, sizes = stack_images(arrays)
    params = torch.stack([draw_view_params(spec, random.Random(i), views) for i in range(len(arrays))])
    batch = {"image_uint8": stacked.to(device), "image_sizes": sizes.to(device),
             "view_params": params.transpose(0, 1).reshape(-1, params.shape[2]).to(device), "augment_seed": 1}
    augment_batch(dict(batch), cfg.input)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(3):
        augment_batch(dict(batch), cfg.input)
    if device.type == "cuda":
        torch.cuda.synchronize()
    out["device_augment_ms_per_batch"] = (time.perf_counter() - t0) / 3 * 1e3
    out.update(records=len(arrays), views=views, image_size=list(cfg.input.image_size), device=str(device),
               threads=args.threads)
    cpu_per_step = len(arrays) * views * (out["cpu_view_ms"]) + len(arrays) * out["decode_jpeg_ms"]
    dev_per_step = len(arrays) * (out["device_path_worker_ms_per_record"] + out["read_cache_ms"])
    out["cpu_path_core_ms_per_step"] = cpu_per_step
    out["device_path_core_ms_per_step"] = dev_per_step
    for key, value in out.items():
        print(f"{key:36s} {value:.2f}" if isinstance(value, float) else f"{key:36s} {value}")
    print(f"-> CPU path: {cpu_per_step:.0f} core-ms per step of {len(arrays)} records x {views} views (decode once "
          f"+ {views} views); device path: {dev_per_step:.0f} core-ms of worker time per step + "
          f"{out['device_augment_ms_per_batch']:.1f} ms of augmentation on {device}", flush=True)
    return out


if __name__ == "__main__":
    main()
