"""Convert the usual image-caption distributions and the person-centric corpora to the common pretraining format.

Each corpus becomes ``<out>/<name>.json``, a list of ``{"image": path relative to its image root, "caption"}``
(person corpora add ``"identity"``, the owners' image key; see datasets/person_corpora.py for their layouts).
Images that are not on disk are dropped and counted in the summary (never silently); ``<out>/corpora.json``
holds the list to paste into a config's pretraining corpora.

    python -m datasets.prepare_pretrain --out data/pretrain \\
        --coco dataset_coco.json --coco-root data/coco --vg region_descriptions.json --vg-root data/vg \\
        --cc3m cc3m.tsv --cc3m-root data/cc3m --sbu sbu.tsv --sbu-root data/sbu
    python -m datasets.prepare_pretrain --out data/pretrain --mals data/MALS/gene_attrs --mals-root data/MALS/images
"""
from __future__ import annotations

import argparse
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from datasets.person_corpora import PERSON_CORPORA, CorpusCounts
from datasets.readers import read_json
from datasets.records import DataFormatError, describe_value
from utils.checkpoint import atomic_write
from utils.errors import user_errors_as_one_line

logger = logging.getLogger(__name__)

KARPATHY_TRAIN_SPLITS = ("train", "restval")
VG_IMAGE_FOLDERS = ("VG_100K", "VG_100K_2", "")
_TSV_HEADER_WORDS = {"caption", "captions", "text", "image", "image_path", "file", "filename", "filepath", "path"}
_MAX_LISTED = 5


@dataclass
class CorpusReport:
    """What happened to one corpus on its way to the common format."""

    name: str
    read: int = 0  # captions read from the source
    empty: int = 0  # empty captions skipped
    duplicates: int = 0  # repeated phrases of one VG image, repeated (image, caption) pairs of a person corpus
    rejected: int = 0  # captions the owners' loader would not use (LUPerson-MLLM: an unfilled template)
    missing_images: int = 0  # unique images not found under the root
    dropped: int = 0  # captions dropped with those images
    written: int = 0
    first_missing: list[str] = field(default_factory=list)


def _caption_items(path: str, image: str, captions: Any, index: int, report: CorpusReport) -> list[dict]:
    if isinstance(captions, str):
        captions = [captions]
    if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
        raise DataFormatError(path, "a caption string or a list of them", index=index, field="caption",
                              got=describe_value(captions))
    report.read += len(captions)
    kept = [c.strip() for c in captions if c.strip()]
    report.empty += len(captions) - len(kept)
    return [{"image": image, "caption": c} for c in kept]


def _image_caption_list(path: str, data: list, report: CorpusReport) -> list[dict]:
    """An ALBEF-style list of ``{"image", "caption"}`` (the caption may be a list)."""
    items: list[dict] = []
    for index, entry in enumerate(data):
        if not isinstance(entry, dict):
            raise DataFormatError(path, "a JSON object", index=index, got=describe_value(entry))
        for name in ("image", "caption"):
            if name not in entry:
                raise DataFormatError(path, "the field to be present", index=index, field=name)
        if not isinstance(entry["image"], str):
            raise DataFormatError(path, "a string", index=index, field="image", got=describe_value(entry["image"]))
        items += _caption_items(path, entry["image"], entry["caption"], index, report)
    return items


def convert_coco(annotation: str | os.PathLike[str], report: CorpusReport) -> list[dict]:
    """Karpathy's ``dataset_coco.json`` (train + restval images, every sentence) or an ALBEF-style list."""
    path = str(annotation)
    data = read_json(path)
    if isinstance(data, list):
        return _image_caption_list(path, data, report)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataFormatError(path, "Karpathy's {'images': [...]} or a list of {image, caption}",
                              field="images", got=describe_value(data)[:60])
    items: list[dict] = []
    for index, image in enumerate(data["images"]):
        if not isinstance(image, dict):
            raise DataFormatError(path, "a JSON object", index=index, field="images", got=describe_value(image))
        for name in ("filename", "split", "sentences"):
            if name not in image:
                raise DataFormatError(path, "the field to be present", index=index, field=name)
        if image["split"] not in KARPATHY_TRAIN_SPLITS:
            continue
        sentences = image["sentences"]
        if not isinstance(sentences, list) or not all(isinstance(s, dict) and isinstance(s.get("raw"), str)
                                                      for s in sentences):
            raise DataFormatError(path, "a list of {'raw': caption}", index=index, field="sentences",
                                  got=describe_value(sentences))
        relative = os.path.join(image.get("filepath", ""), image["filename"])
        items += _caption_items(path, relative, [s["raw"] for s in sentences], index, report)
    return items


def convert_vg(annotation: str | os.PathLike[str], image_root: str | os.PathLike[str],
               report: CorpusReport) -> list[dict]:
    """Visual Genome region descriptions: one caption per distinct region phrase of each image."""
    path = str(annotation)
    data = read_json(path)
    if not isinstance(data, list):
        raise DataFormatError(path, "a list of {'regions': [...]} image entries", got=describe_value(data))
    # One listing per folder instead of a stat per image; VG spreads its images over two folders.
    located: dict[str, str] = {}
    for folder in reversed(VG_IMAGE_FOLDERS):
        directory = Path(image_root) / folder
        if directory.is_dir():
            located.update({name: os.path.join(folder, name) for name in os.listdir(directory)})
    items: list[dict] = []
    for index, entry in enumerate(data):
        if not isinstance(entry, dict) or not isinstance(entry.get("regions"), list):
            raise DataFormatError(path, "an object with a 'regions' list", index=index, field="regions",
                                  got=describe_value(entry))
        seen: set[tuple[int, str]] = set()
        for region in entry["regions"]:
            if not isinstance(region, dict) or not isinstance(region.get("phrase"), str) \
                    or isinstance(region.get("image_id"), bool) or not isinstance(region.get("image_id"), int):
                raise DataFormatError(path, "regions of {'phrase': str, 'image_id': int}", index=index,
                                      field="regions", got=describe_value(region))
            report.read += 1
            phrase = region["phrase"].strip()
            if not phrase:
                report.empty += 1
                continue
            key = (region["image_id"], phrase.lower())
            if key in seen:
                report.duplicates += 1
                continue
            seen.add(key)
            name = f"{region['image_id']}.jpg"
            items.append({"image": located.get(name, os.path.join(VG_IMAGE_FOLDERS[0], name)), "caption": phrase})
    return items


def convert_caption_file(source: str | os.PathLike[str], report: CorpusReport) -> list[dict]:
    """CC3M/SBU as ``caption<TAB>image-file`` lines (header optional) or a JSON list of {image, caption}."""
    path = str(source)
    with open(path, encoding="utf-8") as handle:
        head = handle.read(1024).lstrip()
    if head.startswith("["):
        return _image_caption_list(path, read_json(path), report)
    items: list[dict] = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            line = line.rstrip("\n").rstrip("\r")
            if not line.strip():
                continue
            if "\t" not in line:
                raise DataFormatError(path, "'caption<TAB>image-file'", index=number, field="line",
                                      got=describe_value(line))
            caption, image = line.rsplit("\t", 1)
            if number == 1 and {caption.strip().lower(), image.strip().lower()} & _TSV_HEADER_WORDS:
                continue
            if image.startswith(("http://", "https://")):
                raise DataFormatError(path, "an image file path (download the images first and list the files)",
                                      index=number, field="image", got=image[:60])
            items += _caption_items(path, image.strip(), caption, number, report)
    return items


def drop_missing_images(items: list[dict], image_root: str | os.PathLike[str], report: CorpusReport) -> list[dict]:
    """Keep items whose image exists under ``image_root`` (or absolutely); count the rest in ``report``."""
    exists: dict[str, bool] = {}
    for item in items:
        if item["image"] not in exists:
            exists[item["image"]] = os.path.isfile(os.path.join(image_root, item["image"]))
    missing = [image for image, found in exists.items() if not found]
    report.missing_images = len(missing)
    report.first_missing = missing[:_MAX_LISTED]
    if exists and len(missing) == len(exists):
        raise FileNotFoundError(
            f"{report.name}: none of the {len(exists)} images was found under '{image_root}' "
            f"(first: {', '.join(missing[:_MAX_LISTED])}); is the image root right?"
        )
    kept = [item for item in items if exists[item["image"]]]
    report.dropped = len(items) - len(kept)
    if missing:
        logger.warning("%s: %d of %d images are missing under %s and %d captions were dropped; first: %s",
                       report.name, len(missing), len(exists), image_root, report.dropped,
                       ", ".join(report.first_missing))
    return kept


def format_summary(reports: Sequence[CorpusReport]) -> str:
    """A table of read, skipped, dropped and written captions per corpus."""
    header = (f"{'corpus':<13} | {'read':>9} | {'empty':>6} | {'dup':>7} | {'rejected':>8} | {'no image':>8} | "
              f"{'dropped':>8} | {'written':>9}")
    lines = [header, "-" * len(header)]
    for r in reports:
        lines.append(f"{r.name:<13} | {r.read:>9} | {r.empty:>6} | {r.duplicates:>7} | {r.rejected:>8} | "
                     f"{r.missing_images:>8} | {r.dropped:>8} | {r.written:>9}")
    return "\n".join(lines)


def convert_person_corpus(name: str, sources: Sequence[str], image_root: str, report: CorpusReport) -> list[dict]:
    """One of datasets.person_corpora's corpora, its counts copied into ``report``."""
    counts = CorpusCounts()
    convert = PERSON_CORPORA[name][0]
    items = convert(sources, image_root, counts) if name == "webperson" else convert(sources, counts)
    report.read, report.empty, report.duplicates, report.rejected = (counts.read, counts.empty, counts.duplicates,
                                                                     counts.rejected)
    return items


def prepare_corpus(name: str, source: str | Sequence[str], image_root: str, out_dir: str | os.PathLike[str]
                   ) -> tuple[dict, CorpusReport]:
    """Convert, check images and write one corpus; returns its corpora-list entry and its report.

    ``source``: the annotation file; for a person corpus (datasets.person_corpora) files or folders.
    """
    report = CorpusReport(name)
    if name in PERSON_CORPORA:
        items = convert_person_corpus(name, [source] if isinstance(source, (str, os.PathLike)) else source,
                                      image_root, report)
    elif name == "coco":
        items = convert_coco(source, report)
    elif name == "vg":
        items = convert_vg(source, image_root, report)
    else:
        items = convert_caption_file(source, report)
    items = drop_missing_images(items, image_root, report)
    report.written = len(items)
    target = Path(out_dir) / f"{name}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(target, lambda handle: handle.write(json.dumps(items).encode("utf-8")))
    return {"annotation": str(target), "image_root": str(image_root)}, report


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for <corpus>.json and corpora.json")
    for name, what in (("coco", "Karpathy dataset_coco.json or a {image, caption} list"),
                       ("vg", "Visual Genome region_descriptions.json"),
                       ("cc3m", "caption<TAB>image-file TSV or a {image, caption} JSON list"),
                       ("sbu", "caption<TAB>image-file TSV or a {image, caption} JSON list")):
        parser.add_argument(f"--{name}", help=what)
        parser.add_argument(f"--{name}-root", help=f"folder the {name} image paths are relative to")
    for name, (_, what) in PERSON_CORPORA.items():
        parser.add_argument(f"--{name.replace('_', '-')}", nargs="+", help=what)
        parser.add_argument(f"--{name.replace('_', '-')}-root", help=f"folder the {name} image paths are relative to"
                            + (" (the images are written there)" if name == "webperson" else ""))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    chosen = [name for name in ("coco", "vg", "cc3m", "sbu", *PERSON_CORPORA) if getattr(args, name)]
    if not chosen:
        parser.error("give at least one corpus (--coco, --vg, --cc3m, --sbu, --"
                     + ", --".join(name.replace("_", "-") for name in PERSON_CORPORA) + ")")
    for name in chosen:
        if not getattr(args, f"{name}_root"):
            flag = name.replace("_", "-")
            parser.error(f"--{flag} needs --{flag}-root")
    corpora, reports = [], []
    with user_errors_as_one_line():
        for name in chosen:
            entry, report = prepare_corpus(name, getattr(args, name), getattr(args, f"{name}_root"), args.out)
            corpora.append(entry)
            reports.append(report)
    with open(Path(args.out) / "corpora.json", "w", encoding="utf-8") as handle:
        json.dump(corpora, handle, indent=2)
    summary = format_summary(reports)
    logger.info("pretraining corpora:\n%s", summary)
    print(summary)
    print(f"corpora list (also in {Path(args.out) / 'corpora.json'}):")
    print(json.dumps(corpora, indent=2))
    return corpora


if __name__ == "__main__":
    main()
