"""Search a folder of your own images with a trained checkpoint or an exported model folder.

    retriever = Retriever.from_pretrained("runs/cuhkpedes/best.pth")      # or a folder from python -m engine.export
    retriever.index("my_photos/", index_file="my_photos.index.pt")       # encodes once, reuses the file later
    retriever.search("a woman in a red coat with a black backpack", k=10)   # [SearchResult(path, score, rank)]
    retriever.search(["a man in a black jacket", "a girl in a pink dress"])  # one list per query, one matmul
    retriever.search_image("query.jpg", k=10)                              # image-to-image
    retriever.describe("photo.jpg", k=5, captions=[...])                   # image-to-text over a caption list

Scores are cosine similarities of L2-normalised features (in [-1, 1], higher is closer), not probabilities. With
a fusion stack (``model.fusion_layers > 0``) ``rerank=True`` re-orders the top candidates by the ITM head; their
``itm_score`` is what evaluation ranks by (engine.encoding.itm_score: the "match" logit).

The index file holds the image features, the image paths with their sizes and modification times, a digest of
the model (checkpoint path, size and modification time, and the input settings) and a sha256 of all of these. It
is reused only when all of them match, so a retrained checkpoint or a changed folder never serves stale features,
and a corrupted file (a flipped byte) is refused with one line instead of ranking with altered features.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass, field
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
from utils.amp import autocast
from utils.checkpoint import CheckpointError, atomic_save, load_file
from utils.errors import UserError

logger = logging.getLogger(__name__)

INDEX_FORMAT = "ivt-gallery-index"
INDEX_VERSION = 2  # 2: the index records its sha256
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")
LISTED_FAILURES = 5  # unreadable images named in the log / error message

ImageInput = Union[str, os.PathLike, Image.Image]


class GalleryError(UserError, ValueError):
    """A gallery that cannot be indexed or an index file that cannot be used; the message says why."""


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


@dataclass
class GalleryIndex:
    """Encoded gallery: features [G, D] float32 (L2-normalised, CPU), one row per path in ``paths``.

    ``skipped`` lists (path, reason) of the images that could not be read; ``signature`` identifies the
    candidate files (path, size, mtime) the index was built from; ``model_digest`` the model that encoded them.
    """

    paths: list[str]
    features: torch.Tensor
    model_digest: str
    signature: list[list[Any]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)


def index_checksum(content: dict) -> str:
    """sha256 of what a gallery index holds: paths, features (their bytes, dtype and shape), model digest,
    file signature and skipped images."""
    digest = hashlib.sha256()
    digest.update(json.dumps([content["paths"], content["model_digest"], [list(s) for s in content["signature"]],
                              [list(s) for s in content["skipped"]]]).encode("utf-8"))
    features = content["features"].detach().cpu().contiguous()
    digest.update(f"{features.dtype} {tuple(features.shape)}".encode("utf-8"))
    digest.update(features.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def list_images(folder: str | os.PathLike[str]) -> list[str]:
    """Image files under ``folder`` (recursive, by extension), sorted; GalleryError when there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise GalleryError(f"gallery folder not found: {folder}")
    paths = sorted(str(p) for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not paths:
        raise GalleryError(f"{folder}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)}, recursively)")
    return paths


def file_signature(paths: Sequence[str]) -> list[list[Any]]:
    """[path, size, mtime_ns] per path ([path, -1, -1] for a missing file): cheap change detection."""
    out = []
    for path in paths:
        try:
            stat = os.stat(path)
            out.append([path, stat.st_size, stat.st_mtime_ns])
        except OSError:
            out.append([path, -1, -1])
    return out


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
        self.gallery: GalleryIndex | None = None
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
    def index(self, paths_or_dir: str | os.PathLike[str] | Sequence[str],
              index_file: str | os.PathLike[str] | None = None, strict: bool = False,
              progress: bool = False) -> GalleryIndex:
        """Encode a folder (or a list) of images, or reuse ``index_file`` when it matches; sets ``self.gallery``.

        Unreadable images are skipped (counted and the first few named in the log) or, with ``strict``, raise
        GalleryError. The index is written to ``index_file`` when given. ``progress`` shows a progress bar.
        """
        if isinstance(paths_or_dir, (str, os.PathLike)):
            paths = list_images(paths_or_dir)
        else:
            paths = [str(p) for p in paths_or_dir]
            if not paths:
                raise GalleryError("the gallery list is empty")
        signature = file_signature(paths)
        cached = self._read_cache(index_file)
        if cached is not None:
            if cached.model_digest == self.digest and cached.signature == signature:
                if strict and cached.skipped:
                    raise self._strict_error(cached.skipped)
                logger.info("reusing the gallery index %s (%d images)", index_file, len(cached))
                self._report_skipped(cached.skipped, len(paths))
                self.gallery = cached
                return cached
            logger.info("gallery index %s is stale (%s); re-encoding", index_file,
                        "another model" if cached.model_digest != self.digest else "the images changed")
        features, kept, skipped = self._encode_images(paths, strict, progress)
        if not kept:
            raise GalleryError(f"none of the {len(paths)} gallery images could be read; first: "
                               + "; ".join(f"{p} ({why})" for p, why in skipped[:LISTED_FAILURES]))
        self._report_skipped(skipped, len(paths))
        gallery = GalleryIndex(kept, features, self.digest, signature, skipped)
        if index_file is not None:
            content = {"paths": gallery.paths, "features": gallery.features, "model_digest": gallery.model_digest,
                       "signature": gallery.signature, "skipped": [list(s) for s in gallery.skipped]}
            atomic_save({"format": INDEX_FORMAT, "format_version": INDEX_VERSION, **content,
                         "sha256": index_checksum(content)}, index_file)
            logger.info("wrote the gallery index %s (%d images)", index_file, len(gallery))
        self.gallery = gallery
        return gallery

    def load_index(self, file: str | os.PathLike[str]) -> GalleryIndex:
        """Use a saved index as the gallery; GalleryError if another model (or input setting) built it."""
        cached = self._read_index(file)
        if cached.model_digest != self.digest:
            raise GalleryError(f"{file}: this index was built with another checkpoint or input settings; "
                               "rebuild it by passing the image folder with --index-file")
        self.gallery = cached
        return cached

    def _read_cache(self, index_file: str | os.PathLike[str] | None) -> GalleryIndex | None:
        """The index at ``index_file`` to reuse, or None: none there, or unusable (then it is rebuilt, saying why)."""
        if index_file is None or not Path(index_file).is_file():
            return None
        try:
            return self._read_index(index_file)
        except GalleryError as exc:
            logger.warning("%s; re-encoding the gallery", exc)
            return None

    @staticmethod
    def _read_index(file: str | os.PathLike[str]) -> GalleryIndex:
        try:
            obj = load_file(file)
        except CheckpointError as exc:  # a damaged, truncated or foreign file means the same thing here
            raise GalleryError(f"cannot be read as a gallery index: {exc}") from None
        if not isinstance(obj, dict) or obj.get("format") != INDEX_FORMAT:
            raise GalleryError(f"{file}: not a gallery index (expected format={INDEX_FORMAT!r})")
        if "sha256" not in obj:
            raise GalleryError(f"{file}: an index written before indexes carried a checksum; rebuild it by passing "
                               "the image folder with --index-file")
        if index_checksum(obj) != obj["sha256"]:
            raise GalleryError(f"{file}: the gallery index does not match its sha256 (the file is corrupt); "
                               "rebuild it by passing the image folder with --index-file")
        features = obj["features"]
        if features.dim() != 2 or features.shape[0] != len(obj["paths"]):
            raise GalleryError(f"{file}: features {tuple(features.shape)} do not match {len(obj['paths'])} paths")
        return GalleryIndex(list(obj["paths"]), features, obj["model_digest"], [list(s) for s in obj["signature"]],
                            [tuple(s) for s in obj["skipped"]])

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
    def _require_gallery(self) -> GalleryIndex:
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
        scores = self.encode_texts(texts) @ gallery.features.t()  # [Q, G]
        top_scores, top_idx = torch.topk(scores, min(max(k, depth), len(gallery)), dim=1)
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
        scores = self.encode_images([image])[0] @ gallery.features.t()
        top_scores, top_idx = torch.topk(scores, min(k, len(gallery)))
        return self._rows(gallery, top_idx, top_scores, None, k)

    @staticmethod
    def _rows(gallery: GalleryIndex, idx: torch.Tensor, scores: torch.Tensor, itm: torch.Tensor | None,
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
