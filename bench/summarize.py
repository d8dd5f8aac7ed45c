"""Collect the JSON files bench/gpu_checks.sh wrote into one SUMMARY.md (the tables the README quotes).

    python -m bench.summarize bench/results/gpu_20270101_1200
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def _pct(x) -> str:
    return f"{100 * x:.1f}%" if isinstance(x, (int, float)) else "n/a"


def _load(folder: Path, name: str) -> dict | None:
    path = folder / name
    return json.loads(path.read_text()) if path.is_file() else None


def summarize(folder: Path) -> str:
    lines = [f"# Throughput checks: {folder.name}", ""]
    machine = None
    step_rows = []
    peaks = set()
    for path in sorted(folder.glob("step_*.json")):
        data = json.loads(path.read_text())
        machine = machine or data["machine"]
        step_rows += data["rows"]
        peaks.add(f"Peak used for MFU: {data['peak_tflops']} TFLOP/s ({data['peak_source']}).")
        m = data["machine"]
        lines.append(f"- {path.name}: {m['time']}, load average {[round(x, 1) for x in m['loadavg']]}, "
                     f"torch threads {m['torch_threads']}")
    lines += sorted(peaks)
    if machine:
        lines += ["", "Machine: " + ", ".join(f"{k}={v}" for k, v in machine.items()), ""]
    if step_rows:
        lines += ["## Training step (synthetic batches, optimizer_step as trained)", "",
                  "| variant | size | records | settings | step ms | pairs/s | TFLOP/step | TFLOP/s | MFU | peak GiB | "
                  "CUDA syncs/step |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in [r for r in step_rows if "error" in r]:
            lines.append(f"| {r['variant']} | {r['size']} | | failed: {r['error'][:120]} | | | | | | | |")
        step_rows = [r for r in step_rows if "error" not in r]
        for r in step_rows:
            settings = " ".join(r["overrides"]) + (f" compile={r['compile']}" if r["compile"] != "none" else "")
            syncs = f"{r['phases']['cuda_syncs_per_step']:.1f}" if r["device"].startswith("cuda") else "n/a (CPU)"
            lines.append(f"| {r['variant']} | {r['size']} | {r['records']} | {settings or 'defaults'} | {1e3 * r['step_s']:.1f} | "
                         f"{r['pairs_per_s']:.1f} | {r['TFLOP_per_step']:.4g} | {r['TFLOPs']:.4g} | {_pct(r['MFU'])} | "
                         f"{r['peak_GiB']:.2f} | {syncs} |")
        lines += ["", "Phase breakdown (ms per step, host / device or wall):", ""]
        for r in step_rows:
            ph = r["phases"]
            timed = ph.get("device_ms") or ph.get("wall_ms") or {}
            lines.append(f"- {r['variant']} ({r['size']}): " + ", ".join(
                f"{k} {ph['host_ms'][k]:.1f}/{timed.get(k, float('nan')):.1f}" for k in ph["host_ms"]))
        lines.append("")
    for name in sorted(folder.glob("e2e_*.json")):
        data = json.loads(name.read_text())
        for r in data["rows"]:
            how = "measured" if r["epoch_measured_whole"] else f"projected from {r['steps_timed']} steps"
            lines += [f"## End to end: {name.stem}", "",
                      f"- {r['records']} records, batch {r['batch']}, {r['steps_per_epoch']} steps/epoch, "
                      f"data.num_workers {r['num_workers']}, augment_on {r['augment_on']}, "
                      f"image_cache {r['image_cache']}",
                      f"- loader alone: {r['loader_alone_batches_per_s']:.2f} batches/s; with the model "
                      f"{r['step_s_with_loader']:.3f} s/step, {100 * r['data_wait_share']:.0f}% waiting for data, "
                      f"MFU {_pct(r['MFU'])}",
                      f"- epoch: {r['epoch_s'] / 60:.2f} min ({how}); start-up: " + ", ".join(
                          f"{k} {v:.1f}" for k, v in r["timings"].items()),
                      f"- evaluation (engine.evaluation, loader included): test {r['eval']['test']['seconds']:.1f} s "
                      f"({r['eval']['test']['counts']}), val {r['eval']['val']['seconds']:.1f} s",
                      f"- projected {r['epochs']} epochs (+ val each epoch + test): **{r['projected_total_h']:.2f} h**",
                      ""]
    data = _load(folder, "memory.json")
    if data:
        table = next((r["memory_table"] for r in data["rows"] if "memory_table" in r), [])
        lines += ["## Memory budgets", "", "| candidate | exact recipe | step ms | pairs/s | peak reserved GiB |",
                  "|---|---|---|---|---|"]
        for r in data["rows"]:
            if "variant" in r:
                lines.append(f"| {r['variant']} | {r.get('exact')} | {1e3 * r['step_s']:.1f} | {r['pairs_per_s']:.0f} | "
                             f"{r['peak_reserved_GiB'] if r['peak_reserved_GiB'] is None else round(r['peak_reserved_GiB'], 1)} |")
        if table:
            lines += ["", "| budget GB | fastest setting | exact | step ms | under the cap |", "|---|---|---|---|---|"]
            for t in table:
                step = f"{1e3 * t['step_s']:.1f}" if t["step_s"] else "-"
                lines.append(f"| {t['budget_GB']:g} | {t['choice']} | {t['exact']} | {step} | {t['verified']} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> None:
    folder = Path((argv or sys.argv[1:])[0])
    text = summarize(folder)
    (folder / "SUMMARY.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
