"""What can be known before work starts is checked before the run folder is touched or an evaluation runs: value
ranges of keys, the shape of data.pretrain_corpora, data roots, enough data for one batch, writable outputs, the
fields of a model folder's config.json, the synthetic writer's arguments. Each mistake is one line naming the key,
field or argument at fault."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

import train_cuhkpedes
import train_pretrain
from tests.tiny import tiny_overrides
from utils.config import ConfigError, load_config


def train(out: Path, data: Path, *extra: str, fmt: str = "cuhkpedes") -> dict:
    main = train_pretrain.main if fmt == "pretrain" else train_cuhkpedes.main
    return main(["--output-dir", str(out), *tiny_overrides(data, fmt, epochs=1, steps=1), *extra])


# ------------------------------------------------------------------------------------------ key values
@pytest.mark.parametrize("value", ["nan", ".nan", "inf", "-.inf", "null", "-0.5"])
def test_itm_negative_hardness_must_be_finite_and_not_negative(value):
    with pytest.raises(ConfigError, match=r"key 'loss.itm_negative_hardness' must be a finite number >= 0.0 \(the "
                                          r"ITM negatives' sampling temperature .*0 draws them uniformly, 1 as the "
                                          r"authors do.*a negative value would prefer the easiest ones\), got"):
        load_config(None, [f"loss.itm_negative_hardness={value}"])
    assert load_config(None, ["loss.itm_negative_hardness=0"]).loss.itm_negative_hardness == 0.0


def test_no_key_takes_nan_or_infinity():
    with pytest.raises(ConfigError, match="key 'train.weight_decay' must be a finite number, got nan"):
        load_config(None, ["train.weight_decay=.nan"])
    with pytest.raises(ConfigError, match="key 'loss.cmpm_weight' must be a finite number, got inf"):
        load_config(None, ["loss.cmpm_weight=inf"])


def test_pretrain_corpora_entries_must_be_annotation_and_image_root_objects(tmp_path):
    listed = tmp_path / "corpus.json"
    listed.write_text("[]")
    for value in (f"[{listed}]", "[{annotation: a.json}]", "[{annotation: a.json, image_root: 3}]"):
        with pytest.raises(ConfigError, match=r"key 'data.pretrain_corpora' entry 0 must be an object \{annotation: "
                                              r"JSON file of \{image, caption\}, image_root: image folder\}"):
            load_config(None, ["task=pretrain", f"data.pretrain_corpora={value}"])
    good = load_config(None, ["task=pretrain", "data.pretrain_corpora=[{annotation: a.json, image_root: imgs}]"])
    assert good.data.pretrain_corpora[0].image_root == "imgs"


# ------------------------------------------------------------------------------------------ data roots
def test_data_root_that_is_a_file_is_named_before_anything_is_written(tmp_path):
    root = tmp_path / "reid_raw.json"
    root.write_text("[]")
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match=f"^error: data.root {root} is a file, not a folder"):
        train(out, root)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reid_raw.json"]  # no run folder, no .partial folder


def test_a_wrong_eval_root_is_reported_as_data_eval_root(tmp_path):
    eval_root = tmp_path / "not_a_dataset"
    eval_root.mkdir()
    (eval_root / "notes.txt").write_text("hello")
    with pytest.raises(SystemExit) as caught:
        train(tmp_path / "run", tmp_path / "corpus", f"data.eval_root={eval_root}", fmt="pretrain")
    message = str(caught.value)
    assert "set data.eval_root=PATH" in message and "data.root=" not in message, message
    assert not (tmp_path / "run").exists()


# -------------------------------------------------------------------------------- enough data for a batch
@pytest.mark.parametrize("fmt, extra, expected", [
    ("cuhkpedes", ["data.synthetic_num_ids=1"], "data.synthetic_num_ids 1: num_ids must be at least 3"),
    ("cuhkpedes", ["data.synthetic_num_ids=28", "train.batch_size_per_gpu=256"],
     r"gives 0 batch\(es\) per rank, fewer than one optimizer step \(a batch needs 64 distinct identities .*\): "
     r"train.batch_size_per_gpu 256 x 1 process\(es\)"),
    ("pretrain", ["train.batch_size_per_gpu=64"], r"the training data \(\d+ records\) gives 0 batch\(es\) per rank"),
    ("cuhkpedes", ["train.grad_accum_steps=50"], r"gives \d+ batch\(es\) per rank, fewer than one optimizer step: "
                                                 r".*train.grad_accum_steps 50"),
])
def test_too_little_data_for_one_step_is_refused_before_the_run_folder_exists(tmp_path, fmt, extra, expected):
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match=f"^error: .*{expected}"):
        train(out, tmp_path / "data", *extra, fmt=fmt)
    assert not out.exists()


# ----------------------------------------------------------------------------------------------- outputs
def test_a_read_only_output_dir_is_refused_before_anything_is_read(tmp_path, read_only):
    from utils.checkpoint import OutputNotWritableError, check_writable_folder

    mount = read_only(tmp_path / "ro")
    with pytest.raises(SystemExit, match=f"^error: --output-dir: cannot write in {mount} \\(where {mount / 'run'} "
                                         "would be created\\): Read-only file system"):
        train(mount / "run", tmp_path / "data")
    assert not (tmp_path / "data").exists()  # refused before the data was even synthesized
    with pytest.raises(OutputNotWritableError, match="the model folder: .* is a file, not a folder"):
        (tmp_path / "a_file").write_text("")
        check_writable_folder(tmp_path / "a_file" / "below", "the model folder")
    check_writable_folder(tmp_path / "new" / "deeper", "fine")  # a folder to be made under a writable one
    assert not (tmp_path / "new").exists() and not list(tmp_path.glob(".write-check*"))


# ------------------------------------------------------------------------------------------ model folders
def test_model_folder_config_fields_of_the_wrong_shape_are_named(tmp_path):
    from engine.model_folder import read_model_folder
    from utils.checkpoint import CheckpointError

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"not read")
    meta = {"format": "ivt-model-folder", "format_version": 2, "config": {}, "files_sha256": "abc"}
    (folder / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"config.json: field 'files_sha256' must map file names to sha256 "
                                              r"digests \(64 hex digits\), found 'abc'"):
        read_model_folder(folder)
    meta.update(files_sha256={"model.safetensors": "abc"})
    (folder / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="field 'files_sha256'"):
        read_model_folder(folder)
    meta.update(files_sha256={}, tokenizer="learnt")
    (folder / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="field 'tokenizer' must be an object, found 'learnt'"):
        read_model_folder(folder)


# ------------------------------------------------------------------------------- python -m datasets.synthetic
def test_synthetic_writer_arguments_are_one_line(tmp_path):
    from datasets.synthetic.__main__ import main

    (tmp_path / "a_file").write_text("")
    with pytest.raises(SystemExit, match=f"^error: --out {tmp_path / 'a_file'} is a file, not a folder"):
        main(["--format", "cuhkpedes", "--out", str(tmp_path / "a_file")])
    for number in ("-3", "0", "2"):
        with pytest.raises(SystemExit, match=f"^error: --num-ids {number}: num_ids must be at least 3 for format "
                                             "'cuhkpedes'"):
            main(["--format", "cuhkpedes", "--out", str(tmp_path / "out"), "--num-ids", number])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


# ------------------------------------------------------------------------------ logging between tests
def test_a_command_sets_up_logging(tmp_path):
    """The first of a pair: setup_logging sets the root logger to INFO and adds its handlers, as every command
    and run does; the conftest fixture restore_logging must undo it for the next test."""
    import logging

    from utils.logging_utils import setup_logging

    setup_logging(tmp_path)
    assert logging.getLogger().level == logging.INFO


def test_the_next_test_starts_with_the_root_logger_as_it_was():
    import logging

    root = logging.getLogger()
    assert root.level == logging.WARNING  # the level a session starts with (Python's default)
    assert not [h for h in root.handlers if type(h).__module__ == "utils.logging_utils"
                or getattr(h, "stream", None) is sys.stderr]  # neither the previous test's log.txt nor its console
