"""Person-search speed on CPU: indexing a 10k-image gallery, query latency, time to the first answer, scaling.

    python -m bench.bench_search [--images 10000] [--checkpoint CKPT] [--out bench/results/search_cpu]
    python -m bench.bench_search --scale [--sizes 100000,1000000,10000000] [--dims 768,128]   (bench/search_scale.py)

The gallery is the synthetic dataset's images (the first --images of a CUHK-PEDES-format set, 128x64 JPEGs),
written once to --work. The model is --checkpoint, else the demo recipe's architecture (configs/demo.yaml:
width 128, 4 layers, 64x32 input) with random weights, which costs the same as a trained one. Reported:

- indexing: images/s of Retriever.index over the folder (decode + resize + encode), and for a ViT-B/BERT-base
  size model (the paper's, 384x128, stride 12; random weights) on a sample of --base-sample images;
- query latency p50/p95 of Retriever.search for 1 query and for a batch of 100 (text encoding + one matrix
  product + top-k), and of the search alone over the 10k index (matrix product + top-k, no text encoding);
- time from process start to the first printed answer of `python retrieve.py`, cold (no index file: the
  folder is encoded) and with the index file written by the cold run;
- brute-force search time over random unit features of 10k, 100k and 1M images at width 128 and 768: where a
  vector index (faiss, ...) starts to pay off.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from utils.checkpoint import atomic_save
from utils.config import load_config
from utils.errors import user_errors_as_one_line

REPO = Path(__file__).resolve().parents[1]

QUERIES = [
    "a woman in a red coat and black pants with a black backpack",
    "a man wearing a blue jacket, gray shorts and white shoes",
    "a girl with long blonde hair in a pink dress carrying a handbag",
    "a person in a green t-shirt and black pants",
]
BASE_OVERRIDES = ["text.tokenizer=train", "text.tokenizer_vocab_size=1000", "model.vocab_size=30522",
                  "data.num_workers=0", "eval.amp=false"]  # configs/base.yaml is ViT-B/16 + BERT-base at 384x128


def percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    pick = lambda q: ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]  # noqa: E731
    return {"p50_ms": 1000 * statistics.median(ordered), "p95_ms": 1000 * pick(0.95), "runs": len(ordered)}


def make_gallery(work: Path, count: int) -> tuple[Path, list[str]]:
    """``count`` synthetic person images in work/gallery (made once), and some of the set's captions."""
    from datasets.readers import load_annotations
    from datasets.synthetic import make_synthetic

    synth = work / "synth"
    if not (synth / "SYNTHETIC.json").is_file():
        began = time.perf_counter()
        make_synthetic("cuhkpedes", synth, num_ids=count // 3 + 200, seed=0)
        print(f"wrote the synthetic set in {time.perf_counter() - began:.0f} s", flush=True)
    gallery = work / "gallery"
    if not gallery.is_dir() or len(list(gallery.iterdir())) != count:
        shutil.rmtree(gallery, ignore_errors=True)
        gallery.mkdir(parents=True)
        images = sorted((synth / "imgs").rglob("*.jpg"))[:count]
        if len(images) < count:
            raise SystemExit(f"only {len(images)} synthetic images; raise num_ids")
        for i, image in enumerate(images):
            os.link(image, gallery / f"{i:05d}_{image.name}")
    captions = [r.caption for r in load_annotations("cuhkpedes", synth).train[:200]]
    return gallery, captions


def demo_checkpoint(work: Path, captions: list[str]) -> Path:
    from datasets.tokenizer import build_tokenizer, tokenizer_vocab
    from engine.checkpoints import checkpoint_dict
    from models.ivt import build_model

    path = work / "demo_random.pth"
    if not path.is_file():
        cfg = load_config(REPO / "configs" / "demo.yaml", ["data.num_workers=0"])
        tokenizer = build_tokenizer(cfg.text, captions)
        torch.manual_seed(0)
        atomic_save(checkpoint_dict(build_model(cfg).state_dict(), cfg.to_dict(),
                                    {"vocab": tokenizer_vocab(tokenizer), "lowercase": True}, epoch=0, step=0), path)
    return path


def time_queries(retriever, captions: list[str], single_runs: int, batch_runs: int) -> dict:
    queries = (QUERIES + captions)[:100]
    retriever.search(queries[0], k=10)  # warm-up
    single = []
    for i in range(single_runs):
        began = time.perf_counter()
        retriever.search(queries[i % len(queries)], k=10)
        single.append(time.perf_counter() - began)
    batch = []
    for _ in range(batch_runs):
        began = time.perf_counter()
        retriever.search(queries, k=10)
        batch.append(time.perf_counter() - began)
    out = {"one_query": percentiles(single), "batch_of_100": percentiles(batch)}
    out["batch_of_100"]["per_query_p50_ms"] = out["batch_of_100"]["p50_ms"] / len(queries)
    # the search alone: matrix product + top-k over the index, with the query already encoded
    feature = retriever.encode_query(queries[0])
    features = retriever.gallery.features
    alone = []
    for _ in range(single_runs):
        began = time.perf_counter()
        torch.topk(features @ feature, 10)
        alone.append(time.perf_counter() - began)
    out["index_only_one_query"] = percentiles(alone)
    return out


def first_answer(checkpoint: Path, gallery: Path, index_file: Path, out: Path) -> dict:
    """Seconds from process start to retrieve.py's first ranked line, and to its exit."""
    command = [sys.executable, str(REPO / "retrieve.py"), "--checkpoint", str(checkpoint), "--gallery", str(gallery),
               "--index-file", str(index_file), "--query", QUERIES[0], "--top-k", "10", "--device", "cpu",
               "--out", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": str(torch.get_num_threads())}  # the same threads as the in-process timings
    began = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    answer = None
    for line in process.stdout:
        if answer is None and line.strip().startswith("1 "):
            answer = time.perf_counter() - began
    stderr = process.stderr.read()
    process.wait()
    total = time.perf_counter() - began
    if process.returncode != 0:
        raise SystemExit(f"retrieve.py failed: {stderr[-2000:]}")
    return {"first_answer_s": answer, "exit_s": total, "reused_index": "reusing the gallery index" in stderr}


def base_model_rates(sample: list[str], captions: list[str], runs: int) -> dict:
    """Indexing rate and text latency of a ViT-B/BERT-base size model (random weights) on the CPU."""
    from datasets.tokenizer import build_tokenizer
    from engine.retrieval import Retriever
    from models.ivt import build_model

    cfg = load_config(None, BASE_OVERRIDES + ["eval.batch_size=16"])
    tokenizer = build_tokenizer(cfg.text, captions)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    retriever = Retriever(model, cfg, tokenizer, torch.device("cpu"), "bench")
    began = time.perf_counter()
    retriever.index(sample)
    rate = len(sample) / (time.perf_counter() - began)
    # a 10k gallery of its feature width, random, to time the queries end to end
    gallery = torch.nn.functional.normalize(torch.randn(10_000, cfg.model.embed_dim), dim=1)
    retriever.gallery.features = gallery
    retriever.gallery.paths = [f"img{i}" for i in range(len(gallery))]
    latency = time_queries(retriever, captions, runs, max(2, runs // 10))
    return {"parameters_M": sum(p.numel() for p in model.parameters()) / 1e6, "index_images_per_s": rate,
            "index_sample": len(sample), **latency}


def brute_force(sizes: list[int], dims: list[int], runs: int) -> list[dict]:
    rows = []
    for dim in dims:
        for size in sizes:
            features = torch.nn.functional.normalize(torch.randn(size, dim), dim=1)
            query = torch.nn.functional.normalize(torch.randn(dim), dim=0)
            batch = torch.nn.functional.normalize(torch.randn(100, dim), dim=1)
            torch.topk(features @ query, 10)
            one, hundred = [], []
            for _ in range(runs):
                began = time.perf_counter()
                torch.topk(features @ query, 10)
                one.append(time.perf_counter() - began)
            for _ in range(max(2, runs // 5)):
                began = time.perf_counter()
                torch.topk(batch @ features.t(), 10, dim=1)
                hundred.append(time.perf_counter() - began)
            rows.append({"images": size, "dim": dim, "index_MiB": features.numel() * 4 / 2**20,
                         "one_query_p50_ms": 1000 * statistics.median(one),
                         "batch_of_100_p50_ms": 1000 * statistics.median(hundred)})
            print(f"  brute force {size:>9,} x {dim}: {rows[-1]['one_query_p50_ms']:.2f} ms / query, "
                  f"{rows[-1]['batch_of_100_p50_ms']:.1f} ms / 100 queries", flush=True)
            del features
    return rows


def markdown(result: dict) -> str:
    demo, base, env = result["demo"], result["base"], result["environment"]
    ms = lambda d: f"{d['p50_ms']:.1f} / {d['p95_ms']:.1f}"  # noqa: E731
    lines = [
        f"# Person search on CPU ({result['images']:,} synthetic images)", "",
        f"Machine: {result['cpu_count']} CPU cores (torch threads {result['torch_threads']}), no GPU; "
        f"torch {env['torch']}, Python {env['python']}, commit {env['git_commit']}. "
        f"Command: `{result['command']}`. Load average (1/5/15 min) before: "
        + " / ".join(f"{x:.1f}" for x in result["load_average_before"]) + ", after: "
        + " / ".join(f"{x:.1f}" for x in result["load_average_after"])
        + " (above 2, other processes shared the two cores).", "",
        "| model | indexing | 1 query p50 / p95 | 100 queries p50 / p95 (per query) | index only, 1 query p50 / p95 |",
        "|---|---|---|---|---|",
        f"| demo ({demo['parameters_M']:.2f}M, 64x32) | {demo['index_images_per_s']:,.0f} img/s | "
        f"{ms(demo['one_query'])} ms | {ms(demo['batch_of_100'])} ms ({demo['batch_of_100']['per_query_p50_ms']:.2f}) | "
        f"{ms(demo['index_only_one_query'])} ms |",
        f"| ViT-B + BERT-base size ({base['parameters_M']:.0f}M, 384x128) | {base['index_images_per_s']:.1f} img/s "
        f"(sample of {base['index_sample']}) | {ms(base['one_query'])} ms | {ms(base['batch_of_100'])} ms "
        f"({base['batch_of_100']['per_query_p50_ms']:.1f}) | {ms(base['index_only_one_query'])} ms |", "",
        "Time from process start to the first answer of `retrieve.py` (demo model): "
        f"cold {result['first_answer']['cold']['first_answer_s']:.1f} s (encodes the folder), "
        f"with the index file {result['first_answer']['warm']['first_answer_s']:.1f} s "
        f"(reused: {result['first_answer']['warm']['reused_index']}).", "",
        "Brute-force search (matrix product + top-10) over random unit features:", "",
        "| images | width | index size | 1 query p50 | 100 queries p50 |", "|---|---|---|---|---|"]
    for row in result["brute_force"]:
        lines.append(f"| {row['images']:,} | {row['dim']} | {row['index_MiB']:,.0f} MiB | "
                     f"{row['one_query_p50_ms']:.2f} ms | {row['batch_of_100_p50_ms']:.1f} ms |")
    return "\n".join(lines) + "\n"


def set_faiss_threads(threads: int) -> None:
    try:
        import faiss
    except ImportError:
        return
    faiss.omp_set_num_threads(threads)


def one_off(args: argparse.Namespace) -> dict:
    """--nprobe-sweep, --open-check or --serve-check: one measurement."""
    from bench import search_scale

    if args.nprobe_sweep:
        return {"rows": search_scale.nprobe_sweep(Path(args.work), int(args.sizes), int(args.dims),
                                                  [int(n) for n in args.nprobe_sweep.split(",")],
                                                  args.expand_top, args.expand_nprobe,
                                                  [int(n) for n in args.rescore_sweep.split(",")])}
    if args.open_check:
        return search_scale.open_check(Path(args.open_check))
    if args.serve_breakdown:
        return search_scale.serve_breakdown(Path(args.work), args.serve_breakdown)
    return search_scale.serve_check(Path(args.work), args.serve_check, args.threads or torch.get_num_threads(),
                                    demo_checkpoint)


def scale_main(args: argparse.Namespace, argv: list[str] | None) -> dict:
    from bench import search_scale
    from utils.environment import environment_record

    if args.scale_phase:
        return search_scale.phase_main(args.scale_phase)
    command = "python -m bench.bench_search " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.serve_check or args.open_check or args.nprobe_sweep or args.serve_breakdown:
        out = {**one_off(args), "command": command, "environment": environment_record("cpu"),
               "threads": args.threads or torch.get_num_threads()}
        Path(args.scale_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.scale_out).with_suffix(".json").write_text(json.dumps(out, indent=1) + "\n")
        print(json.dumps(out))
        return out
    return search_scale.run_scale([int(s) for s in args.sizes.split(",")], [int(d) for d in args.dims.split(",")],
                                  Path(args.work), Path(args.scale_out), args.threads or torch.get_num_threads(),
                                  {"memory_budget_gib": 4.0}, command)


@user_errors_as_one_line()
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--checkpoint", default=None, help="default: the demo architecture with random weights")
    parser.add_argument("--work", default="runs/bench_search", help="gallery, index and checkpoint (scale: the "
                        "feature stores) go here")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "search_cpu"),
                        help="writes OUT.json and OUT.md")
    parser.add_argument("--runs", type=int, default=50, help="timed single queries (batches: runs / 10)")
    parser.add_argument("--base-sample", type=int, default=64, help="images indexed by the base-size model")
    parser.add_argument("--scaling", default="10000,100000,1000000", help="brute-force gallery sizes")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--scale", action="store_true", help="the scale mode: exact vs faiss at --sizes x --dims")
    parser.add_argument("--sizes", default="100000,1000000,10000000", help="scale mode: gallery sizes")
    parser.add_argument("--dims", default="768,128", help="scale mode: feature widths")
    parser.add_argument("--scale-out", default="bench/results/search_scale", help="scale mode: OUT.json, OUT.md")
    parser.add_argument("--scale-phase", nargs="+", default=None, help=argparse.SUPPRESS)  # one phase, internal
    parser.add_argument("--expand-top", type=int, default=0, help="--nprobe-sweep: search.expand_top")
    parser.add_argument("--expand-nprobe", type=int, default=16, help="--nprobe-sweep: search.expand_nprobe")
    parser.add_argument("--rescore-sweep", default="1000", metavar="R1,R2,...",
                        help="--nprobe-sweep: each search.rescore_candidates value at each nprobe")
    parser.add_argument("--nprobe-sweep", default=None, metavar="N1,N2,...",
                        help="recall and latency per search.nprobe over the built --sizes x --dims index")
    parser.add_argument("--serve-breakdown", type=int, default=0, metavar="N",
                        help="serve.py's start step by step on the --serve-check N-image index")
    parser.add_argument("--open-check", default=None, metavar="INDEX", help="time opening an index folder")
    parser.add_argument("--serve-check", type=int, default=0, metavar="N",
                        help="time serve.py from start to its first answer on an N-image index (scale mode's store)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
        set_faiss_threads(args.threads)
    if args.scale or args.scale_phase or args.serve_check or args.open_check or args.nprobe_sweep \
            or args.serve_breakdown:
        return scale_main(args, argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from engine.retrieval import Retriever
    from utils.environment import environment_record

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    gallery, captions = make_gallery(work, args.images)
    checkpoint = Path(args.checkpoint) if args.checkpoint else demo_checkpoint(work, captions)
    result = {"images": args.images, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
              "command": "python -m bench.bench_search " + " ".join(argv if argv is not None else sys.argv[1:]),
              "environment": environment_record("cpu"), "load_average_before": os.getloadavg()}

    retriever = Retriever.from_checkpoint(checkpoint, device="cpu", overrides=["data.num_workers=2"])
    began = time.perf_counter()
    retriever.index(gallery)
    rate = len(retriever.gallery) / (time.perf_counter() - began)
    print(f"demo: indexed {len(retriever.gallery):,} images at {rate:,.0f} img/s", flush=True)
    result["demo"] = {"parameters_M": sum(p.numel() for p in retriever.model.parameters()) / 1e6,
                      "index_images_per_s": rate, **time_queries(retriever, captions, args.runs,
                                                                 max(2, args.runs // 10))}
    print(f"demo: {json.dumps({k: v for k, v in result['demo'].items() if isinstance(v, dict)})}", flush=True)

    index_file = work / "gallery.index.pt"
    index_file.unlink(missing_ok=True)
    result["first_answer"] = {"cold": first_answer(checkpoint, gallery, index_file, work / "cold.png"),
                              "warm": first_answer(checkpoint, gallery, index_file, work / "warm.png")}
    print(f"first answer: {result['first_answer']}", flush=True)

    sample = sorted(str(p) for p in gallery.iterdir())[:args.base_sample]
    result["base"] = base_model_rates(sample, captions, max(10, args.runs // 5))
    print(f"base: {json.dumps(result['base'])}", flush=True)
    result["brute_force"] = brute_force([int(s) for s in args.scaling.split(",")], [128, 768], runs=20)

    result["load_average_after"] = os.getloadavg()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
