"""Search your own images by description with a trained checkpoint; prints the ranking, saves a contact sheet.

    python retrieve.py --checkpoint runs/cuhkpedes/best.pth --gallery my_photos/ \\
        --query "a man in a black jacket and blue jeans carrying a backpack" --index-file my_photos.index.pt
    python retrieve.py --checkpoint runs/cuhkpedes/best.pth --gallery my_photos.index.pt --query "..."

``--gallery`` is a folder of images (searched recursively) or an index file written by ``--index-file``.
With ``--index-file`` the folder is encoded once and the file is reused while checkpoint and images are unchanged.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Sequence

from utils.errors import user_errors_as_one_line

logger = logging.getLogger("retrieve")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="our .pth checkpoint or the authors' released one")
    parser.add_argument("--gallery", required=True, help="image folder, or an index file (.pt) made with --index-file")
    parser.add_argument("--query", required=True, help="the description to search for")
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--out", default="retrieval.png", help="contact sheet of the top-k images (PNG)")
    parser.add_argument("--index-file", default=None, help="cache the folder's features here and reuse them")
    parser.add_argument("--strict", action="store_true", help="fail on an unreadable image instead of skipping it")
    parser.add_argument("--config", default=None, help="recipe YAML (needed for the authors' checkpoints)")
    parser.add_argument("--device", default=None, choices=("cuda", "cpu"), help="default: cuda when available")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. eval.batch_size=32")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[tuple[str, float]]:
    """Returns the ranked (path, score) list; bad input exits with a one-line error."""
    args = parse_args(argv)
    from engine.retrieval import Retriever
    from utils.logging_utils import setup_logging
    from utils.visualize import contact_sheet

    setup_logging(None)
    if args.top_k < 1:
        raise SystemExit(f"error: --top-k must be >= 1, got {args.top_k}")
    with user_errors_as_one_line():
        retriever = Retriever.from_checkpoint(args.checkpoint, args.device, args.config, args.overrides)
        gallery = Path(args.gallery)
        if gallery.is_file():
            retriever.load_index(gallery)
        else:
            retriever.index(gallery, index_file=args.index_file, strict=args.strict)
        results = retriever.search(args.query, k=args.top_k)

    print(f'top {len(results)} of {len(retriever.gallery)} images for "{args.query}":')
    for rank, (path, score) in enumerate(results, 1):
        print(f"{rank:4d}  {score:7.4f}  {path}")
    sheet = contact_sheet([p for p, _ in results], [s for _, s in results], f'query: "{args.query}"', args.out)
    print(f"contact sheet: {sheet}")
    return results


if __name__ == "__main__":
    main()
