"""Overlap changes no byte: every model stage run with images decoded ahead and results post-processed behind
(``[throughput]``) writes exactly the files of the sequential loop (prefetch and post-processing off), in the same
order — also when images fail in the middle of the loop, inside and behind the model call. Tiny models, four small
images of three sizes, both branches and both feature caches, in this process."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest

import pseudoseg.tasks.stages.fmbseg as fmbseg_tasks
import pseudoseg.tasks.stages.use as use_tasks
from pseudoseg.pipeline.fmbseg.pseudo_labels import decode_query_points, dense_sample
from pseudoseg.pipeline.use.pairs import box_mask_row
from pseudoseg.schemas import REJECTS
from pseudoseg.tasks.engine.base import build_tasks
from pseudoseg.tasks.stages.features import FeaturesShard
from pseudoseg.tasks.stages.fmbseg import FmbsegLabels
from pseudoseg.tasks.stages.use import UseSegments
from tests.helpers import luigi_settings, tree_bytes

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIZES = ((48, 64), (64, 48), (48, 64), (40, 70))
# one short noun phrase each: the tiny grounder gives only the boxes whose best token falls in it (a few per image)
CAPTIONS = ["a dog is running very fast", "there is a cat. it is sleeping", "a man is walking slowly",
            "it is very big, a boat"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, tiny_cache) -> dict:
    root = tmp_path_factory.mktemp("throughput")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    entries, annotations = [], []
    for i, (h, w) in enumerate(SIZES):
        cv2.imwrite(str(images / f"im_{i}.png"), cv2.GaussianBlur(rng.integers(0, 256, (h, w, 3), np.uint8), (5, 5), 0))
        entries.append({"id": i, "file_name": f"im_{i}.png"})
        annotations.append({"image_id": i, "caption": CAPTIONS[i]})
    captions = root / "captions.json"
    captions.write_text(json.dumps({"images": entries, "annotations": annotations}))
    return {"images": images, "captions": captions, "models": str(tiny_cache)}


def run_dag(dataset: dict, out: Path, *, overlap: bool) -> dict[str, bytes]:
    throughput = ({"prefetch_images": 2, "decode_threads": 2, "post_behind": 2, "post_threads": 2} if overlap else
                  {"prefetch_images": 0, "post_behind": 0})
    settings = dict(
        models={"preset": "tiny", "cache_dir": dataset["models"], "device": "cpu"},
        throughput=throughput,
        # tiny Grounding DINO scores every query ~1: box NMS at 0.05 keeps a few boxes per caption
        use={"gt_captions": str(dataset["captions"]), "generate_captions": "false",
             "caption_batch_size": 2, "box_threshold": 0.0, "box_nms_thresh": 0.05, "pred_iou_thresh": -1,
             "stability_score_thresh": -1, "grounder_batch_size": 3, "sam_boxes_per_call": 0},
        sam_embeddings={"batch_size": 2},
        fmbseg={"vocabulary": "voc21", "short_side": 112, "min_crops": 0, "points_per_side": 2,
                "pred_iou_thresh": -1, "stability_score_thresh": -1, "min_mask_region_area": 0,
                "min_area_fraction": 0.0, "max_area_fraction": 1.0, "clip_batch_size": 5},
        features_use={"clip_blocks": "last:1", "dino_blocks": "last:1", "batch_size": 2},
        features_fmbseg={"short_side": 56, "batch_size": 2},
    )
    common = {"images": str(dataset["images"]), "dataset": "ds", "out": str(out)}
    with luigi_settings(**settings):
        result = build_tasks([UseSegments(**common), FmbsegLabels(**common),
                              *(FeaturesShard(purpose=p, shard=0, **common) for p in ("use", "fmbseg"))],
                             local_scheduler=True, workers=1, log_level="WARNING")
    assert result.scheduling_succeeded, result.summary_text
    files = tree_bytes(out)
    for name in [n for n in files if n.endswith(".done.json")]:  # the run time is the one thing allowed to differ
        record = json.loads(files[name])
        record.pop("seconds")
        files[name] = json.dumps(record, sort_keys=True).encode()
    return files


def install_faults(monkeypatch, failing_id: str) -> None:
    """Image ``failing_id`` fails behind the loop (box-mask rows, dense-feature serialisation); the second image
    with detections fails inside the loop (query-point decoding: the model call). Call before each run."""
    def behind_fault(fn):
        def wrapped(image_id, *args, **kwargs):
            if image_id == failing_id:
                raise ValueError("injected failure behind the loop")
            return fn(image_id, *args, **kwargs)
        return wrapped

    calls = []

    def model_fault(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise ValueError("injected failure in the model call")
        return decode_query_points(*args, **kwargs)

    monkeypatch.setattr(use_tasks, "box_mask_row", behind_fault(box_mask_row))
    monkeypatch.setattr(fmbseg_tasks, "dense_sample", behind_fault(dense_sample))
    monkeypatch.setattr(fmbseg_tasks, "decode_query_points", model_fault)


@pytest.mark.slow  # every model stage of the DAG on tiny models, twice
def test_overlap_on_equals_the_sequential_loop_byte_for_byte_also_when_images_fail(dataset, tmp_path, monkeypatch):
    failing_id = hashlib.sha256((dataset["images"] / "im_1.png").read_bytes()).hexdigest()[:20]
    install_faults(monkeypatch, failing_id)
    sequential = run_dag(dataset, tmp_path / "sequential", overlap=False)
    install_faults(monkeypatch, failing_id)
    overlapped = run_dag(dataset, tmp_path / "overlapped", overlap=True)
    assert sorted(sequential) == sorted(overlapped)  # the same stage folders: [throughput] is in no hash
    stages = {name.split("/")[1] for name in sequential}
    assert {"sam_embeddings", "use_boxes", "use_box_masks", "fmbseg_dense", "fmbseg_query_masks",
            "fmbseg_auto_masks", "features_use", "features_fmbseg"} <= stages
    assert [n for n in sequential if sequential[n] != overlapped[n]] == []
    found, rows = {}, {}
    for name in sequential:
        stage = name.split("/")[1]
        if "/_rejects/" in name:
            rejects = REJECTS.read_parquet(tmp_path / "sequential" / name).to_pylist()
            found[stage] = [(r["image_id"], r["detail"]) for r in rejects if r["reason"] == "image_error"]
        elif name.endswith("0.parquet"):
            rows[stage] = pq.read_metadata(tmp_path / "sequential" / name).num_rows
    assert found["fmbseg_dense"] == [(failing_id, "ValueError: injected failure behind the loop")]
    assert {i for i, _ in found["use_box_masks"]} == {failing_id}  # one row per box of that image
    assert {d for _, d in found["fmbseg_query_masks"]} == {"ValueError: injected failure in the model call"}
    assert rows["use_box_masks"] >= 6 and rows["fmbseg_query_masks"] >= 2 and rows["features_fmbseg"] == 4
