"""Pictures of retrieval results for people: a query's text above its ranked gallery images (PIL only).

Each picture is one row of thumbnails, best match on the left, each with its rank and score under it. In
evaluation pictures a gallery image of the query's person has a green frame and a tick, another person's a red
frame and a cross (the symbol reads without colour), the file name is printed under each thumbnail, and when
none of the shown images is a true match the first one is added on the right with its rank. An index.html
lists the pictures with their query text and metrics.
"""
from __future__ import annotations

import html
import textwrap
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps

HIT_COLOUR = (34, 160, 60)
MISS_COLOUR = (210, 40, 40)
NEUTRAL_COLOUR = (120, 120, 120)
QUERY_COLOUR = (40, 90, 200)     # the frame of an image query, drawn first on its sheet
BACKGROUND = (255, 255, 255)
TEXT_COLOUR = (20, 20, 20)

THUMB_SIZE = (96, 224)          # (width, height): person crops are about 1:2.5
FRAME = 4                        # frame width around each thumbnail
GAP = 8                          # space between thumbnails and around the picture
FONT_SIZE = 15
SMALL_FONT_SIZE = 12             # file names under thumbnails
MARK_RADIUS = 12                 # the tick / cross badge in a thumbnail's corner
MATCH_GAP = 28                   # space before the extra "first true match" thumbnail
MAX_COLUMNS = 10                 # contact sheets wrap into rows of this many images


def _font(size: int = FONT_SIZE) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def _text_width(font: ImageFont.ImageFont, text: str) -> float:
    return font.getlength(text) if hasattr(font, "getlength") else 6 * len(text)


def _line_height(font: ImageFont.ImageFont) -> int:
    box = font.getbbox("Ag")
    return int(box[3] - box[1]) + 6


def _wrap(text: str, font: ImageFont.ImageFont, width_px: int) -> list[str]:
    """Greedy word wrap to ``width_px`` using the font's real glyph widths."""
    average = max(_text_width(font, "abcdefghijklmnopqrstuvwxyz") / 26, 1.0)
    columns = max(int(width_px / average), 10)
    lines = textwrap.wrap(" ".join(text.split()), width=columns) or [""]
    # The average-width guess can overshoot on wide letters; re-wrap narrower until every line fits.
    while columns > 10 and any(_text_width(font, line) > width_px for line in lines):
        columns -= 2
        lines = textwrap.wrap(" ".join(text.split()), width=columns)
    return lines


RAISES_COLOUR = (230, 30, 30)      # heatmaps: regions that raise the score
LOWERS_COLOUR = (30, 90, 230)      # and regions that lower it
HEAT_ALPHA = 0.65                  # opacity of the strongest region


def heat_weights(patch_map: torch.Tensor) -> torch.Tensor:
    """How strongly each patch of a map [rows, cols] of score shares is drawn: [rows, cols] in [-1, 1], positive
    red, negative blue. The regions that raise the score are min-max normalised among themselves (the one that
    raises it most 1, the one that raises it least 0): a map whose every patch raises the score by 64-100% of the
    largest share shows where the most comes from instead of a uniform red. The regions that lower it are drawn
    by |share| / the largest |share| of either sign, so a faint negative stays faint."""
    heat = patch_map.detach().float().cpu()
    scale = float(heat.abs().max()) if heat.numel() else 0.0
    if scale == 0.0:
        return torch.zeros_like(heat)
    weights = torch.where(heat < 0, heat / scale, torch.zeros_like(heat))
    raising = heat > 0
    if raising.any():
        low, high = float(heat[raising].min()), float(heat[raising].max())
        span = (heat - low) / (high - low) if high > low else torch.ones_like(heat)
        weights = torch.where(raising, span, weights)
    return weights


def heat_overlay(image: Image.Image, patch_map: torch.Tensor, alpha: float = HEAT_ALPHA) -> Image.Image:
    """``image`` (RGB) with a patch map [rows, cols] of score shares drawn over it (heat_weights): red where a
    region raises the score, deepest where it raises it most, blue where it lowers it (the strongest at
    ``alpha``).

    The model sees the image stretched to its input size, so the grid is stretched over the whole image.
    """
    weights = heat_weights(patch_map)
    if not weights.abs().any():
        return image.convert("RGB")
    grid = torch.nn.functional.interpolate(weights[None, None], size=(image.height, image.width),
                                           mode="bilinear", align_corners=False)[0, 0]
    base = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32))  # [H, W, 3]
    colour = torch.where(grid[..., None] >= 0, torch.tensor(RAISES_COLOUR, dtype=torch.float32),
                         torch.tensor(LOWERS_COLOUR, dtype=torch.float32))
    weight = (grid.abs() * alpha)[..., None]
    return Image.fromarray((base * (1 - weight) + colour * weight).round().clamp(0, 255).to(torch.uint8).numpy())


def _thumbnail(path: str | Path, heat: torch.Tensor | None = None) -> Image.Image:
    """The image letterboxed into THUMB_SIZE (with ``heat``, a patch map, drawn over it: see heat_overlay); a grey
    placeholder that says so when it cannot be read."""
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image).convert("RGB")
            if heat is not None:
                image = heat_overlay(image, heat)
            image = ImageOps.contain(image, THUMB_SIZE)
    except (OSError, ValueError):
        placeholder = Image.new("RGB", THUMB_SIZE, (200, 200, 200))
        ImageDraw.Draw(placeholder).text((8, THUMB_SIZE[1] // 2), "unreadable", fill=TEXT_COLOUR, font=_font(12))
        return placeholder
    canvas = Image.new("RGB", THUMB_SIZE, BACKGROUND)
    canvas.paste(image, ((THUMB_SIZE[0] - image.width) // 2, (THUMB_SIZE[1] - image.height) // 2))
    return canvas


def _elide(text: str, font: ImageFont.ImageFont, width_px: int) -> str:
    """``text`` cut in the middle with '...' until it fits ``width_px`` (file names keep both ends)."""
    if _text_width(font, text) <= width_px:
        return text
    keep = len(text)
    while keep > 2:
        keep -= 1
        head, tail = text[: (keep + 1) // 2], text[len(text) - keep // 2:]
        if _text_width(font, head + "..." + tail) <= width_px:
            return head + "..." + tail
    return text[:1] + "..."


def _draw_mark(draw: ImageDraw.ImageDraw, x: int, y: int, hit: bool) -> None:
    """A badge centred at (x, y): a tick on green for a hit, a cross on red for a miss."""
    r = MARK_RADIUS
    draw.ellipse([x - r, y - r, x + r, y + r], fill=HIT_COLOUR if hit else MISS_COLOUR, outline=BACKGROUND, width=2)
    if hit:
        draw.line([(x - r * 0.5, y), (x - r * 0.1, y + r * 0.45), (x + r * 0.55, y - r * 0.45)], fill=BACKGROUND,
                  width=3, joint="curve")
    else:
        d = r * 0.45
        draw.line([(x - d, y - d), (x + d, y + d)], fill=BACKGROUND, width=3)
        draw.line([(x - d, y + d), (x + d, y - d)], fill=BACKGROUND, width=3)


def _render_ranked(header: list[str], cells: Sequence[dict], out_path: str | Path) -> Path:
    """Header lines, then one row of thumbnails; each cell is {path, caption, name, hit, apart}.

    A cell gets a frame and badge by ``hit`` (True/False), its ``caption`` and file ``name`` under it; a cell
    with ``apart`` is set off from the row by a gap and a dashed rule; a cell with ``heat`` (a patch map) shows
    the image a second time under the first with the map drawn over it (heat_overlay).
    """
    font, small = _font(), _font(SMALL_FONT_SIZE)
    line_h, small_h = _line_height(font), _line_height(small)
    cell_w = THUMB_SIZE[0] + 2 * FRAME
    frame_h = _frame_height(any(cell.get("heat") is not None for cell in cells))
    cell_h = frame_h + line_h + small_h
    xs, x = [], GAP
    for cell in cells:
        x += MATCH_GAP if cell.get("apart") else 0
        xs.append(x)
        x += cell_w + GAP
    width = max(x, 480)
    wrapped = [line for text in header for line in _wrap(text, font, width - 2 * GAP)]
    header_h = GAP + len(wrapped) * line_h + GAP
    sheet = Image.new("RGB", (width, header_h + cell_h + GAP), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    for i, line in enumerate(wrapped):
        draw.text((GAP, GAP + i * line_h), line, fill=TEXT_COLOUR, font=font)
    y = header_h
    for x, cell in zip(xs, cells):
        if cell.get("apart"):
            rule_x = x - (MATCH_GAP + GAP) // 2
            for dash in range(y, y + cell_h, 10):
                draw.line([(rule_x, dash), (rule_x, min(dash + 5, y + cell_h))], fill=NEUTRAL_COLOUR, width=2)
        draw.rectangle([x, y, x + cell_w - 1, y + frame_h - 1], fill=HIT_COLOUR if cell["hit"] else MISS_COLOUR)
        _paste_thumbnails(sheet, cell["path"], cell.get("heat"), x, y)
        _draw_mark(draw, x + FRAME + MARK_RADIUS + 2, y + FRAME + MARK_RADIUS + 2, cell["hit"])
        caption = _elide(cell["caption"], font, cell_w)
        draw.text((x + max((cell_w - _text_width(font, caption)) / 2, 0), y + frame_h + 2), caption,
                  fill=TEXT_COLOUR, font=font)
        name = _elide(cell["name"], small, cell_w)
        draw.text((x + max((cell_w - _text_width(small, name)) / 2, 0), y + frame_h + line_h), name,
                  fill=NEUTRAL_COLOUR, font=small)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out_path)
    return out_path


def save_query_examples(out_dir: str | Path, queries: Sequence[tuple[str, int]],
                        gallery: Sequence[tuple[str, int]], topk_indices: torch.Tensor,
                        topk_scores: torch.Tensor, n: int, query_ids: Sequence[int] | None = None,
                        first_matches: Sequence[tuple[int, int, float] | None] | None = None,
                        explain: Callable[[str, str], Any] | None = None) -> list[Path]:
    """One PNG per query (the first ``n`` rows): its text, then its top-k gallery images marked hit/miss.

    queries: (caption, pid) per row of ``topk_indices``; gallery: (image path, pid) per gallery index;
    topk_indices, topk_scores: [n_rows, k] gallery indices and scores, best first; query_ids: the queries'
    indices in the split, used in the titles and file names (default 0..n_rows-1); first_matches: per row,
    None or (gallery index, 1-based rank, score) of the first true match when it is not in the top k, shown
    apart on the right; explain: (caption, image path) -> engine.explanation.Explanation, whose heatmap is then
    drawn under each image.
    Returns the paths written, ``query_<id>.png`` in ``out_dir``.
    """
    if topk_indices.shape != topk_scores.shape or topk_indices.dim() != 2:
        raise ValueError(f"topk_indices {tuple(topk_indices.shape)} and topk_scores {tuple(topk_scores.shape)} "
                         "must both be [num_queries, k]")
    if len(queries) != topk_indices.shape[0]:
        raise ValueError(f"{len(queries)} queries but {topk_indices.shape[0]} rows of top-k results")
    query_ids = list(range(len(queries))) if query_ids is None else list(query_ids)
    first_matches = [None] * len(queries) if first_matches is None else list(first_matches)
    written = []
    for row in range(min(n, len(queries))):
        text, pid = queries[row]
        indices = topk_indices[row].tolist()
        scores = topk_scores[row].tolist()
        hits = [gallery[j][1] == pid for j in indices]
        cells = [{"path": gallery[j][0], "caption": f"#{rank + 1} {score:.3f}", "name": Path(gallery[j][0]).name,
                  "hit": hit} for rank, (j, score, hit) in enumerate(zip(indices, scores, hits))]
        header = [f"query {query_ids[row]} (person {pid}): {text}",
                  f"top {len(indices)}: {sum(hits)} of this person (green frame, tick), "
                  f"{len(hits) - sum(hits)} of others (red frame, cross)"]
        match = first_matches[row]
        if match is not None:
            index, rank, score = match
            header.append(f"none of the top {len(indices)} is this person: the first true match ranks "
                          f"#{rank} (right)")
            cells.append({"path": gallery[index][0], "caption": f"#{rank} {score:.3f}",
                          "name": Path(gallery[index][0]).name, "hit": True, "apart": True})
        elif not any(hits):
            header.append("this person has no image in the gallery")
        if explain is not None:
            explained = [explain(text, cell["path"]) for cell in cells]
            for cell, explanation in zip(cells, explained):
                cell["heat"] = explanation.patch_map
            header.append(HEAT_LEGEND.format(method=explained[0].method))
        written.append(_render_ranked(header, cells, Path(out_dir) / f"query_{query_ids[row]:05d}.png"))
    return written


def write_examples_index(out_path: str | Path, title: str, summary: Sequence[tuple[str, str]],
                         entries: Sequence[dict]) -> Path:
    """A self-contained HTML page: ``title``, a table of ``summary`` (label, value) rows, then per entry its
    heading, query text, a table of its ``details`` (label, value) and its ``picture`` (relative path)."""
    esc = html.escape
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{esc(title)}</title>",
             "<style>body{font-family:sans-serif;margin:1.5em;max-width:1400px}td{padding:2px 12px 2px 0;"
             "vertical-align:top}section{margin:2em 0;border-top:1px solid #ccc;padding-top:1em}"
             "img{max-width:100%;border:1px solid #ddd}.query{font-size:1.1em}</style></head><body>",
             f"<h1>{esc(title)}</h1>", "<table>"]
    parts += [f"<tr><td><b>{esc(label)}</b></td><td>{esc(value)}</td></tr>" for label, value in summary]
    parts.append("</table>")
    for entry in entries:
        parts += ["<section>", f"<h2>{esc(entry['heading'])}</h2>", f'<p class="query">{esc(entry["text"])}</p>',
                  "<table>"]
        parts += [f"<tr><td>{esc(label)}</td><td>{esc(value)}</td></tr>" for label, value in entry["details"]]
        parts += ["</table>", f'<p><a href="{esc(entry["picture"])}"><img src="{esc(entry["picture"])}" '
                  f'alt="{esc(entry["heading"])}"></a></p>', "</section>"]
    parts.append("</body></html>")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text("\n".join(parts) + "\n", encoding="utf-8")
    return out_path


HEAT_LEGEND = ("under each image, why it matches: red regions raise its score for the text (the deepest red the "
               "most), blue ones lower it ({method})")


def contact_sheet(paths: Sequence[str | Path], scores: Sequence[float], title: str, out_path: str | Path,
                  explanations: Sequence | None = None, query_image: str | Path | None = None) -> Path:
    """Ranked images under ``title`` (wrapped), MAX_COLUMNS per row; returns ``out_path``.

    Under each thumbnail: its rank and score, then its file name (shortened in the middle to fit). With
    ``explanations`` (engine.explanation.Explanation per image), each image's heatmap is drawn under it and
    its best-matching words under its name. With ``query_image`` (an image query), the query comes first, top
    left, in a blue frame captioned "query", so the sheet shows what was searched for beside what was found.
    """
    if len(paths) != len(scores):
        raise ValueError(f"{len(paths)} paths but {len(scores)} scores")
    font = _font(FONT_SIZE - 2)  # the caption font of _render_captioned
    cell_width = THUMB_SIZE[0] + 2 * FRAME
    captions = [[f"#{rank + 1} {float(score):.3f}", _elide(Path(str(path)).name, font, cell_width)]
                for rank, (path, score) in enumerate(zip(paths, scores))]
    header, heats = [title], None
    if explanations:
        header.append(HEAT_LEGEND.format(method=explanations[0].method))
        heats = [e.patch_map for e in explanations]
        for lines, explanation in zip(captions, explanations):
            lines.append(_elide(", ".join(explanation.top_words()), font, cell_width))
    paths = [str(p) for p in paths]
    if query_image is not None:
        paths.insert(0, str(query_image))
        captions.insert(0, ["query", _elide(Path(str(query_image)).name, font, cell_width)])
        heats = None if heats is None else [None] + heats
    return _render_captioned(header, paths, captions, out_path, columns=MAX_COLUMNS, heats=heats,
                             query_first=query_image is not None)


def _frame_height(with_heat: bool) -> int:
    """A cell's framed picture height: one thumbnail, or two (the image, then its heatmap) when ``with_heat``."""
    return (2 if with_heat else 1) * THUMB_SIZE[1] + (3 if with_heat else 2) * FRAME


def _paste_thumbnails(sheet: Image.Image, path: str, heat: torch.Tensor | None, x: int, y: int) -> None:
    """The thumbnail of ``path`` inside the frame at (x, y), and under it the heatmap one when ``heat`` is given."""
    sheet.paste(_thumbnail(path), (x + FRAME, y + FRAME))
    if heat is not None:
        sheet.paste(_thumbnail(path, heat), (x + FRAME, y + 2 * FRAME + THUMB_SIZE[1]))


def _render_captioned(header: list[str], paths: Sequence[str], captions: Sequence[Sequence[str]],
                      out_path: str | Path, columns: int, heats: Sequence[torch.Tensor | None] | None = None,
                      query_first: bool = False) -> Path:
    """Header lines on top, then the thumbnails in rows of ``columns``, each with several caption lines (centred)
    and, with ``heats``, its heatmap under it (see _render_ranked); ``query_first``: the first is the query."""
    font = _font(FONT_SIZE - 2)
    title_font = _font()
    line_h = _line_height(font)
    lines = max((len(c) for c in captions), default=1)
    heats = list(heats) if heats is not None else [None] * len(paths)
    cell_w = THUMB_SIZE[0] + 2 * FRAME
    frame_h = _frame_height(any(h is not None for h in heats))
    cell_h = frame_h + lines * line_h
    columns = max(1, min(columns, len(paths))) if paths else 1
    rows = (len(paths) + columns - 1) // columns
    width = max(GAP + columns * (cell_w + GAP), 360)
    title_h = _line_height(title_font)
    wrapped = [line for text in header for line in _wrap(text, title_font, width - 2 * GAP)]
    header_h = GAP + len(wrapped) * title_h + GAP
    sheet = Image.new("RGB", (width, header_h + rows * (cell_h + GAP)), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    for i, line in enumerate(wrapped):
        draw.text((GAP, GAP + i * title_h), line, fill=TEXT_COLOUR, font=title_font)
    for i, (path, cell_lines, heat) in enumerate(zip(paths, captions, heats)):
        x = GAP + (i % columns) * (cell_w + GAP)
        y = header_h + (i // columns) * (cell_h + GAP)
        colour = QUERY_COLOUR if query_first and i == 0 else NEUTRAL_COLOUR
        draw.rectangle([x, y, x + cell_w - 1, y + frame_h - 1], fill=colour)
        _paste_thumbnails(sheet, path, heat, x, y)
        for j, text in enumerate(cell_lines):
            text_x = x + max((cell_w - _text_width(font, text)) / 2, 0)
            draw.text((text_x, y + frame_h + 2 + j * line_h), text, fill=TEXT_COLOUR, font=font)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out_path)
    return out_path
