"""Human box-text pairs as USE boxes (use-paper §4.1: Visual Genome's region descriptions turned into segments by
SAM): the real VOC photo, its GT instance boxes written as Visual Genome's region_descriptions.json and as a box
Parquet, the oracle SAM (the GT instance best fitting the box). Every instance comes back as a segment carrying its
region's phrase, tagged gt_boxes; bad files are one line before anything runs; bad regions are reject rows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pseudoseg.pipeline.core.masks import decode_rle
from pseudoseg.pipeline.core.sample_set import write_sample_set
from pseudoseg.pipeline.use.gt_boxes import GT_BOX_BASE, GTBoxFileError, Region, parse_gt_boxes, region_rows
from pseudoseg.schemas import BOXES, REJECTS, SEGMENTS
from pseudoseg.tasks.engine.base import build_tasks
from pseudoseg.tasks.stages.use import UseSegments
from tests.helpers import luigi_settings
from tests.oracles import OracleGT, register_oracle


def instance_regions(gt: OracleGT) -> list[dict]:
    """Visual Genome regions (x, y, width, height, phrase) of the photo's GT instances: their tight boxes."""
    regions = []
    for k in range(1, len(gt.instance_classes)):
        ys, xs = np.nonzero(gt.instance_label == k)
        regions.append({"region_id": k, "x": int(xs.min()), "y": int(ys.min()), "width": int(xs.max() - xs.min() + 1),
                        "height": int(ys.max() - ys.min() + 1), "phrase": f"the {gt.class_names[gt.instance_classes[k]]}"})
    return regions


@pytest.fixture(scope="module")
def voc(tmp_path_factory) -> tuple[Path, str]:
    tmp = tmp_path_factory.mktemp("gt_boxes")
    samples = write_sample_set(tmp / "samples", with_bad_inputs=False)
    images = tmp / "images"
    images.mkdir()
    name = "2392.jpg"  # a Visual Genome file name: <image id>.jpg
    (images / name).write_bytes(samples.voc_image.read_bytes())
    return images, name


@pytest.mark.slow  # the USE branch end to end through Luigi, twice
@pytest.mark.parametrize("layout", ["visual_genome", "parquet"])
def test_every_gt_region_becomes_a_segment_with_its_phrase(voc, gt, tmp_path, layout):
    images, name = voc
    regions = instance_regions(gt)
    regions.append({"region_id": 99, "x": 600, "y": 10, "width": 5, "height": 5, "phrase": "outside"})  # off-image
    if layout == "visual_genome":
        boxes = tmp_path / "region_descriptions.json"
        boxes.write_text(json.dumps([{"id": 2392, "regions": regions}, {"id": 7, "regions": []}]))
    else:
        boxes = tmp_path / "boxes.parquet"
        pq.write_table(pa.table({"file_name": [name] * len(regions), **{c: [r[c] for r in regions]
                                for c in ("x", "y", "width", "height", "phrase")}}), boxes)
    register_oracle(gt)
    with luigi_settings(models={"preset": "oracle"},
                        use={"gt_boxes": str(boxes), "generate_captions": "false", "cleanup_area": 0}):
        result = build_tasks([UseSegments(images=str(images), dataset="vg", out=str(tmp_path / "out"))],
                             local_scheduler=True, workers=1, log_level="WARNING")
    assert result.scheduling_succeeded, result.summary_text
    out = tmp_path / "out" / "vg"
    (box_file,) = out.glob("use_gt_boxes/*/shard-000000.parquet")
    rows = BOXES.read_parquet(box_file).to_pylist()
    assert [r["box_index"] for r in rows] == [GT_BOX_BASE + k for k in range(len(regions) - 1)]
    assert {r["source"] for r in rows} == {"gt_boxes"}
    (refused,) = REJECTS.read_parquet(next(out.glob("use_gt_boxes/*/_rejects/shard-000000.parquet"))).to_pylist()
    assert (refused["reason"], refused["source"]) == ("bad_region", f"region:{len(regions) - 1}")

    (seg_file,) = out.glob("use_segments/*/shard-000000.parquet")
    segments = SEGMENTS.read_parquet(seg_file).to_pylist()
    masks = [decode_rle({"size": [s["height"], s["width"]], "counts": s["rle_counts"]}) for s in segments]
    for k in range(1, len(gt.instance_classes)):
        inst = gt.instance_label == k
        ious = [np.logical_and(inst, m).sum() / np.logical_or(inst, m).sum() for m in masks]
        j = int(np.argmax(ious))
        phrase = f"the {gt.class_names[gt.instance_classes[k]]}"
        assert ious[j] >= 0.9 and any(t["phrase"] == phrase and t["source"] == "gt_boxes"
                                      for t in segments[j]["texts"]), (k, ious[j], segments[j]["texts"])


def test_regions_are_mapped_onto_the_stored_image_and_bad_ones_refused():
    regions = [Region((100.0, 50.0, 300.0, 250.0), "a dog"), Region((10.0, 10.0, 10.5, 40.0), "a pole"),
               Region((0.0, 0.0, 50.0, 50.0), "")]
    rows, refused = region_rows("id", regions, orig_hw=(400, 600), stored_hw=(200, 300))  # downsized by 2
    assert [r["box_xyxy"] for r in rows] == [[50.0, 25.0, 150.0, 125.0]]
    assert [k for k, _ in refused] == [1, 2]


@pytest.mark.parametrize("content, says", [
    (b'{"images": []}', "region_descriptions.json is a list of images"),
    (b'[{"id": 1, "regions": [{"x": 1, "y": 2, "width": "wide", "height": 3, "phrase": "p"}]}]',
     "[0].regions[0].width must be a finite number"),
    (b"not json", "GT boxes must be Visual Genome's region_descriptions.json"),
])
def test_a_malformed_box_file_is_one_clear_line(content, says):
    with pytest.raises(GTBoxFileError, match=re_escape(says)):
        parse_gt_boxes(content, "boxes.json")


def re_escape(text: str) -> str:
    import re

    return re.escape(text)


@pytest.mark.slow  # the real `pseudoseg` command
def test_a_malformed_box_file_stops_the_command_before_anything_runs(voc, tmp_path):
    import subprocess
    import sys

    images, _ = voc
    bad = tmp_path / "regions.json"
    bad.write_text('{"images": []}')
    proc = subprocess.run([sys.executable, "-m", "pseudoseg.tasks.report.cli", "run", "UseSegments", "--images", str(images),
                           "--out", str(tmp_path / "out"), "--set", f"use.gt_boxes={bad}"],
                          capture_output=True, text=True, timeout=300)
    (line,) = proc.stderr.splitlines()
    assert proc.returncode == 2 and line.startswith(f"pseudoseg: [use] gt_boxes = '{bad}' (from --set"), proc.stderr
    assert "region_descriptions.json is a list of images" in line and not (tmp_path / "out").exists()
