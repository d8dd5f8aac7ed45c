"""``python -m datasets.check``: the report (split table, images grouped by folder, captions, identities) and the
exit status on fixtures with missing or broken images, on a clean synthetic dataset and on pretraining corpora."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.images import truncate, write_image
from datasets import check, synthetic
from datasets.readers import load_annotations
from datasets.synthetic import make_synthetic

FIXTURES = Path(__file__).parent / "fixtures"
REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------- datasets.check

_LINE = re.compile(r"^ {4}(\S+/)\s+(\d+)  e\.g\. (.*)$")


def _groups(output: str, title: str) -> dict[str, tuple[int, str]]:
    """{folder: (count, examples)} of the '  missing:' or '  undecodable:' block of the report."""
    lines = output.splitlines()
    start = lines.index(f"  {title}:") + 1
    found = {}
    for line in lines[start:]:
        match = _LINE.match(line)
        if not match:
            break
        found[match.group(1)] = (int(match.group(2)), match.group(3))
    return found


def _fixture_with_images(tmp_path: Path, missing: tuple[str, ...]) -> Path:
    root = tmp_path / "cuhk"
    shutil.copytree(FIXTURES / "cuhkpedes_raw", root)
    for entry in json.loads((root / "reid_raw.json").read_text()):
        if entry["file_path"] not in missing:
            write_image(root / "imgs" / entry["file_path"], "PNG" if entry["file_path"].endswith(".png") else "JPEG")
    return root


def test_check_groups_missing_images_by_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = _fixture_with_images(tmp_path, ("CUHK01/0363004.png", "CUHK01/0363003.png", "test_query/p10376_s14337.jpg"))
    (root / "imgs" / "Market" / "0012_c2s1_000451_01.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    assert check.main(["--format", "cuhkpedes", "--root", str(root)]) == 1
    out = capsys.readouterr().out
    assert f"images: 7 checked under {root}/imgs (header check, " in out
    assert "3 missing, 1 undecodable" in out
    assert _groups(out, "missing") == {"CUHK01/": (2, "CUHK01/0363004.png, CUHK01/0363003.png"),
                                       "test_query/": (1, "test_query/p10376_s14337.jpg")}
    [(count, examples)] = _groups(out, "undecodable").values()
    assert count == 1 and examples.startswith("Market/0012_c2s1_000451_01.jpg (cannot identify image file")
    assert "train  |      2 |       3 |        6" in out  # the split table
    assert out.rstrip().endswith("result: FAIL, the data cannot train: 3 missing image(s); 1 undecodable image(s)")

    # existence only: the undecodable file passes, the missing ones do not
    assert check.main(["--format", "cuhkpedes", "--root", str(root), "--no-decode"]) == 1
    out = capsys.readouterr().out
    assert "3 missing, 0 undecodable" in out and "  undecodable:" not in out


def test_check_clean_synthetic_dataset(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = make_synthetic("rstp", tmp_path / "rstp", num_ids=10, seed=1)
    (root / "SYNTHETIC.json").unlink()  # no marker: the published-count rule alone must keep quiet
    assert check.main(["--format", "rstp", "--root", str(root), "--full-decode"]) == 0
    out = capsys.readouterr().out
    splits = load_annotations("rstp", root)
    images = len({r.image_path for r in splits.train + splits.val + splits.test})
    assert f"images: {images} checked under {root}/imgs (full check, " in out and "0 missing, 0 undecodable" in out
    assert "warning" not in out and "published" not in out
    train_ids = synthetic.split_sizes("rstp", 10)["train"]  # 5 images x 2 captions each
    assert (f"identities: {train_ids} in train, records per identity min 10 / median 10 / max 10; 0 with fewer "
            f"than 2 records, {train_ids} with 2 or more") in out
    assert out.rstrip().endswith("result: OK")


def test_check_reports_captions_and_small_identities(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = _fixture_with_images(tmp_path, ())
    data = json.loads((root / "reid_raw.json").read_text())
    data[0]["captions"][1] = " ".join(["word"] * 120)
    data[4]["captions"] = ["", "  "]  # a test entry whose captions are all empty
    data[2]["captions"] = data[2]["captions"][:1]  # identity 12 keeps one train record
    (root / "reid_raw.json").write_text(json.dumps(data))
    assert check.main(["--format", "cuhkpedes", "--root", str(root), "--min-instances", "3"]) == 0
    out = capsys.readouterr().out
    assert ("captions: 1 entry with empty captions (skipped by the reader), 1 caption(s) longer than 100 words"
            in out)
    assert "  empty: test[4] test_query/p10376_s14337.jpg" in out
    assert f"  long: train {root}/imgs/CUHK01/0363004.png: 120 words" in out
    assert "identities: 2 in train, records per identity min 1 / median 4 / max 4; 1 with fewer than 3 records, " \
           "1 with 2 or more" in out
    assert f"  small: label 0: 1 record(s), e.g. {root}/imgs/Market/0012_c2s1_000451_01.jpg" in out
    assert check.main(["--format", "cuhkpedes", "--root", str(root), "--max-words", "200"]) == 0
    assert "0 caption(s) longer than 200 words" in capsys.readouterr().out


def test_check_fails_without_identity_pairs_or_train_records(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = _fixture_with_images(tmp_path, ())
    data = json.loads((root / "reid_raw.json").read_text())
    for entry in data[:3]:
        entry["captions"] = entry["captions"][:1]
    data[1]["id"] = 99  # train: three identities with one record each
    (root / "reid_raw.json").write_text(json.dumps(data))
    assert check.main(["--format", "cuhkpedes", "--root", str(root)]) == 1
    assert "result: FAIL, the data cannot train: no train identity has 2 or more records" in capsys.readouterr().out
    (root / "reid_raw.json").write_text(json.dumps([e for e in data if e["split"] != "train"]))
    assert check.main(["--format", "cuhkpedes", "--root", str(root)]) == 1
    assert "result: FAIL, the data cannot train: the train split is empty" in capsys.readouterr().out


def test_check_reader_error_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "data_captions.json").write_text('[{"id": 1,')
    assert check.main(["--format", "rstp", "--root", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and captured.err.startswith(f"error: {tmp_path}/data_captions.json: expected")
    assert check.main(["--format", "icfg", "--root", str(tmp_path / "none")]) == 1
    assert capsys.readouterr().err.startswith("error: ")
    with pytest.raises(SystemExit) as usage:
        check.main(["--format", "pretrain"])
    assert usage.value.code == 2


def test_check_pretrain_corpora(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = make_synthetic("pretrain", tmp_path / "corpus", num_ids=5, seed=0)
    corpora = tmp_path / "corpora.json"
    corpora.write_text(json.dumps([{"annotation": str(root / "pretrain.json"), "image_root": str(root)}]))
    assert check.main(["--format", "pretrain", "--corpora", str(corpora)]) == 0
    out = capsys.readouterr().out
    captions = len(json.loads((root / "pretrain.json").read_text()))
    assert f"pretraining corpora: {corpora}" in out and f"train  | {captions:>6} |" in out
    assert "identities" not in out and out.rstrip().endswith("result: OK")
    first = root / json.loads((root / "pretrain.json").read_text())[0]["image"]
    truncate(first)
    assert check.main(["--format", "pretrain", "--root", str(root)]) == 1  # the synthetic corpus folder
    out = capsys.readouterr().out
    assert "0 missing, 1 undecodable" in out and "1 undecodable image(s)" in out
    assert check.main(["--format", "pretrain", "--corpora", str(tmp_path / "nope.json")]) == 1
    assert "nope.json" in capsys.readouterr().err


def test_check_runs_as_a_module_without_torch(tmp_path: Path) -> None:
    root = _fixture_with_images(tmp_path, ("Market/0012_c2s1_000451_01.jpg",))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-m", "datasets.check", "--format", "cuhkpedes", "--root", str(root)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and "    Market/       1  e.g. Market/0012_c2s1_000451_01.jpg" in run.stdout
    probe = ("import sys; from datasets.check import main; rc = main(['--format', 'cuhkpedes', '--root', sys.argv[1]]);"
             "print('heavy:', sorted(m for m in ('torch', 'torchvision', 'transformers', 'models') if m in sys.modules))")
    run = subprocess.run([sys.executable, "-c", probe, str(root)], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=120)
    assert run.stdout.rstrip().endswith("heavy: []"), run.stdout + run.stderr


def test_check_hints_at_images_sitting_in_the_root(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = make_synthetic("rstp", tmp_path / "rstp", num_ids=10, seed=1)
    for image in (root / "imgs").iterdir():  # the layout mistake: the images unpacked into the root itself
        image.rename(root / image.name)
    assert check.main(["--format", "rstp", "--root", str(root), "--no-decode"]) == 1
    out = capsys.readouterr().out
    assert f"sit directly in {root} instead of {root}/imgs" in out and f"move them into {root}/imgs/" in out
    # images that are simply absent get no such hint
    for image in root.glob("*.jpg"):
        image.unlink()
    assert check.main(["--format", "rstp", "--root", str(root), "--no-decode"]) == 1
    assert "hint:" not in capsys.readouterr().out
