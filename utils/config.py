"""YAML configuration: layered ``_base_`` files, ``key=value`` overrides, strict keys, frozen result.

Every key that exists is declared, with its default and a comment, in ``configs/base.yaml``. A recipe file
names the keys it changes; ``_base_`` (a path or a list of paths relative to the file) layers files. Any key
absent from ``base.yaml`` is an error that names the closest valid key, and a value whose type differs from
the default's is an error too (an int may stand for a float; a default of ``null`` accepts anything).
"""
from __future__ import annotations

import copy
import difflib
import hashlib
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from utils.errors import UserError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
BASE_CONFIG = CONFIG_DIR / "base.yaml"

logger = logging.getLogger(__name__)


class ConfigError(UserError, ValueError):
    """A configuration file or override is malformed; the message names the file and the key."""


# The synthetic dataset's styles (datasets/synthetic/, one module each; a style's place seeds its image noise, so
# new ones are appended). mixed draws pretraining corpora, never a fine-tuning target.
SYNTHETIC_STYLES = ("classic", "street", "cctv", "mixed")

# Keys whose value must be one of a few words; checked when a config is built, not deep inside a run.
# (data.format and data.eval_format are checked by the dataset readers, which own the list of formats.)
CHOICES = {
    "task": ("retrieval", "pretrain"),
    "data.check_images": ("none", "exists", "header", "full"),
    # the one list of synthetic styles: datasets/synthetic reads it and its table of style modules must match it
    "data.synthetic_style": SYNTHETIC_STYLES,
    "data.eval_synthetic_style": SYNTHETIC_STYLES,
    "train.optimizer": ("sgd", "adamw"),
    "train.optimizer_impl": ("default", "foreach", "fused"),
    "data.augment_on": ("cpu", "device"),
    "loss.itm_negative_check": ("host", "device"),
    "train.schedule_unit": ("epoch", "step"),
    "train.amp": ("bf16", "fp16", "none"),
    "eval.selection_split": ("val", None),  # never the test split
    "eval.test_split": ("train", "val", "test"),
    "eval.selection_metric": ("R1", "mAP", "R1+mAP"),
    "eval.protocol": ("standard", "authors"),
    "eval.examples_pick": ("spread", "worst"),
    "eval.no_match_rule": ("cosine", "zscore", "both"),
    "eval.no_match_short_queries": ("clauses", "first_clause"),
    "eval.no_match_quantile_on": ("new_people", "fitted_people"),
    "search.backend": ("auto", "exact", "faiss"),
    "search.feature_dtype": ("float32", "float16"),
}

# Sizes and counts that must be at least this much (a zero batch, chunk or save interval has no meaning).
MINIMUM = {
    "train.epochs": 1, "eval.explain_steps": 1, "train.batch_size_per_gpu": 1, "train.grad_accum_steps": 1, "train.log_every_steps": 1,
    "train.eval_every_epochs": 1, "train.save_every_epochs": 1, "train.max_steps_per_epoch": 0,
    "train.warmup_epochs": 0, "train.dist_timeout_minutes": 1, "train.stall_warning_seconds": 0,
    "train.stall_stop_seconds": 0,
    "eval.batch_size": 1, "eval.chunk_size": 1, "eval.rerank_top_k": 0, "eval.rerank_batch_size": 1,
    "eval.save_examples": 0, "data.num_workers": 0, "data.max_image_pixels": 1, "data.synthetic_num_ids": 1,
    "data.eval_synthetic_num_ids": 1, "input.num_views": 1, "sampler.num_instances": 1, "text.max_text_len": 3,
    "text.mlm_max_masks": 0, "data.shards_shuffle_buffer": 1, "data.shards_epoch_samples": 0,
    "search.shard_images": 1, "search.exact_chunk_rows": 1, "search.faiss_min_images": 1,
    "search.ivf_max_lists": 1, "search.pq_bytes": 1, "search.train_sample_images": 1, "search.nprobe": 1,
    "search.ef_search": 1, "search.rescore_candidates": 1, "search.expand_top": 0, "search.expand_nprobe": 1, "search.verify_max_mib": 0,
    "search.scan_max_images": 0, "eval.no_match_held_out_splits": 0,
}
# Keys that checkpoints of earlier versions may carry and today's schema dropped: a saved config rebuilt from a
# checkpoint loses them with one log line (a YAML file or an override naming one is still an error).
RETIRED = {"search.hnsw_max_images": "HNSW gave way to scanning every 4-bit code (search.scan_max_images)"}
# The same for keys where null means "the default rule".
NULL_OR_MINIMUM = {"data.max_bad_images": 0}
# Learning rates and similar that must be strictly positive.
POSITIVE = ("train.lr",)
# Keys with a bounded range: (least, greatest or None, what the range means), checked finite and inside it.
BOUNDED = {
    "loss.itm_negative_hardness": (0.0, None, "the ITM negatives' sampling temperature over the ITC logits: 0 draws "
                                   "them uniformly, 1 as the authors do, larger draws harder negatives; a negative "
                                   "value would prefer the easiest ones"),
    "eval.rerank_blend_alpha": (0.0, 1.0, "the sign test's level a blend weight above 0 must pass on the split it "
                                "is chosen on: 1 keeps the best weight of the grid whatever the evidence, 0 never "
                                "leaves the cosine order"),
}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_ranges(data: dict, source: str) -> None:
    for dotted, least in {**MINIMUM, **NULL_OR_MINIMUM}.items():
        value = _lookup(data, dotted)
        if value is None and dotted in NULL_OR_MINIMUM:
            continue
        if not _is_number(value) or value < least:
            raise ConfigError(f"{source}: key {dotted!r} must be a number >= {least}"
                              f"{' (or null)' if dotted in NULL_OR_MINIMUM else ''}, got {value!r}")
    size = data["input"]["image_size"]
    if not (isinstance(size, list) and len(size) == 2 and all(isinstance(s, int) and not isinstance(s, bool)
                                                               and s > 0 for s in size)):
        raise ConfigError(f"{source}: key 'input.image_size' must be [height, width], two positive integers, "
                          f"got {size!r}")
    for dotted, (least, greatest, meaning) in BOUNDED.items():
        value = _lookup(data, dotted)
        if (not _is_number(value) or not math.isfinite(value) or value < least
                or (greatest is not None and value > greatest)):
            span = f">= {least}" if greatest is None else f"in [{least}, {greatest}]"
            raise ConfigError(f"{source}: key {dotted!r} must be a finite number {span} ({meaning}), got {value!r}")
    _check_finite(data, source)
    for dotted in POSITIVE:
        value = _lookup(data, dotted)
        if not _is_number(value) or not value > 0:
            raise ConfigError(f"{source}: key {dotted!r} must be a number > 0, got {value!r}")
    if data["text"]["max_text_len"] > data["model"]["max_text_positions"]:
        raise ConfigError(f"{source}: text.max_text_len {data['text']['max_text_len']} exceeds "
                          f"model.max_text_positions {data['model']['max_text_positions']}")


def _check_finite(data: Mapping, source: str, prefix: str = "") -> None:
    """No number of a config is NaN or infinite (YAML reads .nan and .inf; no key gives them a meaning)."""
    for key, value in data.items():
        if isinstance(value, Mapping):
            _check_finite(value, source, f"{prefix}{key}.")
        elif isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{source}: key '{prefix}{key}' must be a finite number, got {value!r}")


def _check_corpora(entries: Any, source: str) -> None:
    """data.pretrain_corpora: a list of {annotation: FILE, image_root: FOLDER} objects (prepare_pretrain's corpora.json)."""
    for number, entry in enumerate(entries):
        if not (isinstance(entry, Mapping) and set(entry) == {"annotation", "image_root"}
                and all(isinstance(v, str) and v for v in entry.values())):
            raise ConfigError(f"{source}: key 'data.pretrain_corpora' entry {number} must be an object "
                              "{annotation: JSON file of {image, caption}, image_root: image folder} (the corpora.json "
                              f"python -m datasets.prepare_pretrain writes), got {entry!r}")


# Keys a task never reads: a value other than the default there is a mistake the user should hear about.
IGNORED_BY_TASK = {
    "retrieval": ("data.pretrain_corpora", "data.pretrain_shards", "data.shards_shuffle_buffer",
                  "data.shards_epoch_samples", "data.eval_root", "data.eval_format", "data.eval_synthetic_style",
                  "data.eval_synthetic_num_ids", "text.pretrain_max_words"),
    "pretrain": ("data.format", "data.annotation_file", "input.num_views", "text.levels", "sampler.num_instances"),
}


_WARNED: set[str] = set()


def warn_once(key: str, message: str, *args: Any) -> None:
    """logger.warning on the process of rank 0 only (torchrun's RANK, read before any process group exists), and
    once per process for each ``key`` however often (and from whichever file) a config is loaded, so a launch
    with N processes prints it once."""
    if os.environ.get("RANK", "0") != "0" or key in _WARNED:
        return
    _WARNED.add(key)
    logger.warning(message, *args)


def _lookup(data: Mapping, dotted: str) -> Any:
    node: Any = data
    for part in dotted.split("."):
        node = node[part]
    return node


def _check_values(data: dict, source: str) -> None:
    for dotted, allowed in CHOICES.items():
        value = _lookup(data, dotted)
        if value not in allowed:
            shown = ", ".join("null" if a is None else repr(a) for a in allowed)
            raise ConfigError(f"{source}: key {dotted!r} must be one of {shown}, got {value!r}")
    for text_level in data["text"]["levels"]:
        if text_level not in ("word", "phrase", "sentence"):
            raise ConfigError(f"{source}: text.levels entries must be word, phrase or sentence, got {text_level!r}")
    _check_ranges(data, source)
    _check_corpora(data["data"]["pretrain_corpora"], source)
    if data["eval"]["no_match_quantile_on"] == "new_people" and data["eval"]["no_match_held_out_splits"] < 1:
        raise ConfigError(f"{source}: eval.no_match_quantile_on=new_people estimates the rate on new people from "
                          "eval.no_match_held_out_splits half-splits of the people, which is 0; set it to at least "
                          "1 or eval.no_match_quantile_on=fitted_people")
    reference = data["train"]["reference_batch_size"]
    if reference is not None and reference < 1:
        raise ConfigError(f"{source}: key 'train.reference_batch_size' must be >= 1 or null, got {reference!r}")
    if data["train"]["epochs"] <= data["train"]["warmup_epochs"]:
        warn_once(f"warmup {data['train']['epochs']} {data['train']['warmup_epochs']}",
                  "%s: train.epochs %d <= train.warmup_epochs %d: the run never leaves warmup", source,
                  data["train"]["epochs"], data["train"]["warmup_epochs"])
    defaults = _load_schema()
    for dotted in IGNORED_BY_TASK[data["task"]]:
        value = _lookup(data, dotted)
        if value != _lookup(defaults, dotted):
            raise ConfigError(f"{source}: task {data['task']!r} does not use {dotted} (set to {value!r}); "
                              f"leave it at its default {_lookup(defaults, dotted)!r} or change task")


class Config(Mapping):
    """A frozen, nested mapping with attribute access (``cfg.train.lr``)."""

    def __init__(self, data: Mapping[str, Any]):
        frozen = {k: Config(v) if isinstance(v, Mapping) else _freeze(v) for k, v in data.items()}
        object.__setattr__(self, "_data", frozen)

    def __getattr__(self, name: str) -> Any:
        try:
            return self._data[name]
        except KeyError:
            raise AttributeError(f"config has no key {name!r}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("Config is frozen; pass key=value overrides instead of assigning")

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self):
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return f"Config({self.to_dict()!r})"

    def __reduce__(self):
        return (Config, (self.to_dict(),))

    def to_dict(self) -> dict:
        return {k: v.to_dict() if isinstance(v, Config) else _thaw(v) for k, v in self._data.items()}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)

    def digest(self) -> str:
        """A short content hash, stable across key order, to tell configs apart in results files."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, default=str)
        return hashlib.sha256(canonical.encode()).hexdigest()[:12]

    def replace(self, overrides: Iterable[str] = (), **sections: Mapping[str, Any]) -> "Config":
        """A new Config with nested dict ``sections`` and then ``key=value`` strings applied, checked."""
        data = self.to_dict()
        schema = _load_schema()
        for name, value in sections.items():
            _merge_checked(data, {name: value}, schema, source="<replace>")
        _apply_overrides(data, overrides, schema)
        _check_values(data, "<replace>")
        return Config(data)


def _freeze(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(Config(v) if isinstance(v, Mapping) else _freeze(v) for v in value)
    return value


def _thaw(value: Any) -> Any:
    if isinstance(value, tuple):
        return [v.to_dict() if isinstance(v, Config) else _thaw(v) for v in value]
    return value


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, found {type(data).__name__}")
    return data


_SCHEMA_CACHE: dict | None = None


def _load_schema() -> dict:
    global _SCHEMA_CACHE
    if _SCHEMA_CACHE is None:
        _SCHEMA_CACHE = _read_yaml(BASE_CONFIG)
    return copy.deepcopy(_SCHEMA_CACHE)


def _all_keys(schema: Mapping, prefix: str = "") -> list[str]:
    keys = []
    for k, v in schema.items():
        keys.append(prefix + k)
        if isinstance(v, Mapping):
            keys.extend(_all_keys(v, prefix + k + "."))
    return keys


def _unknown_key_error(dotted: str, source: str) -> ConfigError:
    close = difflib.get_close_matches(dotted, _all_keys(_load_schema()), n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"{source}: unknown config key {dotted!r}{hint} (every key is declared in {BASE_CONFIG.name})")


def _as_number(value: Any, want_float: bool) -> Any:
    """``1e-5``, ``5E-3``, ``1_000`` as people write them (YAML 1.1 reads the first two as strings)."""
    if not isinstance(value, str):
        return value
    text = value.strip().replace("_", "")
    try:
        return float(text) if want_float or not text.lstrip("+-").isdigit() else int(text)
    except ValueError:
        return value


LIST_FILE_SUFFIXES = (".json", ".yaml", ".yml")


def _read_list_file(dotted: str, path: str, source: str) -> Any:
    """A list key given as a JSON/YAML file (e.g. the corpora.json that prepare_pretrain writes)."""
    if not Path(path).is_file():
        raise ConfigError(f"{source}: key {dotted!r} names the file {path}, which does not exist")
    try:
        return yaml.safe_load(Path(path).read_text())  # YAML reads JSON too
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: key {dotted!r}: {path} is not valid JSON/YAML: {exc}") from None


def _check_type(dotted: str, default: Any, value: Any, source: str) -> Any:
    if default is None or value is None:
        return value
    if isinstance(default, (int, float)) and not isinstance(default, bool):
        value = _as_number(value, want_float=isinstance(default, float))
    if isinstance(default, list) and isinstance(value, str) and value.endswith(LIST_FILE_SUFFIXES):
        value = _read_list_file(dotted, value, source)
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, str):
        ok = isinstance(value, str)
    elif isinstance(default, list):
        ok = isinstance(value, list)
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise ConfigError(
            f"{source}: key {dotted!r} expects {type(default).__name__} (default {default!r}), "
            f"got {type(value).__name__} {value!r}"
        )
    return value


def _merge_checked(target: dict, update: Mapping, schema: Mapping, source: str, prefix: str = "") -> None:
    for key, value in update.items():
        dotted = prefix + str(key)
        if key not in schema:
            raise _unknown_key_error(dotted, source)
        default = schema[key]
        if isinstance(default, Mapping):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{source}: key {dotted!r} is a section; expected a mapping, got {value!r}")
            _merge_checked(target[key], value, default, source, dotted + ".")
        else:
            target[key] = _check_type(dotted, default, copy.deepcopy(value), source)


def _layer_file(path: Path, schema: dict, seen: tuple[Path, ...] = ()) -> dict:
    """The merged data of ``path`` and its ``_base_`` chain, on top of the schema defaults."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: _base_ cycle through {[str(p) for p in seen]}")
    raw = _read_yaml(path)
    bases = raw.pop("_base_", [])
    if isinstance(bases, str):
        bases = [bases]
    data = copy.deepcopy(schema)
    for base in bases:
        base_path = (path.parent / base) if not Path(base).is_absolute() else Path(base)
        if base_path.resolve() == BASE_CONFIG.resolve():
            continue
        _merge_checked(data, _layer_file(base_path, schema, seen + (path,)), schema, str(base_path))
    _merge_checked(data, raw, schema, str(path))
    return data


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _apply_overrides(data: dict, overrides: Iterable[str], schema: dict) -> None:
    for text in overrides:
        dotted, value = parse_override(text)
        parts = dotted.split(".")
        node, sch = data, schema
        for part in parts[:-1]:
            if part not in sch or not isinstance(sch[part], Mapping):
                raise _unknown_key_error(dotted, "command line")
            node, sch = node[part], sch[part]
        leaf = parts[-1]
        if leaf not in sch:
            raise _unknown_key_error(dotted, "command line")
        if isinstance(sch[leaf], Mapping):
            raise ConfigError(f"command line: {dotted!r} is a section; override one of its keys")
        node[leaf] = _check_type(dotted, sch[leaf], value, "command line")


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> Config:
    """Defaults from base.yaml, then ``path`` with its ``_base_`` chain, then ``key=value`` overrides."""
    schema = _load_schema()
    data = _layer_file(Path(path), schema) if path is not None else copy.deepcopy(schema)
    _apply_overrides(data, overrides, schema)
    _check_values(data, str(path) if path is not None else "command line")
    return Config(data)


def config_from_dict(data: Mapping[str, Any], overrides: Iterable[str] = (), source: str = "<dict>") -> Config:
    """Rebuild a config saved in a checkpoint (a plain dict), checked against today's schema."""
    schema = _load_schema()
    merged = copy.deepcopy(schema)
    data = copy.deepcopy(dict(data))
    for dotted, why in RETIRED.items():
        section, key = dotted.split(".")
        if isinstance(data.get(section), Mapping) and key in data[section]:
            data[section] = {k: v for k, v in data[section].items() if k != key}
            logging.getLogger(__name__).info("%s: config key %s is retired and ignored (%s)", source, dotted, why)
    _merge_checked(merged, data, schema, source)
    _apply_overrides(merged, overrides, schema)
    _check_values(merged, source)
    return Config(merged)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write ``cfg`` as YAML atomically: a full disk leaves no empty or partial config.yaml behind."""
    from utils.checkpoint import atomic_write

    text = cfg.to_yaml().encode()
    atomic_write(path, lambda handle: handle.write(text), expected_bytes=len(text))
