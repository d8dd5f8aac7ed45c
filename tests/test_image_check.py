"""The image check before training: the exists/header/full levels on broken files, grouping by top-level folder,
the thread pool against a serial run, and the progress bar."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.images import truncate, write_image
from datasets import image_check
from datasets.image_check import common_base, group_by_folder, probe_image, scan_images
from datasets.readers import check_images
from datasets.records import MissingImagesError, Record


# ----------------------------------------------------------------------------------------------- check levels

def test_probe_levels_on_broken_files(tmp_path: Path) -> None:
    good = write_image(tmp_path / "good.jpg")
    truncated = truncate(write_image(tmp_path / "truncated.jpg"))
    padded = tmp_path / "padded.jpg"  # bytes after the end marker: Pillow decodes it, so must the check
    padded.write_bytes(good.read_bytes() + b"\0" * 100)
    png = write_image(tmp_path / "good.png", "PNG")
    no_iend = tmp_path / "no_iend.png"  # verify() complains, but the pixels decode: training could use it
    no_iend.write_bytes(png.read_bytes()[:-12])
    half_png = truncate(write_image(tmp_path / "half.png", "PNG", (64, 64)))
    html = tmp_path / "html.jpg"
    html.write_text("<html>404 not found</html>")
    gif = write_image(tmp_path / "a.gif", "GIF")

    def levels(path: Path) -> list[str]:
        return [probe_image(str(path), mode)[0] for mode in ("exists", "header", "full")]

    assert levels(good) == levels(padded) == levels(png) == levels(no_iend) == levels(gif) == ["ok"] * 3
    assert levels(truncated) == levels(half_png) == levels(html) == ["ok", "undecodable", "undecodable"]
    assert levels(tmp_path / "none.jpg") == ["missing"] * 3
    assert "truncated" in probe_image(str(truncated), "header")[1]
    assert "cannot identify image file" in probe_image(str(html), "header")[1]


def test_grouping_by_top_level_folder(tmp_path: Path) -> None:
    base = tmp_path / "imgs"
    paths = [str(base / p) for p in ("CUHK01/a.png", "Market/x/b.jpg", "CUHK01/c.png", "top.jpg", "Market/d.jpg",
                                     "CUHK01/e.png")]
    assert common_base(paths) == str(base)
    groups = group_by_folder(paths, str(base))
    assert [(name, len(found)) for name, found in groups] == [("CUHK01/", 3), ("Market/", 2), ("./", 1)]
    assert groups[0][1] == [paths[0], paths[2], paths[5]]  # input order inside a group
    assert image_check.folder_of(str(tmp_path / "elsewhere" / "f.jpg"), str(base)) == str(tmp_path / "elsewhere") + "/"


def test_scan_in_parallel_matches_serial_and_groups_problems(tmp_path: Path) -> None:
    base = tmp_path / "imgs"
    paths = []
    for i in range(150):  # three thread-pool chunks
        folder = ("A", "B", "C")[i % 3]
        path = base / folder / f"{i:03d}.jpg"
        if i % 10 == 0 and folder == "A":
            paths.append(str(path))  # missing: A 0, 30, 60, 90, 120
            continue
        write_image(path)
        if i % 25 == 1:
            truncate(path)  # B 1, C 26, A 51, B 76, C 101, A 126
        paths.append(str(path))
    serial = scan_images(paths + paths[:5], "header", workers=1)
    parallel = scan_images(paths, "header", workers=4)
    assert serial.total == parallel.total == 150
    assert serial.missing == parallel.missing == [str(base / "A" / f"{i:03d}.jpg") for i in (0, 30, 60, 90, 120)]
    assert serial.undecodable == parallel.undecodable
    assert [p for p, _ in parallel.undecodable] == [str(base / f) for f in (
        "B/001.jpg", "C/026.jpg", "A/051.jpg", "B/076.jpg", "C/101.jpg", "A/126.jpg")]
    assert [(name, len(found)) for name, found in parallel.undecodable_groups()] == [("A/", 2), ("B/", 2), ("C/", 2)]
    assert parallel.base == str(base)
    summary = parallel.summary(max_listed=2)
    assert summary.startswith(f"5 of 150 images are missing under {base} (by folder: A/ 5; first: {base}/A/000.jpg, "
                              f"{base}/A/030.jpg); 6 of 150 images cannot be decoded under {base} (by folder: A/ 2, "
                              f"B/ 2, C/ 2; first: {base}/B/001.jpg (image file is truncated")
    assert "\n" not in summary  # the engine prints it as one error line
    exists_only = scan_images(paths, "exists")
    assert len(exists_only.missing) == 5 and exists_only.undecodable == []

    with pytest.raises(MissingImagesError) as caught:
        check_images([Record(p, "c", 0, 0) for p in paths])  # the default level decodes headers
    assert len(caught.value.report.missing) == 5 and len(caught.value.report.undecodable) == 6


def test_progress_bar_only_when_asked_or_on_a_terminal(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    paths = [str(write_image(tmp_path / f"{i}.jpg")) for i in range(3)]
    scan_images(paths)  # not a terminal: silent
    assert capsys.readouterr().err == ""
    scan_images(paths, progress=True)
    assert "checking images (header)" in capsys.readouterr().err
