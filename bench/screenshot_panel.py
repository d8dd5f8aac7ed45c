"""The README's picture of the "why this person" panel: the web page in headless Chromium on a trained model.

    python -m bench.screenshot_panel --checkpoint runs/demo/best.pth --data-root runs/parts/classic-400 \
        --out docs/serve_why.png --record bench/results/screenshot_panel.json

The gallery is one split of a classic synthetic set with part maps (bench/bench_pointing.py writes one; default
the test split, 60 persons the model never saw). The query names one upper garment in the words of the classic
captions ("a person in a red coat"): ``--query`` gives it, or the first picture of the split (in annotation order)
is taken whose upper garment, described that way, brings back as #1 a person wearing that garment whose
contrastive heatmap peaks on a patch overlapping it (bench_pointing's overlap rule). The record says which
query, how it was chosen, and how many candidates were tried before it: a picture picked for showing a hit, not
a rate (the pointing game gives the rate). serve.py is started as the browser test starts it; the panel (and,
with ``--page-out``, the whole window) is photographed after a click on result #1.
"""
from __future__ import annotations

import argparse
import json
import shutil
import socket
import tempfile
import time
from pathlib import Path

import numpy as np

from utils.errors import UserError, user_errors_as_one_line


def _candidates(data_root: Path, split: str) -> tuple[list[str], dict[str, dict], dict[str, str]]:
    """The split's pictures (paths), what each shows (parts.json) and each file name's part-map name."""
    from datasets.readers import load_annotations
    from datasets.synthetic.writer import PARTS_FILE

    records = getattr(load_annotations("cuhkpedes", data_root), split)
    images = list(dict.fromkeys(r.image_path for r in records))
    described = json.loads((data_root / PARTS_FILE).read_text())["images"]
    names = {Path(p).name: Path(p).relative_to(data_root / "imgs").as_posix() for p in images}
    return images, described, names


def choose(checkpoint: str, data_root: Path, gallery: Path, split: str, query: str | None) -> dict:
    """The query to photograph and why: {query, tried, top1, peak_on_garment, top1_wears_it}."""
    from PIL import Image

    from bench.bench_pointing import cells, query_for
    from datasets.synthetic.drawing import PARTS
    from datasets.synthetic.writer import PARTS_DIR
    from engine.explanation import explain_with, gallery_baseline
    from engine.retrieval import Retriever

    retriever = Retriever.from_checkpoint(checkpoint, device="cpu")
    retriever.index(sorted(gallery.iterdir()))
    images, described, names = _candidates(data_root, split)
    baseline = gallery_baseline(retriever.model, retriever.cfg, "cpu", retriever.gallery.paths)
    asked = [query] if query else list(dict.fromkeys(query_for("upper", described[names[Path(p).name]]["upper"])
                                                     for p in images))
    for tried, text in enumerate(asked, 1):
        top = retriever.search(text, k=1)[0]
        name = names[Path(top.path).name]
        words = described[name].get("upper", "")
        why = explain_with(retriever.model, retriever.tokenizer, retriever.cfg, "cpu", text, top.path, baseline)
        parts = np.asarray(Image.open(data_root / PARTS_DIR / f"{name}.png"))
        on = cells(tuple(why.patch_map.shape), parts, PARTS.index("upper"))["overlap"]
        peak = bool(on.reshape(-1)[int(why.patch_map.argmax())])
        wears = bool(words) and query_for("upper", words) == text
        if query or (peak and wears):
            return {"query": text, "tried": tried, "top1": name, "top1_upper": words, "top1_wears_it": wears,
                    "peak_on_garment": peak, "top_words": why.top_words(), "summary": why.summary()}
    raise UserError(f"{data_root}: no query of the {split} split has a #1 wearing the garment with its heatmap's "
                    "peak on it")


def photograph(checkpoint: str, gallery: Path, text: str, out: Path, width: int, height: int,
               page_out: Path | None = None) -> None:
    """serve.py on ``gallery``; in headless Chromium (pixels doubled, for a sharp picture): type ``text``, search,
    click #1, photograph the "why this person" panel to ``out`` and the whole window to ``page_out``."""
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    import serve

    binary = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)),
                  None)
    driver = shutil.which("chromedriver")
    if not binary or not driver:
        raise UserError("headless Chromium or its driver is not installed (Debian: apt-get install chromium "
                        "chromium-driver)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app, url = serve.main(["--checkpoint", checkpoint, "--gallery", str(gallery), "--port", str(port),
                           "--device", "cpu", "--top-k", "8"], block=False)
    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={width},{height}", "--lang=en-US", "--force-device-scale-factor=2"):
        options.add_argument(arg)
    options.binary_location = binary
    browser = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver))
    try:
        wait = WebDriverWait(browser, 120)
        browser.get(url)
        box = wait.until(lambda b: b.find_element(By.CSS_SELECTOR, "#query textarea"))
        box.send_keys(text)
        browser.find_element(By.CSS_SELECTOR, "#search").click()
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#results figure img")) == 8)
        browser.find_elements(By.CSS_SELECTOR, "#results figure")[0].click()
        wait.until(lambda b: "Why #1 matches" in b.find_element(By.CSS_SELECTOR, "#why").text)
        wait.until(lambda b: b.execute_script("return [...document.querySelectorAll('#why img')].every("
                                              "(i) => i.complete && i.naturalWidth > 0)"))
        time.sleep(1)  # let the panel's layout settle before the picture
        out.parent.mkdir(parents=True, exist_ok=True)
        browser.find_element(By.CSS_SELECTOR, "#why").screenshot(str(out))
        if page_out is not None:
            browser.save_screenshot(str(page_out))
    finally:
        browser.quit()
        app.close()


@user_errors_as_one_line()
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data-root", required=True, help="a classic synthetic set with part maps")
    parser.add_argument("--split", default="test", choices=("val", "test"))
    parser.add_argument("--query", default=None, help="the description (default: chosen as the module doc says)")
    parser.add_argument("--out", default="docs/serve_why.png", help="the panel's picture (PNG)")
    parser.add_argument("--page-out", default=None, help="also the whole window's picture (PNG)")
    parser.add_argument("--record", default=None, help="JSON file: the query, how it was chosen, the machine")
    parser.add_argument("--size", default="1400,1000", help="the browser window, width,height")
    args = parser.parse_args(argv)
    import os
    import sys

    import torch

    torch.set_num_threads(1)
    root = Path(args.data_root)
    images, _, _ = _candidates(root, args.split)
    with tempfile.TemporaryDirectory() as work:
        gallery = Path(work) / "gallery"
        gallery.mkdir()
        for path in images:
            shutil.copy(path, gallery / Path(path).name)
        chosen = choose(args.checkpoint, root, gallery, args.split, args.query)
        width, height = (int(v) for v in args.size.split(","))
        photograph(args.checkpoint, gallery, chosen["query"], Path(args.out), width, height,
                   Path(args.page_out) if args.page_out else None)
    from utils.environment import environment_record

    record = {"command": "python -m bench.screenshot_panel " + " ".join(argv if argv is not None else sys.argv[1:]),
              "split": args.split, "gallery_images": len(images), **chosen, "picture": args.out,
              "environment": environment_record("cpu"), "load_average": [round(x, 2) for x in os.getloadavg()]}
    print(json.dumps({k: v for k, v in record.items() if k != "environment"}, indent=1))
    if args.record:
        Path(args.record).write_text(json.dumps(record, indent=1) + "\n")
    return record


if __name__ == "__main__":
    main()
