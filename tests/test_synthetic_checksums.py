"""Every synthetic style writes the same bytes in every format as when its checksums were recorded.

``tests/fixtures/synthetic_checksums.json`` holds the sha256 of every file of a 30-identity, seed-0 dataset per
style and format. A deliberate change to a style's output means new checksums for that style (say why in the
commit); a new style adds its entries with ``PYTHONPATH=. python3 tests/test_synthetic_checksums.py``, which
writes only the missing ones and never overwrites a recorded entry.

The bytes depend on the image libraries too (a Pillow release may resample or encode differently), so the
fixture records their versions and the comparison is skipped, saying so, under other versions.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import PIL
import pytest
from PIL import features

from datasets.synthetic import FORMATS, STYLES, make_synthetic

FIXTURE = Path(__file__).parent / "fixtures" / "synthetic_checksums.json"
NUM_IDS, SEED = 30, 0


def checksums(style: str, fmt: str, folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file of the small dataset of ``style`` and ``fmt`` written to ``folder``."""
    return _digests(make_synthetic(fmt, folder, num_ids=NUM_IDS, seed=SEED, style=style))


def _digests(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _versions() -> dict[str, str]:
    return {"pillow": PIL.__version__, "numpy": np.__version__, "libjpeg": str(features.version("jpg")),
            "zlib": str(features.version("zlib"))}


def _recorded() -> dict[str, dict[str, str]]:
    return json.loads(FIXTURE.read_text(encoding="utf-8"))["datasets"]


def _same_libraries() -> None:
    recorded = json.loads(FIXTURE.read_text(encoding="utf-8"))["versions"]
    if recorded != _versions():
        pytest.skip(f"checksums recorded with {recorded}, these libraries are {_versions()}")


def test_every_style_and_format_is_recorded() -> None:
    assert sorted(_recorded()) == sorted(f"{style}/{fmt}" for style in STYLES for fmt in FORMATS)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("style", STYLES)
def test_output_is_byte_identical(tmp_path: Path, style: str, fmt: str) -> None:
    _same_libraries()
    expected = _recorded()[f"{style}/{fmt}"]
    got = checksums(style, fmt, tmp_path / "out")
    assert sorted(got) == sorted(expected)  # the same files
    changed = sorted(name for name in expected if got[name] != expected[name])
    assert not changed, f"{len(changed)} of {len(expected)} files changed, e.g. {changed[:3]}"


@pytest.mark.slow
def test_the_command_line_writes_the_same_bytes(tmp_path: Path) -> None:
    """``python -m datasets.synthetic`` with the arguments the README shows, pretraining corpus included."""
    _same_libraries()
    out = tmp_path / "corpus"
    done = subprocess.run([sys.executable, "-m", "datasets.synthetic", "--format", "pretrain", "--out", str(out),
                           "--num-ids", str(NUM_IDS), "--seed", str(SEED), "--style", "street"],
                          cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, check=True)
    assert json.loads(done.stdout) == [{"annotation": str(out / "pretrain.json"), "image_root": str(out)}]
    assert _digests(out) == _recorded()["street/pretrain"]


def _add_missing() -> None:
    if FIXTURE.exists() and json.loads(FIXTURE.read_text(encoding="utf-8"))["versions"] != _versions():
        raise SystemExit(f"{FIXTURE} was recorded with other library versions; check out the commit that "
                         "recorded it, rewrite the whole file with these libraries, then come back")
    recorded = _recorded() if FIXTURE.exists() else {}
    with tempfile.TemporaryDirectory() as tmp:
        for style in STYLES:
            for fmt in FORMATS:
                if f"{style}/{fmt}" not in recorded:
                    recorded[f"{style}/{fmt}"] = checksums(style, fmt, Path(tmp) / style / fmt)
                    print(f"recorded {style}/{fmt}: {len(recorded[f'{style}/{fmt}'])} files")
    FIXTURE.write_text(json.dumps({"versions": _versions(), "datasets": recorded}, indent=0, sort_keys=True) + "\n",
                       encoding="utf-8")


if __name__ == "__main__":
    sys.exit(_add_missing())
