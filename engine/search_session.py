"""The retrieve.py session: search a gallery for descriptions and photos, draw contact sheets, write JSON lines,
and the interactive prompt. retrieve.py parses the command line and calls :func:`run_search`.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

from engine.retrieval import QueryError, Retriever
from utils.errors import UserError
from utils.visualize import contact_sheet

logger = logging.getLogger("retrieve")

QUIT_WORDS = ("quit", "exit", ":q")


def read_queries_file(path: str | Path) -> list[str]:
    """The non-blank lines of ``path``, stripped; UserError for a missing or empty file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"queries file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text (byte {exc.start}); save it as UTF-8, one description per line"
                        ) from None
    queries = [line.strip() for line in text.splitlines() if line.strip()]
    if not queries:
        raise UserError(f"{path}: no queries (expected one description per line)")
    return queries


def sheet_path(out: Path, number: int | None) -> Path:
    """``out`` itself for a single query, else ``<stem>_<number:03d><suffix>`` beside it."""
    return out if number is None else out.with_name(f"{out.stem}_{number:03d}{out.suffix or '.png'}")


def print_results(label: str, results: Sequence[Any], gallery_size: int) -> None:
    print(f"top {len(results)} of {gallery_size} images for {label}:")
    for hit in results:
        itm = f"  itm {hit.itm_score:+.3f}" if hit.itm_score is not None else ""
        print(f"{hit.rank:4d}  {hit.score:7.4f}{itm}  {hit.path}")


def record(kind: str, query: str, results: Sequence[Any], sheet: Path, oov: Sequence[str] = ()) -> dict:
    """One query's outcome, as written to the JSON lines file (results as SearchResult objects here)."""
    out = {"kind": kind, "query": query, "results": list(results), "sheet": str(sheet)}
    if oov:
        out["out_of_vocabulary"] = list(oov)
    return out


def write_jsonl(path: Path, records: Sequence[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for rec in records:
            handle.write(json.dumps({**rec, "results": [r.to_dict() for r in rec["results"]]}) + "\n")


def why(retriever: Any, args: argparse.Namespace, text: str, results: Sequence[Any]) -> list | None:
    """Each result's "why this person" explanation for ``text`` (None with --no-why)."""
    return [retriever.explain(text, r.path) for r in results] if args.why else None


def interactive(retriever: Any, args: argparse.Namespace, out: Path) -> list[dict]:
    """Read descriptions from standard input; print each top-k and redraw the sheet at ``out``."""
    print(f"type a description and press Enter ({' / '.join(QUIT_WORDS)} or Ctrl-D to stop); "
          f"the contact sheet {out} is redrawn after each query")
    records = []
    while True:
        try:
            text = input("query> ").strip()
        except EOFError:
            print()
            break
        if text.lower() in QUIT_WORDS:
            break
        if not text:
            continue
        try:
            results = retriever.search(text, k=args.top_k, rerank=args.rerank)
        except QueryError as exc:  # a bad line ends nothing: say why and ask again
            print(f"error: {exc}")
            continue
        print_results(f'"{text}"', results, len(retriever.gallery))
        contact_sheet([r.path for r in results], [r.score for r in results], f'query: "{text}"', out,
                      why(retriever, args, text, results))
        print(f"contact sheet: {out}")
        records.append(record("text", text, results, out, retriever.out_of_vocabulary(text)))
    return records


def run_search(args: argparse.Namespace) -> list[dict]:
    """Load the model and the gallery, answer every query of ``args`` (retrieve.py's options); one record a query."""
    texts = list(args.query) + (read_queries_file(args.queries_file) if args.queries_file else [])
    retriever = Retriever.from_checkpoint(args.checkpoint, args.device, args.config, args.overrides)
    retriever.use_gallery(args.gallery, index_file=args.index_file, strict=args.strict, progress=True)
    out = Path(args.out)
    print("scores are cosine similarities of the query and image features (1 = identical direction), "
          "not probabilities")
    records = search_all(retriever, texts, args, out)
    if args.interactive:
        if not sys.stdin.isatty():
            logger.info("--interactive: reading queries from standard input")
        records += interactive(retriever, args, out)
    jsonl = args.jsonl or (out.with_suffix(".jsonl") if args.queries_file else None)
    if jsonl:
        write_jsonl(Path(jsonl), records)
        print(f"results: {jsonl}")
    return records


def search_all(retriever: Retriever, texts: Sequence[str], args: argparse.Namespace, out: Path) -> list[dict]:
    """The given descriptions (one batched search) and query images: printed, drawn and recorded in that order."""
    size = len(retriever.gallery)
    several = len(texts) + len(args.image) > 1
    records: list[dict] = []
    text_results = retriever.search(list(texts), k=args.top_k, rerank=args.rerank) if texts else []
    for text, results in zip(texts, text_results):
        sheet = sheet_path(out, len(records) + 1 if several else None)
        print_results(f'"{text}"', results, size)
        contact_sheet([r.path for r in results], [r.score for r in results], f'query: "{text}"', sheet,
                      why(retriever, args, text, results))
        records.append(record("text", text, results, sheet, retriever.out_of_vocabulary(text)))
    for image in args.image:
        results = retriever.search_image(image, k=args.top_k)
        sheet = sheet_path(out, len(records) + 1 if several else None)
        print_results(f"the image {image}", results, size)
        contact_sheet([r.path for r in results], [r.score for r in results], f"image query: {image}", sheet,
                      query_image=image)
        records.append(record("image", str(image), results, sheet))
    for rec in records:
        print(f"contact sheet: {rec['sheet']}")
    return records
