"""Search at scale: exact brute force and the faiss backend side by side over 100k, 1M and 10M gallery features.

    python -m bench.bench_search --scale --sizes 100000,1000000,10000000 --dims 768,128

The features are synthetic but shaped like a person-search gallery (``generate``): identities are clusters of
IMAGES_PER_ID images around a person's centre (cosine ~0.8 to it), persons share one of GROUPS attribute
directions (cosine ~0.36 between two persons of one group: the hard negatives of similar clothing), and every
query is a noisy view of one gallery person's centre (cosine ~0.6, as a caption is farther from an image than two
images of one person are). Random unit vectors would have no neighbours and flatter ANN recall. Rows are written
as float16 shards of an index folder (engine/gallery_index.py), chunk by chunk: 10M x 768 never sits in RAM.

Each size runs in subprocesses, so each phase's peak RSS is its own: ``build`` (the faiss index, by the project's
rules in engine/gallery_search.py), then ``query`` per backend (open the index, QUERIES_TIMED single queries
and batches of 64, recall@1 / recall@10 of the top 10 against the exact top 10 computed in one chunked pass).
Results land after every size in OUT.json / OUT.md.
"""
from __future__ import annotations

import importlib
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

IMAGES_PER_ID = 8
GROUPS = 1000
IMAGE_COS, QUERY_COS, GROUP_COS = 0.8, 0.6, 0.6  # cosine of image / query to its person; group weight in a centre
NUM_QUERIES = 200
QUERIES_TIMED = 100
GEN_ROWS = 262144  # rows generated at once (a multiple of IMAGES_PER_ID)
SHARD_ROWS = 1 << 20
DIGEST = "synthetic-features"


def noise_scale(cos: float, dim: int) -> float:
    """Per-coordinate std of Gaussian noise e such that cos(c + e, c) ~ ``cos`` for a unit c in ``dim`` dims."""
    return math.sqrt(1 / cos**2 - 1) / math.sqrt(dim)


def centres_block(start_person: int, count: int, groups: torch.Tensor, dim: int, seed: int) -> torch.Tensor:
    """Centres of persons start..start+count, drawn in one call (the per-person generator is for queries)."""
    gen = torch.Generator().manual_seed(seed * 7919 + start_person)
    own = torch.nn.functional.normalize(torch.randn(count, dim, generator=gen), dim=1)
    persons = torch.arange(start_person, start_person + count)
    return torch.nn.functional.normalize(GROUP_COS * groups[persons % GROUPS] + math.sqrt(1 - GROUP_COS**2) * own,
                                         dim=1)


def group_directions(dim: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(GROUPS, dim, generator=gen), dim=1)


def generate(size: int, dim: int, seed: int = 0):
    """Yields (paths, float16 features [<= SHARD_ROWS, dim]) parts of the synthetic gallery, and leaves the queries
    [NUM_QUERIES, dim] (float32) and their persons in ``generate.queries``."""
    groups = group_directions(dim, seed)
    rng = np.random.default_rng(seed + 1)
    persons = size // IMAGES_PER_ID
    chosen = np.sort(rng.choice(persons, NUM_QUERIES, replace=False))
    part, paths, queries = [], [], {}
    sigma_img, sigma_q = noise_scale(IMAGE_COS, dim), noise_scale(QUERY_COS, dim)
    for start in range(0, size, GEN_ROWS):
        rows = min(GEN_ROWS, size - start)
        first = start // IMAGES_PER_ID
        centres = centres_block(first, math.ceil(rows / IMAGES_PER_ID), groups, dim, seed)
        gen = torch.Generator().manual_seed(seed * 31 + start)
        block = centres.repeat_interleave(IMAGES_PER_ID, dim=0)[:rows]
        block = torch.nn.functional.normalize(block + sigma_img * torch.randn(rows, dim, generator=gen), dim=1)
        for p in chosen[(chosen >= first) & (chosen < first + len(centres))].tolist():
            qgen = torch.Generator().manual_seed(seed * 13 + p)
            queries[p] = torch.nn.functional.normalize(centres[p - first] + sigma_q * torch.randn(dim, generator=qgen),
                                                       dim=0)
        part.append(block.half().numpy())
        paths.extend(f"person{(start + i) // IMAGES_PER_ID:08d}/img{start + i:09d}.jpg" for i in range(rows))
        if len(paths) >= SHARD_ROWS or start + rows >= size:
            yield paths, np.concatenate(part)
            part, paths = [], []
    generate.queries = torch.stack([queries[p] for p in chosen.tolist()])
    generate.persons = chosen


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def folder_bytes(folder: Path, exclude: str | None = None) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and p.name != exclude)


def phase_store(work: Path, size: int, dim: int) -> dict:
    """Write the float16 store and the queries; the exact top 10 of every query in one chunked pass."""
    from engine.gallery_index import open_gallery, write_features_index
    from engine.gallery_search import exact_search

    folder = work / f"n{size}_d{dim}"
    began = time.perf_counter()
    if not (folder / "manifest.json").is_file():
        write_features_index(folder, generate(size, dim), DIGEST, "float16", source=f"synthetic {size} x {dim}")
        np.save(folder.parent / f"{folder.name}_queries.npy", generate.queries.numpy())
    store_s = time.perf_counter() - began
    queries = torch.from_numpy(np.load(folder.parent / f"{folder.name}_queries.npy"))
    began = time.perf_counter()
    gallery = open_gallery(folder, verify_max_mib=0)
    truth_scores, truth = exact_search(gallery, queries, 10, 262144)
    np.save(folder.parent / f"{folder.name}_truth.npy", truth.numpy())
    return {"store_s": store_s, "ground_truth_s": time.perf_counter() - began, "peak_rss_gib": peak_rss_gib(),
            "store_bytes": folder_bytes(folder, "ann.faiss"), "truth_top1_mean_cos": float(truth_scores[:, 0].mean())}


def phase_build(work: Path, size: int, dim: int, settings_json: str) -> dict:
    from engine.gallery_index import SearchSettings, open_gallery
    from engine.gallery_search import build_ann

    folder = work / f"n{size}_d{dim}"
    settings = SearchSettings(**json.loads(settings_json))
    began = time.perf_counter()
    entry = build_ann(open_gallery(folder, verify_max_mib=0), settings)
    return {"build_s": time.perf_counter() - began, "build_peak_rss_gib": peak_rss_gib(), "index_type": entry["factory"],
            "rule": entry["rule"], "ann_bytes": entry["bytes"], "trained_on": entry["trained_on"]}


def timed(fn, runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        began = time.perf_counter()
        fn()
        out.append(time.perf_counter() - began)
    return out


def recall(found: torch.Tensor, truth: np.ndarray) -> tuple[float, float]:
    found = found.numpy()
    at1 = float(np.mean(found[:, 0] == truth[:, 0]))
    at10 = float(np.mean([len(set(f[:10]) & set(t[:10])) / 10 for f, t in zip(found, truth)]))
    return at1, at10


def phase_query(work: Path, size: int, dim: int, backend: str, settings_json: str) -> dict:
    """Open the index (time, RSS), then single queries, batches of 64 and recall against the exact top 10."""
    from engine.gallery_index import SearchSettings, open_gallery
    from engine.gallery_search import search

    folder = work / f"n{size}_d{dim}"
    settings = SearchSettings(**{**json.loads(settings_json), "backend": backend})
    queries = torch.from_numpy(np.load(folder.parent / f"{folder.name}_queries.npy"))
    truth = np.load(folder.parent / f"{folder.name}_truth.npy")
    began = time.perf_counter()
    gallery = open_gallery(folder, verify_max_mib=0)
    first = search(gallery, queries[:1], 10, settings)  # opens the faiss index: part of the first answer
    first_s = time.perf_counter() - began
    slow = backend == "exact" and size * dim > 2e8
    single_runs, batch_runs = (3, 1) if slow else (QUERIES_TIMED, 3)
    found = torch.cat([search(gallery, queries[i:i + 64], 10, settings)[1] for i in range(0, len(queries), 64)]) \
        if not slow else None
    single = timed(lambda it=iter(range(10**9)): search(gallery, queries[next(it) % len(queries)][None], 10,
                                                        settings), single_runs)
    batch = timed(lambda: search(gallery, queries[:64], 10, settings), batch_runs)
    at1, at10 = recall(found, truth) if found is not None else (1.0, 1.0)
    del first
    ordered = sorted(single)
    return {"open_and_first_query_s": first_s, "p50_ms": 1000 * statistics.median(ordered),
            "p95_ms": 1000 * ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))],
            "single_runs": single_runs, "batch64_ms_per_query": 1000 * statistics.median(batch) / 64,
            "batch_runs": batch_runs, "recall_at_1": at1, "recall_at_10": at10,
            "recall_measured": found is not None, "peak_rss_gib": peak_rss_gib()}


def run_phase(args: list[str], threads: int) -> dict:
    """One phase in a fresh interpreter (its own peak RSS); its JSON is the last line it prints."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "bench.bench_search", "--scale-phase", *args, "--threads", str(threads)]
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed: {done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_size(work: Path, size: int, dim: int, settings: dict, threads: int) -> list[dict]:
    """Both backends at one size and width: the rows of the JSON output."""
    load_before = os.getloadavg()
    common = [str(work), str(size), str(dim)]
    store = run_phase(["store", *common], threads)
    print(f"  store {size:,} x {dim}: {json.dumps(store)}", flush=True)
    build = run_phase(["build", *common, json.dumps(settings)], threads)
    print(f"  build: {json.dumps(build)}", flush=True)
    rows = []
    for backend in ("exact", "faiss"):
        query = run_phase(["query", *common, backend, json.dumps(settings)], threads)
        print(f"  {backend}: {json.dumps(query)}", flush=True)
        faiss_row = backend == "faiss"
        rows.append({"num_gallery": size, "dim": dim, "backend": backend,
                     "index_type": build["index_type"] if faiss_row else "exact float16 memmap",
                     "recall_at_1": query["recall_at_1"], "recall_at_10": query["recall_at_10"],
                     "p50_ms": query["p50_ms"], "p95_ms": query["p95_ms"],
                     "batch64_ms_per_query": query["batch64_ms_per_query"], "peak_rss_gib": query["peak_rss_gib"],
                     "bytes_on_disk": store["store_bytes"] + (build["ann_bytes"] if faiss_row else 0),
                     "build_s": build["build_s"] if faiss_row else store["store_s"],
                     "details": {"query": query, "build": build if faiss_row else None, "store": store},
                     "load_average_before": load_before, "load_average_after": os.getloadavg()})
    return rows


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [f"# Search at scale on CPU ({result['threads']} threads, {result['cpu_count']} cores, no GPU)", "",
             f"Command: `{result['command']}`; commit {env.get('git_commit')}; torch {env.get('torch')}, faiss "
             f"{result['faiss']}, numpy {np.__version__}, Python {env.get('python')}. Synthetic features "
             "(bench/search_scale.py: identities of 8 images, 1000 attribute groups, queries near their person), "
             "stored as float16. Exact rows at 10M time 3 single queries and 1 batch and take recall as 1 by "
             "definition (the ground truth is the exact search). build_s of an exact row is writing its store "
             "(generation included); of a faiss row, training + adding + writing the faiss index.", "",
             "| images | dim | backend | index | recall@1 | recall@10 | p50 ms | p95 ms | batch64 ms/query | peak RSS "
             "GiB | disk GiB | build s | load before -> after |", "|" + "---|" * 13]
    for r in result["rows"]:
        lines.append(f"| {r['num_gallery']:,} | {r['dim']} | {r['backend']} | {r['index_type']} | "
                     f"{r['recall_at_1']:.3f} | {r['recall_at_10']:.3f} | {r['p50_ms']:.2f} | {r['p95_ms']:.2f} | "
                     f"{r['batch64_ms_per_query']:.2f} | {r['peak_rss_gib']:.2f} | {r['bytes_on_disk'] / 2**30:.2f} | "
                     f"{r['build_s']:.0f} | {r['load_average_before'][0]:.1f} -> {r['load_average_after'][0]:.1f} |")
    return "\n".join(lines) + "\n"


def run_scale(sizes: list[int], dims: list[int], work: Path, out: Path, threads: int, settings: dict,
              command: str) -> dict:
    import faiss

    from utils.environment import environment_record

    result = {"command": command, "threads": threads, "cpu_count": os.cpu_count(), "faiss": faiss.__version__,
              "environment": environment_record("cpu"), "settings": settings, "rows": []}
    out.parent.mkdir(parents=True, exist_ok=True)
    for dim in dims:
        for size in sizes:
            print(f"{size:,} x {dim} (load {os.getloadavg()})", flush=True)
            result["rows"].extend(run_size(work, size, dim, settings, threads))
            out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
            out.with_suffix(".md").write_text(markdown(result))
    return result


def phase_main(args: list[str]) -> dict:
    """``--scale-phase NAME WORK SIZE DIM [...]``: one phase, its JSON printed as the last line."""
    name, work, size, dim, rest = args[0], Path(args[1]), int(args[2]), int(args[3]), args[4:]
    if name == "store":
        out = phase_store(work, size, dim)
    elif name == "build":
        out = phase_build(work, size, dim, rest[0])
    else:
        out = phase_query(work, size, dim, rest[0], rest[1])
    print(json.dumps(out))
    return out


def serve_index(work: Path, size: int, demo_checkpoint) -> tuple[Path, Path]:
    """A demo-architecture checkpoint (random weights, by ``demo_checkpoint(work, captions)``) and a ``size``-image
    index of its width whose rows point at a few real synthetic pictures (thumbnails), with the faiss index the
    rules pick: what serve.py opens."""
    from datasets.readers import load_annotations
    from datasets.synthetic import make_synthetic
    from engine.gallery_index import SearchSettings, open_gallery, write_features_index
    from engine.gallery_search import build_ann
    from engine.retrieval import Retriever

    synth = work / "serve_synth"
    if not (synth / "SYNTHETIC.json").is_file():
        make_synthetic("cuhkpedes", synth, num_ids=40, seed=0)
    checkpoint = demo_checkpoint(work, [r.caption for r in load_annotations("cuhkpedes", synth).train])
    retriever = Retriever.from_checkpoint(checkpoint, device="cpu")
    folder = work / f"serve_n{size}"
    if not (folder / "manifest.json").is_file():
        pictures = sorted(str(p.resolve()) for p in (synth / "imgs").rglob("*.jpg"))
        dim = int(retriever.cfg.model.embed_dim)
        parts = ((paths and [pictures[i % len(pictures)] for i in range(len(paths))], feats)
                 for paths, feats in generate(size, dim))
        write_features_index(folder, parts, retriever.digest, "float16", source=f"synthetic {size} x {dim}")
        build_ann(open_gallery(folder, 0), SearchSettings())
    return checkpoint, folder


def serve_check(work: Path, size: int, threads: int, demo_checkpoint) -> dict:
    """Seconds from starting ``python serve.py --gallery INDEX`` to the page's first answer (through its HTTP API)."""
    import socket

    from gradio_client import Client

    checkpoint, folder = serve_index(work, size, demo_checkpoint)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    load = os.getloadavg()
    began = time.perf_counter()
    server = subprocess.Popen([sys.executable, "serve.py", "--checkpoint", str(checkpoint), "--gallery", str(folder),
                               "--port", str(port), "--device", "cpu"], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    try:
        answer, listening = None, None
        while answer is None and time.perf_counter() - began < 300 and server.poll() is None:
            try:
                client = Client(f"http://127.0.0.1:{port}/", verbose=False)
                listening = listening or time.perf_counter() - began
                answer = client.predict("a woman in a red coat", 10, False, api_name="/on_text")
            except Exception:  # not listening yet: the page is still starting
                time.sleep(0.2)
        answered = time.perf_counter() - began
    finally:
        server.terminate()
        stderr = server.communicate(timeout=60)[1]
    if answer is None:
        raise SystemExit(f"serve.py gave no answer: {stderr[-2000:]}")
    return {"num_gallery": size, "index": str(folder.name), "client_connected_s": listening,
            "first_answer_s": answered, "load_average_before": load, "load_average_after": os.getloadavg(),
            "answer_excerpt": str(answer)[:300]}


def open_check(folder: Path) -> dict:
    """Seconds and peak RSS to open an index (imports apart) and read its last path: what a 10M index costs."""
    began = time.perf_counter()
    from engine.gallery_index import open_gallery

    imported = time.perf_counter()
    gallery = open_gallery(folder, verify_max_mib=0)
    last = gallery.paths[len(gallery) - 1]
    opened = time.perf_counter()
    return {"index": folder.name, "count": len(gallery), "dim": gallery.dim, "dtype": str(gallery.arrays[0].dtype),
            "shards": len(gallery.arrays), "import_s": imported - began, "open_s": opened - imported,
            "last_path": last, "peak_rss_gib": peak_rss_gib(), "bytes_on_disk": gallery.bytes_on_disk(),
            "load_average": os.getloadavg()}


def nprobe_sweep(work: Path, size: int, dim: int, values: list[int], expand_top: int = 0,
                 expand_nprobe: int = 16, rescore: list[int] = (1000,)) -> list[dict]:
    """Recall@1/@10 against exact search and p50 per single query for each ``search.nprobe`` (no effect on an index
    without lists) and ``search.rescore_candidates`` over a built index (``search.expand_top`` as given)."""
    from engine.gallery_index import SearchSettings, open_gallery
    from engine.gallery_search import search

    folder = work / f"n{size}_d{dim}"
    queries = torch.from_numpy(np.load(folder.parent / f"{folder.name}_queries.npy"))
    truth = np.load(folder.parent / f"{folder.name}_truth.npy")
    gallery = open_gallery(folder, verify_max_mib=0)
    rows = []
    for nprobe in values:
        for candidates in rescore:
            settings = SearchSettings(backend="faiss", nprobe=nprobe, expand_top=expand_top,
                                      expand_nprobe=expand_nprobe, rescore_candidates=candidates)
            found = torch.cat([search(gallery, queries[i:i + 64], 10, settings)[1]
                               for i in range(0, len(queries), 64)])
            single = timed(lambda it=iter(range(10**9)): search(gallery, queries[next(it) % len(queries)][None], 10,
                                                                settings), 50)
            at1, at10 = recall(found, truth)
            rows.append({"num_gallery": size, "dim": dim, "index_type": gallery.manifest["ann"]["factory"],
                         "nprobe": nprobe, "rescore_candidates": candidates, "expand_top": expand_top,
                         "expand_nprobe": expand_nprobe, "recall_at_1": at1, "recall_at_10": at10,
                         "p50_ms": 1000 * statistics.median(single), "load_average": os.getloadavg()})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def serve_breakdown(work: Path, size: int) -> dict:
    """Where serve.py's start goes, step by step in one fresh process: imports, model, index, first and second
    search. Run it as the first thing a process does (the imports are timed)."""
    steps, last = {}, time.perf_counter()

    def step(name: str) -> None:
        nonlocal last
        now = time.perf_counter()
        steps[name] = now - last
        last = now

    importlib.import_module("gradio")  # timed: serve.py imports it at start
    step("import gradio")
    from engine.retrieval import Retriever
    importlib.import_module("engine.webapp")
    step("import engine.retrieval + engine.webapp")
    retriever = Retriever.from_checkpoint(work / "demo_random.pth", device="cpu")
    step("load the model")
    retriever.use_gallery(work / f"serve_n{size}")
    step("open the index")
    retriever.search("a woman in a red coat", k=10)
    step("first search (opens the faiss index)")
    retriever.search("a man in a black jacket", k=10)
    step("second search")
    return {"num_gallery": size, "steps_s": steps, "load_average": os.getloadavg(), "peak_rss_gib": peak_rss_gib()}
