"""`pseudoseg demo` (what `make demo` runs): full DAG on the embedded sample set with tiny models, offline."""

from __future__ import annotations

import json
import re

import pytest

from pseudoseg.pipeline.core.artifacts import record_unit_file
from pseudoseg.pipeline.core.sample_set import write_sample_set
from pseudoseg.schemas import MANIFEST, MODEL_PROBE, REJECTS, SHARD_STATS
from tests.helpers import cli, cli_env

pytestmark = pytest.mark.slow


def test_demo_runs_the_full_dag_offline_and_writes_every_artifact(tmp_path):
    env = cli_env(tmp_path)
    env["HF_HUB_OFFLINE"] = "1"
    proc = cli(["demo", "--out", str(tmp_path / "out"), "--set", f"models.cache_dir={tmp_path / 'models'}"], env)
    text, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, text
    assert re.search(r"^stage +unit +shards +done +failed +ran +skipped +in +ok +rejected", text, re.M)  # the table
    demo_root = tmp_path / "out" / "demo"
    record = json.loads((demo_root / "run.json").read_text())
    assert [s["stage"] for s in record["stages"]][:2] == ["Ingest", "ModelProbe"] and not record["warnings"]
    assert {"gallery", "coco.json", "model.pt (TrainUse)", "model.pt (TrainAlignment)"} <= set(record["artifacts"])
    assert "## What each folder holds" in (demo_root / "README.md").read_text(encoding="utf-8")

    expected = write_sample_set(tmp_path / "expected")
    demo = tmp_path / "out" / "demo"
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
    assert {r["role"] for r in rows} == {"captioner", "grounder", "segmenter", "clip", "dense", "cam_clip",
                                        "classifier_clip"}
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
