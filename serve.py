"""A local web page to search your own images by description or by photo (Gradio; pip install -r requirements-serve.txt).

    python serve.py --checkpoint runs/cuhkpedes/best.pth --gallery my_photos/ --index-file my_photos.index
    python serve.py --checkpoint exported/ivt-cuhkpedes --gallery my_photos.index --port 7861

Open http://127.0.0.1:7860: a text box, the ranked gallery with scores and file names, top-k and re-rank
controls, a photo upload for image-to-image search and the model's provenance. The gallery is indexed once at
start-up (reused from --index-file when checkpoint and images are unchanged). The logic is in engine/webapp.py.
"""
from __future__ import annotations

from typing import Sequence


def main(argv: Sequence[str] | None = None, block: bool = True):
    from engine.webapp import main as serve_main

    return serve_main(argv, block=block)


if __name__ == "__main__":
    main()
