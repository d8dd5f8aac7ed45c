from pathlib import Path

import pytest
import yaml

from utils.config import ConfigError, config_from_dict, load_config, save_config


def write(path, data):
    path.write_text(yaml.safe_dump(data))
    return path


def test_defaults_are_the_authors_recipe():
    cfg = load_config(None)
    assert cfg.train.lr == 0.005 and cfg.train.bias_lr_factor == 2.0
    assert cfg.input.image_size == (384, 128)
    assert cfg.model.stride == 12 and cfg.model.bmm_ratio == 0.2


def test_base_chain_and_overrides(tmp_path):
    parent = write(tmp_path / "parent.yaml", {"train": {"epochs": 7, "lr": 0.1}, "model": {"depth": 3}})
    child = write(tmp_path / "child.yaml", {"_base_": "parent.yaml", "train": {"lr": 0.2}})
    cfg = load_config(child, ["model.depth=5", "eval.selection_split=null", "input.image_size=[64, 32]"])
    assert cfg.train.epochs == 7  # from the parent
    assert cfg.train.lr == 0.2  # child wins over parent
    assert cfg.model.depth == 5  # command line wins over files
    assert cfg.eval.selection_split is None
    assert cfg.input.image_size == (64, 32)
    assert cfg.train.momentum == 0.9  # untouched default
    assert parent.exists()


def test_int_is_accepted_for_float_and_coerced():
    cfg = load_config(None, ["train.lr=1"])
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)


@pytest.mark.parametrize("override, words", [
    ("train.lrr=0.1", ["train.lrr", "train.lr"]),
    ("modle.depth=2", ["modle.depth"]),
    ("train.epochs=abc", ["train.epochs", "int"]),
    ("train.epochs=1.5", ["train.epochs", "int"]),
    ("data.check_images=yes", ["data.check_images", "header"]),
    ("train=3", ["train", "section"]),
    ("noequals", ["key=value"]),
    ("train.amp=fp32", ["train.amp", "bf16"]),
    ("train.amp=null", ["train.amp"]),
    ("eval.selection_split=test", ["eval.selection_split", "val"]),
    ("eval.selection_metric=R5", ["eval.selection_metric"]),
    ("text.levels=[word,clause]", ["text.levels", "clause"]),
])
def test_bad_overrides_name_the_key(override, words):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    for word in words:
        assert word in str(err.value)


def test_unknown_dataset_format_is_named_by_the_readers():
    # The readers own the list of formats (one entry per dataset); the config only carries the name.
    from engine.data import load_eval_splits

    with pytest.raises(ConfigError) as err:
        load_eval_splits(load_config(None, ["data.format=cuhk"]))
    assert "data.format" in str(err.value) and "cuhkpedes" in str(err.value)


@pytest.mark.parametrize("task, override", [
    ("pretrain", "input.num_views=1"),
    ("pretrain", "text.levels=[sentence]"),
    ("pretrain", "data.format=icfg"),
    ("retrieval", "data.eval_root=data/CUHK-PEDES"),
    ("retrieval", "text.pretrain_max_words=20"),
])
def test_a_key_the_task_ignores_is_an_error(task, override):
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"task={task}", override])
    assert override.split("=")[0] in str(err.value) and task in str(err.value)
    load_config(None, [f"task={'retrieval' if task == 'pretrain' else 'pretrain'}", override])  # the other task


def test_unknown_key_in_file_names_file_key_and_closest(tmp_path):
    bad = write(tmp_path / "bad.yaml", {"train": {"warmup_epoch": 3}})
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    message = str(err.value)
    assert "bad.yaml" in message and "train.warmup_epoch" in message and "train.warmup_epochs" in message


def test_frozen_and_round_trip(tmp_path):
    cfg = load_config(None, ["train.epochs=3"])
    with pytest.raises(AttributeError):
        cfg.train.epochs = 4
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again.to_dict() == cfg.to_dict()
    assert again.digest() == cfg.digest()
    assert config_from_dict(cfg.to_dict()).digest() == cfg.digest()
    assert load_config(None, ["train.epochs=4"]).digest() != cfg.digest()


def test_replace_checks_sections():
    cfg = load_config(None)
    changed = cfg.replace(["train.epochs=2"], model={"stride": 16})
    assert changed.model.stride == 16 and changed.train.epochs == 2 and cfg.model.stride == 12
    with pytest.raises(ConfigError):
        cfg.replace(model={"strid": 16})


def test_every_recipe_loads_with_the_values_it_names():
    """Each recipe resolves, every key it names holds the value it names (nothing dropped or overridden by its
    _base_ chain), and the resolved config survives a round trip through its own YAML."""
    import json

    from utils.config import CONFIG_DIR

    recipes = sorted(p for p in CONFIG_DIR.glob("*.yaml") if p.name != "base.yaml")
    assert len(recipes) >= 10 and (CONFIG_DIR / "demo.yaml") in recipes
    checked = 0
    for path in recipes:
        cfg = load_config(path)
        resolved = json.loads(json.dumps(cfg.to_dict()))  # tuples as lists, as YAML writes them
        raw = yaml.safe_load(path.read_text())
        raw.pop("_base_", None)
        for section, value in raw.items():
            for key, named in (value.items() if isinstance(value, dict) else [(None, value)]):
                got = resolved[section] if key is None else resolved[section][key]
                assert got == named, (path.name, section, key, got, named)
                checked += 1
        assert load_config(None).digest() != cfg.digest(), path.name  # a recipe changes something
        assert config_from_dict(cfg.to_dict()).digest() == cfg.digest(), path.name
    assert checked > 50


def test_numbers_as_people_write_them_and_list_files(tmp_path, caplog):
    cfg = load_config(None, ["train.lr=1e-5", "train.min_lr=5E-3", "train.epochs=1_000", "eval.batch_size=64"])
    assert (cfg.train.lr, cfg.train.min_lr, cfg.train.epochs, cfg.eval.batch_size) == (1e-05, 0.005, 1000, 64)
    corpora = tmp_path / "corpora.json"
    corpora.write_text('[{"annotation": "a.json", "image_root": "imgs"}]')
    cfg = load_config(None, ["task=pretrain", f"data.pretrain_corpora={corpora}"])
    assert cfg.data.pretrain_corpora[0].annotation == "a.json"
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(None, ["task=pretrain", f"data.pretrain_corpora={tmp_path / 'none.json'}"])
    with caplog.at_level("WARNING"):
        load_config(None, ["train.epochs=3", "train.warmup_epochs=7"])  # a message not given before: each is logged once
    assert "never leaves warmup" in caplog.text


@pytest.mark.parametrize("override", ["train.lr=0", "train.save_every_epochs=0", "eval.chunk_size=0",
                                      "eval.batch_size=0", "train.batch_size_per_gpu=-1", "text.max_text_len=600"])
def test_sizes_and_rates_are_checked_at_load(override):
    with pytest.raises(ConfigError, match=override.split("=")[0]):
        load_config(None, [override])


def test_a_checkpoint_config_with_a_retired_key_loads_and_says_so(tmp_path, caplog):
    """Checkpoints written before search.hnsw_max_images was retired still load; a file naming it is an error."""
    saved = load_config("configs/demo.yaml").to_dict()
    saved["search"]["hnsw_max_images"] = 200000
    with caplog.at_level("INFO", logger="utils.config"):
        cfg = config_from_dict(saved, source="old.pth")
    assert "old.pth: config key search.hnsw_max_images is retired" in caplog.text
    assert cfg.search.scan_max_images == 20000000 and "hnsw_max_images" not in cfg.search.to_dict()
    (tmp_path / "c.yaml").write_text("_base_: " + str(Path("configs/demo.yaml").resolve()) +
                                     "\nsearch:\n  hnsw_max_images: 5\n")
    with pytest.raises(ConfigError, match="unknown config key 'search.hnsw_max_images'"):
        load_config(tmp_path / "c.yaml")
