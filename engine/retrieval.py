"""Search a folder of your own images with a trained checkpoint or an exported model folder.

    retriever = Retriever.from_pretrained("runs/cuhkpedes/best.pth")      # or a folder from python -m engine.export
    retriever.index("my_photos/", index_file="my_photos.index")          # encodes once; later only what changed
    retriever.search("a woman in a red coat with a black backpack", k=10)   # [SearchResult(path, score, rank)]
    retriever.search(["a man in a black jacket", "a girl in a pink dress"])  # one list per query, one matmul
    retriever.search_image("query.jpg", k=10)                              # image-to-image
    retriever.describe("photo.jpg", k=5, captions=[...])                   # image-to-text over a caption list

Scores are cosine similarities of L2-normalised features (in [-1, 1], higher is closer), not probabilities. With
a fusion stack (``model.fusion_layers > 0``) ``rerank=True`` re-orders the top candidates by the ITM head; their
``itm_score`` is what evaluation ranks by (engine.encoding.itm_score: the "match" logit).

The index (engine/gallery_index.py) is a folder of memory-mapped feature shards and a manifest with the image
paths, their sizes and modification times, a digest of the model (checkpoint path, size and modification time,
and the input settings) and the sha256 of every file. Indexing a folder again encodes only the images that are new
or changed and drops removed ones; an index of another model is refused with one line (features of two models
never mix), and so is a corrupted file. Search runs on the backend of ``search.*`` (engine/gallery_search.py):
exact chunked brute force, or a faiss index whose candidates are re-scored exactly.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence, Union

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from datasets.pixels import ImageTooLargeError, check_pixels, open_image, set_max_image_pixels
from datasets.transforms import build_test_transform, load_image
from engine.checkpoints import load_for_inference
from engine.encoding import encode_text_tokens, rerank_scores
from engine.gallery_index import (INDEX_FORMAT, INDEX_VERSION, Gallery, GalleryError, SearchSettings, build_gallery,
                                  file_signature, is_index, open_gallery)
from engine.gallery_search import build_ann, extend_ann, search as search_gallery, wants_ann
from utils import distributed as dist_utils
from utils.amp import autocast
from utils.errors import UserError

logger = logging.getLogger(__name__)

__all__ = ["INDEX_FORMAT", "INDEX_VERSION", "GalleryError", "GalleryIndex", "Retriever", "SearchResult", "QueryError",
           "file_signature", "list_images"]
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")
LISTED_FAILURES = 5  # unreadable images named in the log / error message

ImageInput = Union[str, os.PathLike, Image.Image]


class QueryError(UserError, ValueError):
    """A query that cannot be searched for (empty text, unreadable image, re-ranking without ITM head)."""


@dataclass(frozen=True)
class SearchResult:
    """One ranked gallery image: ``score`` is the cosine similarity, ``rank`` counts from 1 (best)."""

    path: str
    score: float
    rank: int
    itm_score: float | None = None  # the ITM head's score, only when the ranking was re-ordered by it

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    def __iter__(self):
        """Unpacks as (path, score), like the (path, score) tuples search returned before."""
        return iter((self.path, self.score))


@dataclass(frozen=True)
class CaptionResult:
    """One ranked caption of ``Retriever.describe``: cosine similarity to the image, rank from 1."""

    text: str
    score: float
    rank: int

    def to_dict(self) -> dict:
        return asdict(self)


GalleryIndex = Gallery  # the name the encoded gallery had before it moved to engine/gallery_index.py


def list_images(folder: str | os.PathLike[str]) -> list[str]:
    """Image files under ``folder`` (recursive, by extension), sorted; GalleryError when there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise GalleryError(f"gallery folder not found: {folder}")
    paths = sorted(str(p) for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not paths:
        raise GalleryError(f"{folder}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)}, recursively)")
    return paths


def model_digest(checkpoint: str | os.PathLike[str], input_cfg: Any) -> str:
    """Digest of the checkpoint file (resolved path, size, mtime) and the image pipeline settings.

    Hashing the file's identity instead of its bytes keeps this instant for large checkpoints; rewriting the
    checkpoint changes its mtime, so an index is never reused across different weights at the same path. For
    a model folder the weights file inside it stands for the folder.
    """
    path = Path(checkpoint).resolve()
    if path.is_dir():
        path = path / "model.safetensors"
    stat = path.stat()
    text = json.dumps([str(path), stat.st_size, stat.st_mtime_ns, input_cfg.to_dict()], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def open_query_image(image: ImageInput) -> Image.Image:
    """An RGB PIL image from a path or a PIL image; QueryError (one line) for a missing or undecodable file."""
    if isinstance(image, Image.Image):
        check_pixels(image, "the query image")
        return image.convert("RGB")
    if not isinstance(image, (str, os.PathLike)):
        raise QueryError(f"expected an image path or a PIL image, got {type(image).__name__}")
    if not Path(image).is_file():
        raise QueryError(f"query image not found: {image}")
    try:
        with open_image(image) as opened:
            return opened.convert("RGB")
    except ImageTooLargeError as exc:
        raise QueryError(str(exc)) from None
    except (OSError, ValueError, SyntaxError) as exc:  # PIL raises all three for files it cannot decode
        logger.debug("cannot decode %s: %s", image, exc)
        raise QueryError(f"{image}: not a readable image (no image format recognised, or the file is damaged)"
                         ) from None


class _TolerantImages(Dataset):
    """(image [3, H, W], index, error) per path; an unreadable file gives zeros and the error text."""

    def __init__(self, paths: Sequence[str], transform, image_size: Sequence[int]):
        self.paths = list(paths)
        self.transform = transform
        self.blank_shape = (3, int(image_size[0]), int(image_size[1]))

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, str]:
        try:
            return self.transform(load_image(self.paths[i])), i, ""
        except (OSError, ValueError, SyntaxError) as exc:  # PIL raises all three for broken files
            return torch.zeros(self.blank_shape), i, f"{type(exc).__name__}: {exc}"


class Retriever:
    """A model, its tokenizer and an optional encoded gallery: text-to-image, image-to-image, image-to-text."""

    def __init__(self, model: torch.nn.Module, cfg: Any, tokenizer: Any, device: torch.device, digest: str,
                 info: dict | None = None):
        self.model = model.eval()
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.device = device
        self.digest = digest
        self.info = dict(info or {})
        self.gallery: Gallery | None = None
        self.settings = SearchSettings.from_config(cfg)
        self.last_encoded = 0  # images the last index() call encoded in this process
        self.transform = build_test_transform(cfg.input)
        set_max_image_pixels(int(cfg.data.max_image_pixels))  # galleries and queries alike
        self._reported_oov: set[str] = set()
        # the training captions' words the checkpoint records (empty for older checkpoints: pieces-only flagging)
        self.caption_words: frozenset[str] = frozenset(self.info.get("caption_words") or ())
        self._captions: tuple[tuple[str, ...], torch.Tensor] | None = None

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike[str], device: str | torch.device | None = None,
                        config_path: str | os.PathLike[str] | None = None, overrides: Sequence[str] = ()
                        ) -> "Retriever":
        """Rebuild the model from our checkpoint, an exported model folder, or the authors' checkpoint.

        See engine.checkpoints.load_for_inference; ``config_path`` and ``overrides`` change data/eval settings
        (and name the recipe of an authors' checkpoint).
        """
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model, cfg, tokenizer, info = load_for_inference(path, config_path, list(overrides), device)
        return cls(model, cfg, tokenizer, device, model_digest(path, cfg.input), info)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str], device: str | torch.device | None = None,
                        overrides: Sequence[str] = ()) -> "Retriever":
        """The Hugging Face spelling: a model folder written by ``python -m engine.export`` (or a .pth)."""
        return cls.from_checkpoint(path, device, None, overrides)

    @property
    def has_fusion(self) -> bool:
        return bool(getattr(self.model, "has_fusion", False))

    # ------------------------------------------------------------------------------------------ gallery
    def use_gallery(self, gallery: str | os.PathLike[str], index_file: str | os.PathLike[str] | None = None,
                    strict: bool = False, progress: bool = False) -> Gallery:
        """``gallery`` is an index (a folder with a manifest, or a version-2 file): open it; else a folder of
        images: index it (into ``index_file`` when given). What retrieve.py, serve.py and hubconf do."""
        if is_index(gallery):
            return self.load_index(gallery)
        return self.index(gallery, index_file=index_file, strict=strict, progress=progress)

    def index(self, paths_or_dir: str | os.PathLike[str] | Sequence[str],
              index_file: str | os.PathLike[str] | None = None, strict: bool = False,
              progress: bool = False) -> Gallery:
        """Encode a folder (or a list) of images into ``index_file`` (an index folder: only new or changed images
        are encoded, removed ones dropped; resumes a build that was killed), or in memory without it; sets
        ``self.gallery``. Under torchrun the ranks share the encoding. Unreadable images are skipped (counted and
        the first few named in the log) or, with ``strict``, raise GalleryError. ``progress``: a progress bar.
        """
        if isinstance(paths_or_dir, (str, os.PathLike)):
            paths = list_images(paths_or_dir)
        else:
            paths = [str(p) for p in paths_or_dir]
            if not paths:
                raise GalleryError("the gallery list is empty")
        if index_file is None:
            features, kept, skipped = self._encode_images(paths, strict, progress)
            self._check_kept(kept, skipped, len(paths))
            self.gallery = Gallery.in_memory(kept, features, self.digest, file_signature(paths), skipped)
            return self.gallery
        if Path(index_file).is_file():
            raise GalleryError(f"{index_file}: a version-2 index file; --index-file is now a folder: convert it "
                               f"with `python -m engine.gallery_index convert {index_file} NEW` or choose a new name")
        self.last_encoded = self._build(paths, Path(index_file), strict, progress, str(paths_or_dir)
                                        if isinstance(paths_or_dir, (str, os.PathLike)) else "a list of images")
        gallery = self.load_index(index_file)
        if strict and gallery.skipped:
            raise self._strict_error(gallery.skipped)
        self._check_kept(list(gallery.paths[:1]), gallery.skipped, len(paths))
        self._report_skipped(gallery.skipped, len(paths))
        return gallery

    def _build(self, paths: list[str], folder: Path, strict: bool, progress: bool, source: str) -> int:
        """Bring the index folder up to date (all ranks), and its faiss index when search.* asks for one."""
        from tqdm import tqdm

        with tqdm(desc="indexing the gallery", unit="img", disable=not (progress and dist_utils.is_main_process())
                  ) as bar:
            manifest, encoded = build_gallery(folder, paths, lambda chunk: self._encode_images(chunk, strict),
                                              self.digest, self.settings.feature_dtype, self.settings.shard_images,
                                              source, bar.update)
        if dist_utils.is_main_process() and manifest["count"] and wants_ann(manifest["count"], self.settings):
            gallery = open_gallery(folder, 0)
            if not manifest.get("ann") or manifest["ann"].get("covers") != gallery.content_id:
                extend_ann(gallery, self.settings) or build_ann(gallery, self.settings)
        dist_utils.barrier()
        logger.info("gallery index %s: %d images, %d encoded by this process", folder, manifest["count"], encoded)
        return encoded

    def load_index(self, file: str | os.PathLike[str]) -> Gallery:
        """Use a saved index as the gallery; GalleryError if another model (or input setting) built it."""
        cached = open_gallery(file, self.settings.verify_max_mib)
        if cached.model_digest != self.digest:
            raise GalleryError(f"{file}: this index was built with another checkpoint or input settings; "
                               "rebuild it by passing the image folder with a new --index-file")
        self.gallery = cached
        return cached

    def _check_kept(self, kept: Sequence[str], skipped: Sequence[tuple[str, str]], total: int) -> None:
        if not kept:
            raise GalleryError(f"none of the {total} gallery images could be read; first: "
                               + "; ".join(f"{p} ({why})" for p, why in list(skipped)[:LISTED_FAILURES]))

    def _encode_images(self, paths: list[str], strict: bool, progress: bool = False
                       ) -> tuple[torch.Tensor, list[str], list[tuple[str, str]]]:
        """Normalised features [n_kept, D] (CPU), the kept paths and the (path, reason) of unreadable ones."""
        from tqdm import tqdm

        dataset = _TolerantImages(paths, self.transform, self.cfg.input.image_size)
        workers = min(int(self.cfg.data.num_workers), os.cpu_count() or 1, max(len(paths) // 64, 0))
        loader = DataLoader(dataset, batch_size=int(self.cfg.eval.batch_size), num_workers=workers,
                            pin_memory=self.device.type == "cuda")
        feats, kept, skipped = [], [], []
        with torch.inference_mode(), autocast(self.device, bool(self.cfg.eval.amp)), \
                tqdm(total=len(paths), desc="indexing the gallery", unit="img", disable=not progress) as bar:
            for images, indices, errors in loader:
                ok = torch.tensor([not e for e in errors])
                for i, error in zip(indices.tolist(), errors):
                    if error:
                        skipped.append((paths[i], error))
                if strict and skipped:
                    raise self._strict_error(skipped)
                if ok.any():
                    _, feature = self.model.encode_image(images[ok].to(self.device), bmm=False)
                    feats.append(F.normalize(feature.float(), dim=1).cpu())
                    kept.extend(paths[i] for i in indices[ok].tolist())
                bar.update(len(indices))
        features = torch.cat(feats) if feats else torch.zeros(0, 0)
        return features, kept, skipped

    @staticmethod
    def _strict_error(skipped: list[tuple[str, str]]) -> GalleryError:
        path, why = skipped[0]
        return GalleryError(f"{path}: unreadable image ({why}); without --strict such files are skipped")

    @staticmethod
    def _report_skipped(skipped: Sequence[tuple[str, str]], total: int) -> None:
        if skipped:
            shown = "; ".join(f"{p} ({why})" for p, why in skipped[:LISTED_FAILURES])
            more = f"; and {len(skipped) - LISTED_FAILURES} more" if len(skipped) > LISTED_FAILURES else ""
            logger.warning("skipped %d unreadable image(s) of %d: %s%s", len(skipped), total, shown, more)

    # ------------------------------------------------------------------------------------------ encoding
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Normalised features [Q, D] (float32, CPU) of captions, in batches of ``eval.batch_size``."""
        texts = _check_texts(texts)
        self._report_oov(texts)
        batch = int(self.cfg.eval.batch_size)
        feats = []
        with torch.inference_mode(), autocast(self.device, bool(self.cfg.eval.amp)):
            for begin in range(0, len(texts), batch):
                _, _, feature = encode_text_tokens(self.model, self.tokenizer, texts[begin:begin + batch],
                                                   self.cfg.text.max_text_len, self.device)
                feats.append(F.normalize(feature.float(), dim=1).cpu())
        return torch.cat(feats)

    def encode_query(self, text: str) -> torch.Tensor:
        """The normalised feature [D] (float32, CPU) of one caption."""
        return self.encode_texts([text])[0]

    def encode_images(self, images: Sequence[ImageInput]) -> torch.Tensor:
        """Normalised features [N, D] (float32, CPU) of query images (paths or PIL images)."""
        if not images:
            raise QueryError("no query image given")
        pixels = torch.stack([self.transform(open_query_image(image)) for image in images])
        feats = []
        batch = int(self.cfg.eval.batch_size)
        with torch.inference_mode(), autocast(self.device, bool(self.cfg.eval.amp)):
            for begin in range(0, len(pixels), batch):
                _, feature = self.model.encode_image(pixels[begin:begin + batch].to(self.device), bmm=False)
                feats.append(F.normalize(feature.float(), dim=1).cpu())
        return torch.cat(feats)

    # ----------------------------------------------------------------------------------- vocabulary
    def out_of_vocabulary(self, text: str) -> list[str]:
        """Words of ``text`` the model never learnt: [UNK], split into single characters, or (when the checkpoint
        records its training captions' words) absent from those captions.

        A learnt demo vocabulary spells a word it never saw letter by letter; a WordPiece vocabulary cuts "poncho"
        into known pieces, but a model whose captions never held the word learnt nothing about it. Either way the
        word barely counts. Words of one character are never reported.
        """
        backend = self.tokenizer.backend_tokenizer
        normalized = backend.normalizer.normalize_str(text) if backend.normalizer is not None else text
        words = [w for w, _ in backend.pre_tokenizer.pre_tokenize_str(normalized)]
        unknown = self.tokenizer.unk_token
        found: list[str] = []
        for word in words:
            if len(word) < 2 or not any(ch.isalnum() for ch in word) or word in found:
                continue
            pieces = self.tokenizer.tokenize(word)
            if unknown in pieces or (len(pieces) > 1 and all(len(p.removeprefix("##")) == 1 for p in pieces)):
                found.append(word)
            elif self.caption_words and word.lower() not in self.caption_words:
                found.append(word)
        return found

    def _report_oov(self, texts: Sequence[str]) -> None:
        """Log each out-of-vocabulary word once per Retriever (an interactive session does not repeat it)."""
        new = []
        for text in texts:
            for word in self.out_of_vocabulary(text):
                if word not in self._reported_oov:
                    self._reported_oov.add(word)
                    new.append(word)
        if new:
            logger.warning("out of vocabulary (%s, so they count little): %s", self.unknown_reason(), ", ".join(new))

    def unknown_reason(self) -> str:
        """Why out_of_vocabulary flags words, for a message."""
        if self.caption_words:
            return "never in the model's training captions or spelt letter by letter"
        return "spelt letter by letter"

    # ------------------------------------------------------------------------------------------- search
    def _require_gallery(self) -> Gallery:
        if self.gallery is None:
            raise GalleryError("no gallery: call index(folder) or load_index(file) first")
        return self.gallery

    def _rerank_depth(self, k: int, rerank: bool | None) -> int:
        """How many candidates the ITM head re-orders: 0 for none (``rerank`` None follows eval.rerank_top_k)."""
        configured = int(self.cfg.eval.rerank_top_k)
        if rerank is None:
            rerank = configured > 0 and self.has_fusion
        if not rerank:
            return 0
        if not self.has_fusion:
            raise QueryError("re-ranking needs a checkpoint with a fusion stack (model.fusion_layers > 0); "
                             "this one has none")
        return max(k, configured)

    def search(self, query: str | Sequence[str], k: int = 10, rerank: bool | None = None
               ) -> list[SearchResult] | list[list[SearchResult]]:
        """The ``k`` gallery images most similar to a text (a list of results) or to each of a list of texts
        (a list of lists), best first. The texts are encoded in batches and scored with one matrix product.

        ``rerank``: re-order the top max(k, eval.rerank_top_k) by the ITM head (None: when eval.rerank_top_k > 0
        and the model has a fusion stack).
        """
        gallery = self._require_gallery()
        k = _check_k(k)
        single = isinstance(query, str)
        texts = _check_texts([query] if single else list(query))
        depth = self._rerank_depth(k, rerank)
        top_scores, top_idx = search_gallery(gallery, self.encode_texts(texts), max(k, depth), self.settings)
        itm = None
        if depth:
            itm = rerank_scores(self.model, self.tokenizer, texts, gallery.paths, top_idx, self.transform,
                                self.cfg.text.max_text_len, int(self.cfg.eval.rerank_batch_size), self.device,
                                bool(self.cfg.eval.amp)).cpu()
        results = [self._rows(gallery, top_idx[q], top_scores[q], None if itm is None else itm[q], k)
                   for q in range(len(texts))]
        return results[0] if single else results

    def search_image(self, image: ImageInput, k: int = 10) -> list[SearchResult]:
        """The ``k`` gallery images most similar to a query image (path or PIL image), best first."""
        gallery = self._require_gallery()
        k = _check_k(k)
        top_scores, top_idx = search_gallery(gallery, self.encode_images([image]), k, self.settings)
        return self._rows(gallery, top_idx[0], top_scores[0], None, k)

    @staticmethod
    def _rows(gallery: Gallery, idx: torch.Tensor, scores: torch.Tensor, itm: torch.Tensor | None,
              k: int) -> list[SearchResult]:
        if itm is None:
            return [SearchResult(gallery.paths[i], float(s), rank)
                    for rank, (i, s) in enumerate(zip(idx.tolist(), scores.tolist()), 1)]
        order = torch.sort(itm, descending=True, stable=True).indices[:k].tolist()
        return [SearchResult(gallery.paths[int(idx[j])], float(scores[j]), rank, float(itm[j]))
                for rank, j in enumerate(order, 1)]

    # ---------------------------------------------------------------------------------- image-to-text
    def explain(self, text: str, image: str) -> Any:
        """Why ``image`` scores what it does for ``text``: engine.explanation.Explanation (image regions, words)."""
        from engine.explanation import explain_with

        open_query_image(image)  # a missing or undecodable file is a QueryError, as for a search
        return explain_with(self.model, self.tokenizer, self.cfg, self.device, _check_texts([text])[0], image)

    def set_captions(self, captions: Sequence[str]) -> None:
        """Encode the caption list ``describe`` ranks (kept until another list is set)."""
        captions = tuple(_check_texts(list(captions)))
        if self._captions is None or self._captions[0] != captions:
            self._captions = (captions, self.encode_texts(captions))

    def describe(self, image: ImageInput, k: int = 5, captions: Sequence[str] | None = None) -> list[CaptionResult]:
        """The ``k`` captions (of ``captions``, or of the list given to ``set_captions``) closest to the image."""
        if captions is not None:
            self.set_captions(captions)
        if self._captions is None:
            raise QueryError("describe needs a caption list: pass captions=[...] or call set_captions first")
        texts, features = self._captions
        scores = features @ self.encode_images([image])[0]
        top_scores, top_idx = torch.topk(scores, min(_check_k(k), len(texts)))
        return [CaptionResult(texts[i], float(s), rank)
                for rank, (i, s) in enumerate(zip(top_idx.tolist(), top_scores.tolist()), 1)]


def _check_k(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise QueryError(f"k must be a whole number >= 1, got {k!r}")
    return k


def _check_texts(texts: Sequence[str]) -> list[str]:
    texts = list(texts)
    if not texts:
        raise QueryError("no query given")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise QueryError(f"query {i + 1} is a {type(text).__name__}, expected text")
        if not text.strip():
            raise QueryError("empty query: describe the person to search for" if len(texts) == 1
                             else f"query {i + 1} of {len(texts)} is empty")
    return texts
