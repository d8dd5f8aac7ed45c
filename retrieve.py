"""Search your own images by description (or by a photo) with a trained checkpoint or model folder.

    python retrieve.py --checkpoint runs/cuhkpedes/best.pth --gallery my_photos/ --index-file my_photos.index \\
        --query "a man in a black jacket and blue jeans carrying a backpack"
    python retrieve.py --checkpoint exported/ivt --gallery my_photos.index --queries-file queries.txt
    python retrieve.py --checkpoint runs/cuhkpedes/best.pth --gallery my_photos.index --interactive
    python retrieve.py --checkpoint runs/cuhkpedes/best.pth --gallery my_photos.index --image person.jpg

``--gallery`` is a folder of images (searched recursively) or an index folder written by ``--index-file``; with
``--index-file`` the folder is encoded once into that index folder; later runs encode only new or changed images
(``python -m engine.build_index`` does the same under torchrun, and ``python -m engine.gallery_index info`` says
what an index holds). Large galleries search through faiss when installed (``search.*`` keys in configs/base.yaml).
One query writes its contact sheet to ``--out``; several write ``<out>_001.png``, ``<out>_002.png``, ... and,
with ``--queries-file`` or ``--jsonl``, one JSON line per query. Scores are cosine similarities, not probabilities.
"""
from __future__ import annotations

import argparse
from typing import Sequence

from utils.errors import user_errors_as_one_line


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True,
                        help="our .pth checkpoint, a model folder (python -m engine.export) or the authors' checkpoint")
    parser.add_argument("--gallery", required=True, help="image folder, or an index made with --index-file")
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
    parser.add_argument("--index-file", default=None, help="index folder: the features are kept there "
                        "and reused; only new or changed images are encoded")
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


@user_errors_as_one_line()
def main(argv: Sequence[str] | None = None) -> list[dict]:
    """Returns one record per query ({kind, query, results: [SearchResult], sheet}); bad input exits with one line."""
    args = parse_args(argv)
    # Heavy imports after argument parsing, so that --help answers at once.
    from engine.search_session import run_search
    from utils.logging_utils import setup_logging

    setup_logging(None)
    return run_search(args)


if __name__ == "__main__":
    main()
