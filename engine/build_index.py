"""Encode a gallery into an index folder, on one process or many: ``torchrun`` splits the image list over ranks.

    python -m engine.build_index --checkpoint runs/cuhkpedes/best.pth --gallery my_photos/ --index my_photos.index
    torchrun --nproc_per_node 8 -m engine.build_index --checkpoint CKPT --gallery /data/city/ --index city.index \\
        search.feature_dtype=float16 search.backend=faiss

Each rank encodes its shards (``search.shard_images`` images each) and writes every shard atomically; killed at any
point, the same command encodes only the shards that are missing. Run again after images were added or removed: it
encodes the new ones and drops the removed ones. Rank 0 then writes the manifest and, when ``search.backend`` asks
for one, the faiss index. CPU ranks talk over gloo, GPU ranks over NCCL (utils/distributed.py).
"""
from __future__ import annotations

import argparse
from typing import Sequence

from utils.errors import user_errors_as_one_line


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="our .pth checkpoint, a model folder, or the authors'")
    parser.add_argument("--gallery", required=True, help="the image folder (searched recursively)")
    parser.add_argument("--index", required=True, help="the index folder to create or bring up to date")
    parser.add_argument("--strict", action="store_true", help="fail on an unreadable image instead of skipping it")
    parser.add_argument("--config", default=None, help="recipe YAML (needed for the authors' checkpoints)")
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. search.backend=faiss")
    return parser.parse_args(argv)


@user_errors_as_one_line()
def main(argv: Sequence[str] | None = None) -> dict:
    """Returns {images, encoded (by this rank), rank, world_size, index}."""
    args = parse_args(argv)
    from engine.retrieval import Retriever
    from utils import distributed as dist_utils
    from utils.logging_utils import setup_logging

    setup_logging(None)
    device = dist_utils.init_distributed(args.device)
    try:
        retriever = Retriever.from_checkpoint(args.checkpoint, device, args.config, args.overrides)
        gallery = retriever.index(args.gallery, index_file=args.index, strict=args.strict,
                                  progress=dist_utils.is_main_process())
        out = {"images": len(gallery), "encoded": retriever.last_encoded, "rank": dist_utils.get_rank(),
               "world_size": dist_utils.get_world_size(), "index": args.index}
        print(f"rank {out['rank']}/{out['world_size']}: encoded {out['encoded']} image(s); the index {args.index} "
              f"holds {out['images']}", flush=True)
        return out
    finally:
        dist_utils.cleanup_distributed()


if __name__ == "__main__":
    main()
