"""The person-search web page behind serve.py: a Gradio app over one Retriever and one gallery index.

The gallery is encoded once at start-up (with a progress bar, or read from ``--index-file``) and every request
reuses it. :class:`SearchPage` holds the page's logic without Gradio; its handlers return what the page shows
and never raise, so a bad input (an empty or huge query, a file that is not an image) ends as a message on the
page, never as a stack trace; an unexpected error is logged with its traceback on the server only.
"""
from __future__ import annotations

import argparse
import html
import importlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from utils.errors import UserError, user_errors_as_one_line

logger = logging.getLogger(__name__)

MAX_QUERY_CHARS = 2000  # longer text is refused: the model reads only text.max_text_len tokens of it anyway
MAX_TOP_K = 50
MAX_UPLOAD = "20mb"  # the largest photo the page accepts (larger uploads are refused before they are stored)
DEFAULT_PORT = 7860

THUMB_HEIGHT = 256  # results travel inside the page as JPEG thumbnails of at most this height
# The results: a grid that wraps to the window (no horizontal scrolling on a phone), each image whole (letterboxed,
# never cropped) with its label under it, never over it. #why-index is the hidden box a click on a result writes.
CSS = """
#results .ivt-grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(104px, 1fr)); gap: 10px; }
#results figure { margin: 0; cursor: pointer; border: 2px solid transparent; border-radius: 6px; padding: 2px; }
#results figure:hover, #results figure.ivt-picked { border-color: var(--color-accent, #f97316); }
#results img { display: block; width: 100%; height: 220px; object-fit: contain; background: #f4f4f5; }
#results figcaption { font-size: 0.78rem; text-align: center; line-height: 1.25; white-space: pre-line;
                      overflow-wrap: anywhere; padding-top: 3px; }
#why img { display: inline-block; width: 46%; height: 240px; object-fit: contain; margin: 0 3% 0 0; }
#why .ivt-word { padding: 0 2px; border-radius: 3px; }
#why-index { display: none; }
#message p { margin: 0.2rem 0; }
"""
# Clicking a result writes its index into the hidden #why-index box; the change of its value asks the server why
# (a new query resets the box, so the same result can be asked about again).
RESULTS_JS = """
element.addEventListener('click', (event) => {
  const card = event.target.closest('figure[data-index]');
  if (!card) return;
  element.querySelectorAll('figure.ivt-picked').forEach((f) => f.classList.remove('ivt-picked'));
  card.classList.add('ivt-picked');
  const box = document.querySelector('#why-index textarea, #why-index input');
  box.value = card.dataset.index;
  box.dispatchEvent(new Event('input', {bubbles: true}));
  // on a phone the panel sits below the results, off-screen: bring it into view once its content arrives
  const why = document.querySelector('#why');
  const place = why.getBoundingClientRect();
  if (place.top > window.innerHeight - 40 || place.bottom < 0) {
    const observer = new MutationObserver(() => {
      if (!why.querySelector('h3')) return;
      observer.disconnect();
      why.scrollIntoView({block: 'start'});
    });
    observer.observe(why, {childList: true, subtree: true, characterData: true});
  }
});
"""


class ServeError(UserError, RuntimeError):
    """serve.py cannot start (a missing optional dependency, a bad address)."""


@dataclass
class Shown:
    """What one request puts on the page: gallery items (image path, caption), a message (Markdown) and, for a
    text query, the text (the "why this person" panel explains against it)."""

    items: list[tuple[str, str]]
    message: str
    text: str | None = None


def data_uri(image: Any, height: int = THUMB_HEIGHT) -> str:
    """A PIL image as a JPEG data URI, scaled down to at most ``height`` pixels high."""
    import base64
    import io

    from PIL import ImageOps

    image = image.convert("RGB")
    if image.height > height:
        image = ImageOps.contain(image, (max(1, image.width * height // image.height), height))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=88)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _thumbnail_uri(path: str) -> str:
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as image:
            return data_uri(ImageOps.exif_transpose(image))
    except (OSError, ValueError):
        return ""


def results_html(items: Sequence[tuple[str, str]]) -> str:
    """The ranked images as a wrapping grid; each label under its image; a click asks why it matches."""
    if not items:
        return ""
    cards = [f'<figure data-index="{i}" title="click: why this person?"><img src="{_thumbnail_uri(path)}" '
             f'alt="{html.escape(label)}"><figcaption>{html.escape(label)}</figcaption></figure>'
             for i, (path, label) in enumerate(items)]
    return '<div class="ivt-grid">' + "".join(cards) + "</div>"


def why_html(explanation: Any, rank: int) -> str:
    """The "why this person" panel: the image, the image with its heatmap, the split and the words by share."""
    from PIL import Image

    from utils.visualize import heat_overlay

    esc = html.escape
    with Image.open(explanation.image_path) as image:
        image = image.convert("RGB")
        plain, heat = data_uri(image, 300), data_uri(heat_overlay(image, explanation.patch_map), 300)
    scale = max((abs(s) for _, s in explanation.words), default=0.0) or 1.0
    words = " ".join(
        f'<span class="ivt-word" title="{share:+.4f}" style="background: rgba('
        f'{"230,30,30" if share >= 0 else "30,90,230"},{0.75 * abs(share) / scale:.2f})">{esc(word)}</span>'
        for word, share in explanation.words)
    against = (f" above {explanation.baseline}" if explanation.baseline_score is not None else "")
    return (f"<h3>Why #{rank} matches</h3><div><img src=\"{plain}\" alt=\"result #{rank}\">"
            f"<img src=\"{heat}\" alt=\"heatmap of result #{rank}\"></div>"
            f"<p>Red regions raise the score for the description{against}, blue ones lower it; words are shaded "
            f"the same way.</p><p class=\"ivt-words\">{words}</p><p>{esc(explanation.summary())}.</p>")


def caption(hit: Any) -> str:
    """The caption under a result: rank and cosine score (and ITM score when re-ranked), then the file name."""
    itm = f" itm {hit.itm_score:+.2f}" if getattr(hit, "itm_score", None) is not None else ""
    return f"#{hit.rank}  {hit.score:.3f}{itm}\n{Path(hit.path).name}"


class SearchPage:
    """The handlers of the page, independent of Gradio (tested directly and through a browser)."""

    def __init__(self, retriever: Any, provenance: dict, default_k: int = 10, min_score: float | None = None):
        self.retriever = retriever
        self.provenance = provenance
        self.default_k = max(1, min(int(default_k), MAX_TOP_K))
        # the "no good match" rule: min_score (a cosine) when given, else the one carried with the model
        # (engine.calibration, measured on val), else the cosine threshold of older exports' test metrics
        self.no_match = (no_match_rule_of(getattr(retriever, "info", {}) or {}, provenance) if min_score is None
                         else {"rule": "cosine", "thresholds": {"cosine": fixed_threshold(float(min_score))},
                               "source": "the server's setting"})
        cosine = (self.no_match or {}).get("thresholds", {}).get("cosine")
        self.min_score = cosine["values"][-1] if cosine else None  # for a whole caption
        self._baseline: tuple[Any, Any] | None = None  # (the gallery, its contrastive baseline), made on first use

    def _k(self, k: Any) -> int:
        try:
            return max(1, min(int(k), MAX_TOP_K))
        except (TypeError, ValueError):
            return self.default_k

    def search_text(self, query: str | None, k: Any = None, rerank: bool = False) -> Shown:
        text = (query or "").strip()
        if not text:
            return Shown([], "**Type a description** of the person to search for, e.g. *a woman in a red coat "
                             "with a black backpack*.")
        if len(text) > MAX_QUERY_CHARS:
            return Shown([], f"**The description is too long** ({len(text):,} characters; at most "
                             f"{MAX_QUERY_CHARS:,}). The model reads only its first "
                             f"{self.retriever.cfg.text.max_text_len} tokens; shorten it.")
        shown = self._run(lambda: self.retriever.search(text, k=self._k(k), rerank=bool(rerank)),
                          f"“{html.escape(text)}”", text)
        shown.text = text if shown.items else None
        return shown

    def explain(self, text: str | None, items: Sequence[tuple[str, str]], index: Any) -> str:
        """The "why this person" panel (HTML) of result ``index`` of the text query ``text``; a line on a failure."""
        try:
            index = int(index)
        except (TypeError, ValueError):
            return ""
        if not text or not 0 <= index < len(items):
            return "<p>Click a result of a description to see why it matches.</p>"
        try:
            return why_html(self._explain(text, items[index][0]), index + 1)
        except UserError as exc:
            return f"<p><b>Cannot explain:</b> {html.escape(str(exc))}</p>"
        except Exception:  # a bug: full traceback in the server log, one line on the page
            logger.exception("explanation failed")
            return "<p><b>Internal error</b> while explaining; the server log has the details.</p>"

    def _explain(self, text: str, path: str) -> Any:
        """Why ``path`` ranks above the gallery's average picture for ``text`` (contrastive; the plain split of the
        score for a model whose explanation is not contrastive)."""
        from engine.explanation import explain_with, gallery_baseline
        from engine.retrieval import open_query_image

        r = self.retriever
        open_query_image(path)  # a missing or undecodable file is a QueryError, as for a search
        if self._baseline is None or self._baseline[0] is not r.gallery:
            self._baseline = (r.gallery, gallery_baseline(r.model, r.cfg, r.device, r.gallery.paths))
        return explain_with(r.model, r.tokenizer, r.cfg, r.device, text, path, self._baseline[1])

    def search_image(self, image: str | None, k: Any = None) -> Shown:
        if not image:
            return Shown([], "**Upload a photo** of a person to find similar images.")
        name = Path(str(image)).name
        return self._run(lambda: self.retriever.search_image(str(image), k=self._k(k)),
                         f"the photo {html.escape(name)}", None, {str(image): name})

    def _run(self, search, label: str, text: str | None, rename: dict[str, str] | None = None) -> Shown:
        try:
            results = search()
        except UserError as exc:
            said = " ".join(str(exc).split())
            for path, name in (rename or {}).items():  # an upload's temporary path means nothing to the user
                said = said.replace(path, name)
            return Shown([], f"**Cannot search:** {html.escape(said)}")
        except Exception:  # a bug: full traceback in the server log, one line on the page
            logger.exception("search failed")
            return Shown([], "**Internal error** while searching; the server log has the details.")
        ranked_by = "ITM re-ranking" if results and results[0].itm_score is not None else "cosine similarity"
        lines = [f"Top {len(results)} of {len(self.retriever.gallery)} images for {label}, ranked by {ranked_by}. "
                 "Scores are cosine similarities of the features (1 = same direction), not probabilities."]
        flagged = self._no_good_match(text) if text and results else None
        if flagged:
            lines.insert(0, flagged)
        unknown = self.retriever.out_of_vocabulary(text) if text else []
        if unknown:
            reason = self.retriever.unknown_reason()
            lines.append(f"Not in the model's vocabulary ({reason}, so they count little): "
                         f"{html.escape(', '.join(unknown))}.")
        return Shown([(r.path, caption(r)) for r in results], "\n\n".join(lines))


    def _no_good_match(self, text: str) -> str | None:
        """The "no good match" message when the best image does not stand out enough or scores too low, else None."""
        from engine.calibration import is_no_match, word_count

        words = {w for w in re.findall(r"\w+", text.lower()) if len(w) > 1}
        if words and words <= {w.lower() for w in self.retriever.out_of_vocabulary(text)}:
            return ("**No good match.** The model knows none of the words of this description, so it cannot read "
                    "it; these images are ranked by noise.")
        rule = self.no_match
        if not rule:
            return None
        scores = self.retriever.encode_query(text) @ self.retriever.gallery.features.t()  # [G]
        no_match, stats, limits = is_no_match(scores, rule, word_count(text))
        if not no_match:
            return None
        said = []
        if stats.get("zscore", float("inf")) < limits.get("zscore", float("-inf")):
            said.append(f"the best image stands out from the rest of this gallery by {stats['zscore']:.2f} standard "
                        f"deviations, less than {limits['zscore']:.2f}")
        if stats.get("cosine", float("inf")) < limits.get("cosine", float("-inf")):
            said.append(f"the best score, {stats['cosine']:.3f}, is below {limits['cosine']:.3f}")
        share = f"{1 - float(rule.get('quantile') or 0.05):.0%}"
        return (f"**No good match.** {'; '.join(said).capitalize()}: marks {share} of the right answers reach "
                f"({rule['source']}). Nobody here looks much like the description; these are the closest images.")


def no_match_rule_of(info: dict, provenance: dict) -> dict | None:
    """The model's "no good match" rule: the calibration its checkpoint or folder carries, else (older exports)
    the cosine threshold of its test metrics; None when neither is known."""
    carried = (info.get("calibration") or {}).get("no_match") or {}
    if isinstance(carried.get("thresholds"), dict) and carried["thresholds"]:
        return {**carried, "source": "measured on the validation split with short descriptions"}
    legacy = match_threshold_of(provenance)
    if legacy is None:
        return None
    return {"rule": "cosine", "thresholds": {"cosine": fixed_threshold(legacy)}, "quantile": 0.05,
            "source": "measured on the test split with whole captions"}


def fixed_threshold(value: float) -> dict:
    """One threshold for queries of any length, in the form engine.calibration.threshold_at reads."""
    return {"words": [0.0, 0.0], "values": [value, value]}


def match_threshold_of(provenance: dict) -> float | None:
    """The model's "no good match" threshold, measured by evaluation on its test split (None when unknown)."""
    measured = (provenance.get("metrics") or {}).get("test", {}).get("match_threshold") or {}
    value = measured.get("value") if isinstance(measured, dict) else None
    return float(value) if isinstance(value, (int, float)) else None


# ------------------------------------------------------------------------------------------ provenance
def gather_provenance(retriever: Any, checkpoint: str, gallery: str, index_file: str | None) -> dict:
    """Where the model came from: checkpoint, format, training state, recipe, test metrics, and the gallery."""
    from engine.exporting import find_metrics
    from engine.model_folder import CONFIG_FILE, is_model_folder
    from utils.checkpoint import model_epoch

    cfg, info = retriever.cfg, retriever.info
    path = Path(checkpoint)
    metrics: dict = {}
    kind = info.get("format")
    if is_model_folder(path):
        kind = "model folder"
        metrics = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8")).get("metrics", {})
    elif path.is_file():
        try:
            metrics = find_metrics(path)
        except UserError as exc:  # an unreadable metrics file only hides the metrics
            logger.warning("no metrics for the page: %s", exc)
    model = cfg.model
    return {
        "checkpoint": str(path), "format": kind, "epoch": model_epoch(info), "step": info.get("step"),
        "task": cfg.task, "dataset": f"{cfg.data.format} ({cfg.data.root})",
        "model": (f"width {model.embed_dim}, {model.depth} layers, {model.num_heads} heads, "
                  f"{model.fusion_layers} fusion layers, input {cfg.input.image_size[0]}x{cfg.input.image_size[1]}"),
        "tokenizer": str(cfg.text.tokenizer) if cfg.text.tokenizer != "train" else "learnt from the captions",
        "config_digest": cfg.digest(),
        "metrics": metrics,
        "gallery": gallery, "gallery_images": len(retriever.gallery) if retriever.gallery else 0,
        "skipped_images": len(retriever.gallery.skipped) if retriever.gallery else 0, "index_file": index_file,
    }


def provenance_markdown(p: dict) -> str:
    esc = html.escape
    lines = ["### Model", f"- checkpoint: `{esc(p['checkpoint'])}` ({esc(str(p['format']))}, epoch {p['epoch']} "
             "as numbered in the training log, "
             f"step {p['step']})", f"- recipe: task {esc(p['task'])} on {esc(p['dataset'])}",
             f"- model: {esc(p['model'])}", f"- tokenizer: {esc(p['tokenizer'])}",
             f"- config digest: `{p['config_digest']}`", "", "### Evaluation metrics"]
    shown = False
    for split, result in p["metrics"].items():
        for key, label in (("t2i", "text-to-image"), ("t2i_rerank", "re-ranked"), ("i2t", "image-to-text")):
            m = result.get(key)
            if m:
                shown = True
                lines.append(f"- {esc(split)} {label}: R@1 {m['R1']:.2f}, R@5 {m['R5']:.2f}, R@10 {m['R10']:.2f}, "
                             f"mAP {m['mAP']:.2f}")
    if not shown:
        lines.append("- none found beside the checkpoint (metrics_test.json)")
    lines += ["", "### Gallery", f"- `{esc(p['gallery'])}`: {p['gallery_images']} images"
              + (f", {p['skipped_images']} unreadable skipped" if p["skipped_images"] else ""),
              f"- index file: `{esc(p['index_file'])}`" if p["index_file"] else "- index: in memory"]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- app
def build_app(page: SearchPage):
    """The Gradio Blocks of the page (not launched)."""
    import gradio as gr

    has_fusion = bool(page.retriever.has_fusion)
    default_rerank = has_fusion and int(page.retriever.cfg.eval.rerank_top_k) > 0
    with gr.Blocks(title="IVT person search", analytics_enabled=False) as app:
        gr.Markdown("## Person search\nDescribe a person in words, or upload a photo, to rank the gallery.")
        with gr.Row():
            with gr.Column(scale=3, min_width=300):
                query = gr.Textbox(label="Description (Enter searches)", lines=1, max_lines=4, elem_id="query",
                                   placeholder="a woman in a red coat and black pants with a black backpack")
                with gr.Row():
                    search = gr.Button("Search", variant="primary", elem_id="search")
                    top_k = gr.Slider(1, MAX_TOP_K, value=page.default_k, step=1, label="top-k", elem_id="top-k")
                    rerank = gr.Checkbox(value=default_rerank, interactive=has_fusion, elem_id="rerank",
                                         label="re-rank with the ITM head" if has_fusion
                                         else "re-rank (this model has no ITM head)")
                message = gr.Markdown(elem_id="message")
                results = gr.HTML(elem_id="results", js_on_load=RESULTS_JS)
                why_index = gr.Textbox(elem_id="why-index", show_label=False, container=False)
            with gr.Column(scale=1, min_width=260):
                why = gr.HTML(elem_id="why")
                upload = gr.File(label="…or search by a photo", type="filepath", elem_id="upload")
                shown_photo = gr.Image(label="query photo", interactive=False, height=180, elem_id="query-photo")
                gr.Markdown(provenance_markdown(page.provenance), elem_id="provenance")
        shown_state = gr.State(Shown([], ""))

        def on_text(text, k, rr):  # a new query closes the previous "why" panel
            shown = page.search_text(text, k, rr)
            return results_html(shown.items), shown.message, shown, "", ""

        def on_image(file, k):
            shown = page.search_image(file, k)
            photo = file if shown.items else None
            return results_html(shown.items), shown.message, photo, shown, "", ""

        def on_why(index, shown):
            return page.explain(shown.text, shown.items, index)

        text_outputs = [results, message, shown_state, why, why_index]
        search.click(on_text, [query, top_k, rerank], text_outputs)
        query.submit(on_text, [query, top_k, rerank], text_outputs)
        upload.upload(on_image, [upload, top_k], [results, message, shown_photo, shown_state, why, why_index])
        why_index.change(on_why, [why_index, shown_state], [why])
    return app


# ------------------------------------------------------------------------------------------------- CLI
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="A local web page to search a gallery by description or photo.")
    parser.add_argument("--checkpoint", required=True, help="our .pth checkpoint or a model folder (engine.export)")
    parser.add_argument("--gallery", required=True, help="image folder, or an index made with --index-file")
    parser.add_argument("--index-file", default=None, help="cache the folder's features here and reuse them")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--top-k", type=int, default=10, help="the top-k control's initial value")
    parser.add_argument("--strict", action="store_true", help="fail on an unreadable image instead of skipping it")
    parser.add_argument("--config", default=None, help="recipe YAML (needed for the authors' checkpoints)")
    parser.add_argument("--device", default=None, choices=("cuda", "cpu"), help="default: cuda when available")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None, block: bool = True):
    """Load the model, index the gallery once, serve the page; returns (app, url) when ``block`` is False."""
    args = parse_args(argv)
    from utils.logging_utils import setup_logging

    setup_logging(None)
    with user_errors_as_one_line():
        if not 0 < args.port < 65536:
            raise ServeError(f"--port {args.port} is not a TCP port; choose one in 1-65535 (default {DEFAULT_PORT})")
        os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
        try:
            importlib.import_module("gradio")
        except ImportError:
            raise ServeError("serve.py needs gradio: pip install -r requirements-serve.txt") from None
        from engine.retrieval import Retriever

        retriever = Retriever.from_checkpoint(args.checkpoint, args.device, args.config, args.overrides)
        retriever.use_gallery(args.gallery, index_file=args.index_file, strict=args.strict, progress=True)
        page = SearchPage(retriever, gather_provenance(retriever, args.checkpoint, args.gallery, args.index_file),
                          args.top_k)
        app = build_app(page)
        try:
            _, url, _ = app.launch(server_name=args.host, server_port=args.port, prevent_thread_lock=not block,
                                   # no file of the gallery's folders is served: results travel inside the page
                                   # as thumbnails, and listing millions of paths for Gradio took seconds
                                   allowed_paths=[], share=False,
                                   max_file_size=MAX_UPLOAD,
                                   ssr_mode=False, quiet=not block, css=CSS, footer_links=[])
        except OSError as exc:  # the port is taken, or the address is not this machine's
            raise ServeError(f"cannot listen on {args.host}:{args.port} ({exc}); choose another --port") from None
    return app, url
