"""`pseudoseg demo` (what `make demo` runs) as a newcomer runs it: a plain `pip install .` into a fresh environment
(not editable), the installed command typed in a terminal, in a folder that is not the repository, on default
settings; the same command again (nothing to redo); then `make export-coco` and `make preview` on the demo's
dataset, which keep the settings it was made with (its segments stay the latest)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from pseudoseg.pipeline.core.artifacts import record_unit_file
from pseudoseg.pipeline.core.sample_set import write_sample_set
from pseudoseg.schemas import MANIFEST, MODEL_PROBE, REJECTS, SEGMENTS, SHARD_STATS
from tests.helpers import REPO, in_terminal
from tests.tasks.test_terminal import user_env

pytestmark = pytest.mark.slow

SHIPPED = ("pipeline", "tasks", "models", "schemas", "setup.cfg", "pyproject.toml", "README.md", "luigi.cfg",
           "demo.cfg")


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh virtual environment with a non-editable `pip install` of a copy of the repository's files; the
    packages pseudoseg depends on are the test environment's (a .pth file), so nothing is downloaded."""
    tmp = tmp_path_factory.mktemp("install")
    source = tmp / "src"
    for name in SHIPPED:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / name, source / name)
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)  # pip, setuptools: ours
    site = Path(sysconfig.get_paths(vars={"base": str(venv), "platbase": str(venv)})["purelib"])
    (site / "test_environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                    "--no-build-isolation", str(source)], check=True, capture_output=True)
    shutil.rmtree(source)  # the installed copy must not need the source folder
    return venv


def run_demo(venv: Path, env: dict[str, str], cwd: Path) -> str:
    code, text = in_terminal([str(venv / "bin" / "pseudoseg"), "demo"], env, cwd, timeout=1200)
    assert code == 0, text
    assert "Traceback" not in text, text
    return text


def test_demo_installed_in_a_terminal_elsewhere_then_again_then_export_and_preview(installed, tmp_path, tiny_cache):
    env = user_env(tmp_path)
    env["HF_HUB_OFFLINE"] = "1"
    models = Path(env["HOME"]) / ".cache" / "pseudoseg" / "models"  # the default [models] cache_dir
    models.parent.mkdir(parents=True)
    models.symlink_to(tiny_cache)  # the session's tiny models, not built once more
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    text = run_demo(installed, env, elsewhere)
    assert re.search(r"^stage +counts +shards +done +failed +ran +skipped +in +ok +rejected", text, re.M)  # the table
    assert re.search(r"^FmbsegLabels +: 100%\|.*\| 1/1 ", text, re.M)  # a bar per stage, finished
    assert "note: Made with the tiny preset: random-init models" in text  # random models say so
    demo = elsewhere / "out" / "demo"
    record = json.loads((demo / "run.json").read_text())
    assert [s["stage"] for s in record["stages"]][:2] == ["Ingest", "ModelProbe"] and not record["warnings"]
    assert record["status"] == "ok" and record["ran"] > 20
    assert {"gallery", "coco.json", "model.pt (TrainUse)", "model.pt (TrainAlignment)"} <= set(record["artifacts"])
    card = (demo / "README.md").read_text(encoding="utf-8")
    assert "## What each folder holds" in card and "**Note:** Made with the tiny preset" in card

    expected = write_sample_set(tmp_path / "expected")
    (done,) = demo.glob("ingest/latest/_meta/shard-000000.done.json")
    stats = SHARD_STATS.read_json(done)
    assert (stats["ok_count"], stats["rejected_count"]) == (expected.expected_good_count,
                                                           expected.expected_reject_count)
    base = str(record_unit_file(done, "parquet")).removesuffix(".parquet")  # data files: shard-N.<suffix>
    assert len(MANIFEST.read_parquet(base + ".parquet")) == expected.expected_good_count
    reasons = {row["reason"] for row in REJECTS.read_parquet(record_unit_file(done, "rejects.parquet")).to_pylist()}
    assert reasons == set(expected.expected_rejects.values())

    (probe,) = demo.glob("model_probe/latest/probe.parquet")
    rows = MODEL_PROBE.read_parquet(probe).to_pylist()
    assert {r["role"] for r in rows} == {"captioner", "grounder", "segmenter", "clip", "fmbseg_clip", "dense",
                                        "cam_clip", "classifier_clip"}
    assert all(r["model"].startswith("tiny:") for r in rows)

    # Every shard stage wrote exactly one finished shard whose accounting adds up, and the model stages produced
    # records (the demo lowers the SAM thresholds random tiny SAM cannot reach, so no stage is empty by design).
    shard_stages = {"ingest", "sam_embeddings", "use_captions", "use_expressions", "use_boxes", "use_box_masks",
                    "use_segments", "fmbseg_dense", "fmbseg_detect", "fmbseg_query_masks", "fmbseg_auto_masks",
                    "fmbseg_labels", "car_labels", "features_use", "features_fmbseg", "use_text", "use_preview"}
    for stage in sorted(shard_stages):
        (stage_done,) = demo.glob(f"{stage}/latest/_meta/shard-000000.done.json")
        s = SHARD_STATS.read_json(stage_done)
        assert s["in_count"] == s["ok_count"] + s["rejected_count"] and s["ok_count"] > 0, (stage, s)
    for trainer in ("train_use", "train_alignment"):
        (model,) = demo.glob(f"{trainer}/latest/model.pt")
        assert (model.parent / "metrics.jsonl").stat().st_size > 0
    assert next(demo.glob("export_coco/latest/coco.json")).stat().st_size > 0
    top = next(demo.glob("use_preview/latest/index.html")).read_text(encoding="utf-8")
    assert 'class="banner"' in top and "random by design" in top  # tiny preset: the gallery says so
    segments = (demo / "use_segments" / "latest").resolve()
    segment_rows = SEGMENTS.read_parquet(segments / "shard-000000.parquet").num_rows
    assert segment_rows > 0

    # The same command again: the sample files are the same bytes, so nothing is redone.
    text = run_demo(installed, env, elsewhere)
    assert "ran 0 unit(s)" in text and json.loads((demo / "run.json").read_text())["ran"] == 0

    # The README's next commands, on the demo's dataset: they run with the settings the demo was made with, so
    # no stage gets a new folder and the demo's segments stay the latest ones.
    for target in ("export-coco", "preview"):
        code, text = in_terminal(["make", "-C", str(REPO), target, f"OUT={elsewhere / 'out'}"], env, elsewhere)
        assert code == 0, text
        assert "other than their latest" not in text and "ran 0 unit(s)" in text, text
        assert (demo / "use_segments" / "latest").resolve() == segments
    assert SEGMENTS.read_parquet(segments / "shard-000000.parquet").num_rows == segment_rows
