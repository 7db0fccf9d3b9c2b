"""USE branch end to end on the real VOC photo through Luigi: GT captions naming its objects, the oracle grounder
(GT boxes for phrases naming a class) and the oracle SAM (the GT instance best fitting the box). Every GT
instance must come back as a segment with mask IoU >= 0.9 carrying an expression that names its class."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pseudoseg.pipeline.core.artifacts import record_unit_file
from pseudoseg.pipeline.core.masks import decode_rle
from pseudoseg.pipeline.core.sample_set import write_sample_set
from pseudoseg.schemas import BOX_MASKS, BOXES, CAPTIONS, EXPRESSIONS, SEGMENTS, SHARD_STATS
from pseudoseg.tasks.engine.base import build_tasks
from pseudoseg.tasks.stages.use import UseSegments
from tests.helpers import luigi_settings
from tests.oracles import ALIASES, OracleGT, register_oracle

CAPTIONS_TEXT = [
    "Several people are sitting around a dining table with chairs, and a bottle stands on the table.",
    "A person is eating at the table. There is another person behind the chair.",
]


@pytest.fixture(scope="module")
def voc_folder(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("use_oracle")
    samples = write_sample_set(tmp / "samples", with_bad_inputs=False)
    images = tmp / "images"
    images.mkdir()
    (images / samples.voc_image.name).write_bytes(samples.voc_image.read_bytes())
    captions = tmp / "captions.parquet"
    pq.write_table(pa.table({"file_name": [samples.voc_image.name] * len(CAPTIONS_TEXT), "caption": CAPTIONS_TEXT}),
                   captions)
    return images, captions


def run_use(gt: OracleGT, images: Path, captions: Path, out: Path, **use_overrides) -> Path:
    register_oracle(gt)
    settings = {"gt_captions": str(captions), "generate_captions": "false", **use_overrides}
    with luigi_settings(models={"preset": "oracle"}, use=settings):
        result = build_tasks([UseSegments(images=str(images), dataset="voc", out=str(out))],
                             local_scheduler=True, workers=1, log_level="WARNING")
    assert result.scheduling_succeeded, result.summary_text
    return out / "voc"


def class_words(name: str) -> tuple[str, ...]:
    return (name, *ALIASES.get(name, ()))


def recovered(gt: OracleGT, out: Path) -> tuple[list[dict], dict[int, float]]:
    (seg_file,) = out.glob("use_segments/*/shard-000000.parquet")
    segments = SEGMENTS.read_parquet(seg_file).to_pylist()
    masks = [decode_rle({"size": [s["height"], s["width"]], "counts": s["rle_counts"]}) for s in segments]
    best: dict[int, float] = {}  # GT instance → IoU of its best segment, 0 if that segment's texts miss its class
    for k in range(1, len(gt.instance_classes)):
        inst = gt.instance_label == k
        ious = [np.logical_and(inst, m).sum() / np.logical_or(inst, m).sum() for m in masks]
        j = int(np.argmax(ious))
        words = class_words(gt.class_names[gt.instance_classes[k]])
        names_class = any(any(w in t["expression"].lower() for w in words) for t in segments[j]["texts"])
        best[k] = float(ious[j]) if names_class else 0.0
    return segments, best


def test_every_gt_instance_is_recovered_with_its_expressions(voc_folder, gt, tmp_path):
    images, captions = voc_folder
    # Two settings differ from the defaults, each for a reason the next test measures: box NMS off, because
    # the GT boxes of two stacked chairs overlap at box IoU 0.75, which the paper's 0.7 box NMS merges; and
    # speckle cleanup off, because the oracle SAM returns exact GT masks (nothing to clean) and filling 5-16 px
    # gaps of a 105 px occluded chair costs it IoU. Everything else is the paper's.
    out = run_use(gt, images, captions, tmp_path / "out", box_nms_thresh=1.0, cleanup_area=0)
    segments, best = recovered(gt, out)
    assert len(best) == 19
    assert min(best.values()) >= 0.90, " ".join(f"{k}:{v:.2f}" for k, v in sorted(best.items()))

    # Accounting and provenance along the chain.
    for stage, contract in (("use_captions", CAPTIONS), ("use_expressions", EXPRESSIONS), ("use_boxes", BOXES),
                            ("use_box_masks", BOX_MASKS), ("use_segments", SEGMENTS)):
        (done,) = out.glob(f"{stage}/*/_meta/shard-000000.done.json")
        stats = SHARD_STATS.read_json(done)
        assert stats["in_count"] == stats["ok_count"] + stats["rejected_count"]
        rows = contract.read_parquet(record_unit_file(done, "parquet"))
        assert len(rows) > 0, stage
    caption_rows = CAPTIONS.read_parquet(next(out.glob("use_captions/*/shard-000000.parquet"))).to_pylist()
    assert [r["caption"] for r in caption_rows] == CAPTIONS_TEXT and {r["source"] for r in caption_rows} == {"gt"}
    # Both captions name people, so their person segments carry texts from both captions, merged by mask NMS.
    sources = {(t["caption_index"]) for s in segments for t in s["texts"]}
    assert sources == {0, 1}
    merged = [s for s in segments if len({t["caption_index"] for t in s["texts"]}) == 2]
    assert merged and all(len(s["box_indices"]) >= 2 for s in merged)


def test_with_all_defaults_only_the_stacked_chair_is_lost(voc_folder, gt, tmp_path):
    images, captions = voc_folder
    out = run_use(gt, images, captions, tmp_path / "out")  # paper defaults: box NMS 0.7; cleanup 20 px
    _, best = recovered(gt, out)
    lost = [k for k, iou in best.items() if iou < 0.5]
    assert len(lost) == 1 and gt.class_names[gt.instance_classes[lost[0]]] == "chair", best
    # Cleanup trims fragments/gaps of tiny occluded chairs only; every other instance stays >= 0.8.
    assert min(iou for k, iou in best.items() if k not in lost) >= 0.8, best
    params = json.loads(next(out.glob("use_boxes/*/_meta/params.json")).read_text())
    assert params["params"]["box_nms_thresh"] == 0.7


@pytest.mark.slow  # the USE branch end to end on tiny LLaVA / Grounding DINO / SAM
def test_use_branch_runs_with_tiny_real_architectures(voc_folder, tiny_cache, tmp_path):
    """Tiny random-init LLaVA / Grounding DINO / SAM through the real adapters: valid rows at every stage."""
    images, captions = voc_folder
    # Random-init SAM predicts IoUs ~0.2 and stability 0, so the paper's 0.6 thresholds would reject every
    # mask (as they should); thresholds off here to exercise the writing path.
    settings = {"gt_captions": str(captions), "generate_captions": "true", "caption_max_new_tokens": 12,
                "pred_iou_thresh": -1, "stability_score_thresh": -1}
    with luigi_settings(models={"preset": "tiny", "cache_dir": str(tiny_cache)}, use=settings):
        result = build_tasks([UseSegments(images=str(images), dataset="voc", out=str(tmp_path / "out"))],
                             local_scheduler=True, workers=1, log_level="WARNING")
    assert result.scheduling_succeeded, result.summary_text
    out = tmp_path / "out" / "voc"
    captions_rows = CAPTIONS.read_parquet(next(out.glob("use_captions/*/shard-000000.parquet"))).to_pylist()
    assert {r["source"] for r in captions_rows} == {"gt", f"mllm:{tiny_cache}/tiny-v1/captioner"}
    box_masks = BOX_MASKS.read_parquet(next(out.glob("use_box_masks/*/shard-000000.parquet"))).to_pylist()
    segments = SEGMENTS.read_parquet(next(out.glob("use_segments/*/shard-000000.parquet"))).to_pylist()
    assert box_masks and segments
    for seg in segments:
        mask = decode_rle({"size": [seg["height"], seg["width"]], "counts": seg["rle_counts"]})
        assert mask.shape == (375, 500) and mask.sum() == seg["area"] and seg["texts"]


def test_coco_export_and_preview_gallery(voc_folder, gt, tmp_path):
    from pycocotools.coco import COCO

    from pseudoseg.tasks.stages.export import ExportCoco, UsePreview

    images, captions = voc_folder
    register_oracle(gt)
    args = {"images": str(images), "dataset": "voc", "out": str(tmp_path / "out")}
    with luigi_settings(models={"preset": "oracle"}, use={"gt_captions": str(captions), "generate_captions": "false"}):
        result = build_tasks([ExportCoco(**args), UsePreview(**args)], local_scheduler=True, workers=1,
                             log_level="WARNING")
        assert result.scheduling_succeeded, result.summary_text
        coco_path = ExportCoco(**args).output().path
    out = tmp_path / "out" / "voc"
    segments = SEGMENTS.read_parquet(next(out.glob("use_segments/*/shard-000000.parquet"))).to_pylist()
    coco = COCO(coco_path)
    assert len(coco.getAnnIds()) == len(segments) > 0
    for ann, seg in zip(coco.loadAnns(sorted(coco.getAnnIds())), segments, strict=True):
        np.testing.assert_array_equal(coco.annToMask(ann).astype(bool), decode_rle(
            {"size": [seg["height"], seg["width"]], "counts": seg["rle_counts"]}))
    (index,) = out.glob("use_preview/*/shard-000000/index.html")
    html = index.read_text()
    assert "chair" in html and len(list(index.parent.glob("*.png"))) == 1
    assert f"<strong>{next(images.iterdir()).name}</strong>" in html  # headed by the source file's name
    top = (index.parent.parent / "index.html").read_text()  # one page over every shard
    assert '<a href="shard-000000/index.html">shard 0</a> (1 images)' in top
    assert 'class="banner"' not in top  # oracle, not the tiny preset


def test_coco_export_images_line_up_with_their_masks(voc_folder, gt, tmp_path):
    """The export writes each image at the size its masks were made on (data/ beside coco.json): an EXIF-rotated
    JPEG and a giant downsized at ingest still line up; pycocotools reads every mask at its image's shape."""
    from PIL import Image
    from pycocotools.coco import COCO

    from pseudoseg.tasks.stages.export import ExportCoco

    images, _ = voc_folder
    folder = tmp_path / "images"
    folder.mkdir()
    (source,) = images.iterdir()
    (folder / "plain.jpg").write_bytes(source.read_bytes())
    photo = Image.open(source).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display: stored 500×375, upright 375×500
    photo.save(folder / "rotated.jpg", exif=exif.tobytes(), quality=95)
    photo.resize((800, 600)).save(folder / "giant.png")  # over max_side 640 (set below): stored downsized to 640×480
    names = ["plain.jpg", "rotated.jpg", "giant.png"]
    captions = tmp_path / "captions.parquet"
    pq.write_table(pa.table({"file_name": [n for n in names for _ in CAPTIONS_TEXT],
                             "caption": CAPTIONS_TEXT * len(names)}), captions)
    register_oracle(gt)
    args = {"images": str(folder), "dataset": "mixed", "out": str(tmp_path / "out")}
    with luigi_settings(models={"preset": "oracle"}, use={"gt_captions": str(captions), "generate_captions": "false"},
                        ingest={"max_side": 640}):  # a small giant: same downsizing, a fraction of the pixels
        result = build_tasks([ExportCoco(**args)], local_scheduler=True, workers=1, log_level="WARNING")
        assert result.scheduling_succeeded, result.summary_text
        coco_path = Path(ExportCoco(**args).output().path)
    coco = COCO(str(coco_path))
    data_dir = coco_path.parent / coco.dataset["info"]["images_dir"]
    shapes = {}
    for img in coco.loadImgs(coco.getImgIds()):
        with Image.open(data_dir / img["file_name"]) as im:
            shapes[img["id"]] = (im.height, im.width)
        assert shapes[img["id"]] == (img["height"], img["width"])
    by_source = {Path(i["pseudoseg_source"]).name: shapes[i["id"]] for i in coco.loadImgs(coco.getImgIds())}
    assert by_source == {"plain.jpg": (375, 500), "rotated.jpg": (500, 375), "giant.png": (480, 640)}
    anns = coco.loadAnns(coco.getAnnIds())
    assert {a["image_id"] for a in anns} == set(shapes)  # every image has segments
    for ann in anns:
        assert coco.annToMask(ann).shape == shapes[ann["image_id"]]
