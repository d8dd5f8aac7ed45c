"""Search your own images by description (or by a photo) with a trained checkpoint or model folder.

    python retrieve.py --checkpoint runs/cuhkpedes/best.pth --gallery my_photos/ --index-file my_photos.index.pt \\
        --query "a man in a black jacket and blue jeans carrying a backpack"
    python retrieve.py --checkpoint exported/ivt --gallery my_photos.index.pt --queries-file queries.txt
    python retrieve.py --checkpoint runs/cuhkpedes/best.pth --gallery my_photos.index.pt --interactive
    python retrieve.py --checkpoint runs/cuhkpedes/best.pth --gallery my_photos.index.pt --image person.jpg

``--gallery`` is a folder of images (searched recursively) or an index file written by ``--index-file``; with
``--index-file`` the folder is encoded once and the file is reused while checkpoint and images are unchanged.
One query writes its contact sheet to ``--out``; several write ``<out>_001.png``, ``<out>_002.png``, ... and,
with ``--queries-file`` or ``--jsonl``, one JSON line per query. Scores are cosine similarities, not probabilities.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

from utils.errors import UserError, user_errors_as_one_line

logger = logging.getLogger("retrieve")

QUIT_WORDS = ("quit", "exit", ":q")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True,
                        help="our .pth checkpoint, a model folder (python -m models.export) or the authors' checkpoint")
    parser.add_argument("--gallery", required=True, help="image folder, or an index file (.pt) made with --index-file")
    parser.add_argument("--query", action="append", default=[], help="a description to search for (repeatable)")
    parser.add_argument("--queries-file", default=None, help="a text file with one description per line")
    parser.add_argument("--image", action="append", default=[], help="a query image for image-to-image (repeatable)")
    parser.add_argument("--interactive", action="store_true", help="prompt for descriptions until 'quit' or EOF")
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--rerank", action=argparse.BooleanOptionalAction, default=None,
                        help="re-rank the top candidates with the ITM head (needs a fusion stack; default: "
                             "when eval.rerank_top_k > 0)")
    parser.add_argument("--why", action=argparse.BooleanOptionalAction, default=True,
                        help="draw under each text query's result its heatmap of the regions that drive the match "
                             "and its best-matching words (default; --no-why skips the extra model passes)")
    parser.add_argument("--out", default="retrieval.png", help="contact sheet (PNG); several queries: OUT_001.png ...")
    parser.add_argument("--jsonl", default=None,
                        help="results as JSON lines (default with --queries-file: OUT with the suffix .jsonl)")
    parser.add_argument("--index-file", default=None, help="cache the folder's features here and reuse them")
    parser.add_argument("--strict", action="store_true", help="fail on an unreadable image instead of skipping it")
    parser.add_argument("--config", default=None, help="recipe YAML (needed for the authors' checkpoints)")
    parser.add_argument("--device", default=None, choices=("cuda", "cpu"), help="default: cuda when available")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. eval.batch_size=32")
    args = parser.parse_args(argv)
    if not (args.query or args.queries_file or args.image or args.interactive):
        parser.error("give at least one of --query, --queries-file, --image or --interactive")
    if args.top_k < 1:
        parser.error(f"--top-k must be >= 1, got {args.top_k}")
    return args


def read_queries_file(path: str | Path) -> list[str]:
    """The non-blank lines of ``path``, stripped; UserError for a missing or empty file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"queries file not found: {path}")
    queries = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
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
    from engine.retrieval import QueryError
    from utils.visualize import contact_sheet

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


def main(argv: Sequence[str] | None = None) -> list[dict]:
    """Returns one record per query ({kind, query, results: [SearchResult], sheet}); bad input exits with one line."""
    args = parse_args(argv)
    from engine.retrieval import Retriever
    from utils.logging_utils import setup_logging
    from utils.visualize import contact_sheet

    setup_logging(None)
    with user_errors_as_one_line():
        texts = list(args.query) + (read_queries_file(args.queries_file) if args.queries_file else [])
        retriever = Retriever.from_checkpoint(args.checkpoint, args.device, args.config, args.overrides)
        gallery = Path(args.gallery)
        if gallery.is_file():
            retriever.load_index(gallery)
        else:
            retriever.index(gallery, index_file=args.index_file, strict=args.strict, progress=True)
        size = len(retriever.gallery)
        out = Path(args.out)
        several = len(texts) + len(args.image) > 1
        print("scores are cosine similarities of the query and image features (1 = identical direction), "
              "not probabilities")

        records: list[dict] = []
        text_results = retriever.search(texts, k=args.top_k, rerank=args.rerank) if texts else []
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
            contact_sheet([r.path for r in results], [r.score for r in results], f"image query: {image}", sheet)
            records.append(record("image", str(image), results, sheet))
        for rec in records:
            print(f"contact sheet: {rec['sheet']}")
        if args.interactive:
            if not sys.stdin.isatty():
                logger.info("--interactive: reading queries from standard input")
            records += interactive(retriever, args, out)
        jsonl = args.jsonl or (out.with_suffix(".jsonl") if args.queries_file else None)
        if jsonl:
            write_jsonl(Path(jsonl), records)
            print(f"results: {jsonl}")
    return records


if __name__ == "__main__":
    main()
