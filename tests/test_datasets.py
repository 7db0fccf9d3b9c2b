import imgviz
import numpy as np
import pytest
from PIL import Image

from pipeline.datasets import PROTOCOLS, DatasetError, class_names, open_dataset, read_label


def write_voc(root, ids=("2007_000001",)):
    d = imgviz.data.voc()
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


def test_voc21_and_voc20(tmp_path):
    rgb, lab = write_voc(tmp_path)
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


def test_protocols_and_names():
    assert PROTOCOLS["coco_stuff171"].short_side == 448 and PROTOCOLS["cityscapes19"].short_side == 560
    assert PROTOCOLS["voc20"].short_side == 336 and PROTOCOLS["voc20"].crop == 224 and PROTOCOLS["voc20"].stride == 112
    assert {k for k, p in PROTOCOLS.items() if p.background == "threshold"} == {"voc21", "context60", "coco_object"}
    for p in PROTOCOLS.values():
        assert len(class_names(p.vocabulary)) > 0
    assert len(class_names("context60")) == 60 and len(class_names("coco_object81")) == 81


def test_read_label_rejects_rgb(tmp_path):
    Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(tmp_path / "x.png")
    with pytest.raises(DatasetError, match="mode"):
        read_label(tmp_path / "x.png")
