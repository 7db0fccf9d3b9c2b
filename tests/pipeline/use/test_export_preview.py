"""COCO export of SEGMENTS rows and the overlay/gallery previews (pipeline/use/export.py, pipeline/use/preview.py)."""

from __future__ import annotations

import json
import random

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from pseudoseg.pipeline.core.artifacts import webdataset_tar_bytes
from pseudoseg.pipeline.core.images import decode_image, encode_png
from pseudoseg.pipeline.core.masks import decode_rle, encode_rle, rle_area, rle_bbox
from pseudoseg.pipeline.use.export import coco_from_segments, coco_json_bytes, write_coco_json
from pseudoseg.pipeline.use.preview import preview_frame, preview_shard, render_overlay, write_gallery
from pseudoseg.schemas import SEGMENTS

TRICKY = "the <b>red</b> & \"shiny\" car"


def _text(expression: str, phrase: str | None = None, caption_index: int = 0) -> dict:
    return {"phrase": phrase or expression.split()[-1], "expression": expression, "source": "gt",
            "caption_index": caption_index}


def _segment(image_id: str, segment_id: int, mask: np.ndarray, texts: list[dict], score: float = 0.9) -> dict:
    rle = encode_rle(mask)
    return {
        "image_id": image_id,
        "segment_id": segment_id,
        "height": mask.shape[0],
        "width": mask.shape[1],
        "rle_counts": rle["counts"],
        "area": rle_area(rle),
        "bbox": rle_bbox(rle),
        "score": score,
        "box_indices": [segment_id, segment_id + 10],
        "texts": texts,
    }


def _small_image() -> tuple[np.ndarray, list[dict]]:
    """A 40x60 (HxW) gradient image with 3 segments: two rectangles and a disc overlapping one of them."""
    yy, xx = np.mgrid[0:40, 0:60]
    rgb = np.stack([xx * 4, yy * 6, 255 - xx * 2], axis=-1).astype(np.uint8)
    a = np.zeros((40, 60), bool)
    a[5:20, 4:25] = True
    b = np.zeros((40, 60), bool)
    b[22:38, 30:58] = True
    c = (yy - 28) ** 2 + (xx - 40) ** 2 <= 36
    segments = [
        _segment("img_small", 0, b, [_text("a blue box", "box"), _text(TRICKY, "car", 1), _text("a blue box")]),
        _segment("img_small", 1, a, [_text("the left rectangle", "rectangle")], score=0.8),
        _segment("img_small", 2, c, [], score=0.5),
    ]
    return rgb, segments


def _voc(voc: dict) -> tuple[np.ndarray, list[dict]]:
    names = voc["class_names"]
    segments = [
        _segment("img_voc", i, m, [_text(f"the {names[label]}", names[label])], score=1.0 - i / 100)
        for i, (m, label) in enumerate(zip(voc["masks"], voc["labels"], strict=True))
    ]
    return voc["rgb"], segments


def _manifest(image_id: str, rgb: np.ndarray) -> dict:
    return {"image_id": image_id, "source": f"photos/{image_id}.png", "width": rgb.shape[1],
            "height": rgb.shape[0], "shard": 0, "position": 0}


@pytest.fixture(scope="module")
def data(voc_data) -> dict:
    small, small_segs = _small_image()
    voc, voc_segs = _voc(voc_data)
    return {"small": (small, small_segs), "voc": (voc, voc_segs)}


def test_segment_rows_fit_the_contract(data):
    SEGMENTS.table(data["small"][1] + data["voc"][1])


# -- COCO export ----------------------------------------------------------------------------------------------


def test_coco_export_loads_in_pycocotools_with_exact_masks(data, tmp_path):
    small, small_segs = data["small"]
    voc, voc_segs = data["voc"]
    rows = small_segs + voc_segs
    extra = {"image_id": "img_empty", "source": "photos/empty.jpg", "width": 7, "height": 5}
    manifest = [_manifest("img_voc", voc), extra, _manifest("img_small", small)]
    coco = coco_from_segments(manifest, rows, dataset="unit")
    path = write_coco_json(coco, tmp_path / "out" / "segments.coco.json")
    assert not [p for p in path.parent.iterdir() if p.name != path.name]  # no temporaries left behind

    api = COCO(str(path))
    # Images: sequential 1-based ids in sorted image_id order, file_name = manifest source.
    imgs = api.loadImgs(api.getImgIds())
    assert [i["id"] for i in imgs] == [1, 2, 3]
    assert [i["pseudoseg_image_id"] for i in imgs] == ["img_empty", "img_small", "img_voc"]
    assert [(i["file_name"], i["width"], i["height"]) for i in imgs] == [
        ("photos/empty.jpg", 7, 5), ("photos/img_small.png", 60, 40), ("photos/img_voc.png", 500, 375)]
    assert api.getAnnIds(imgIds=[1]) == []
    assert api.loadCats(api.getCatIds()) == [{"id": 1, "name": "segment", "supercategory": "segment"}]

    by_key = {(r["image_id"], r["segment_id"]): r for r in rows}
    coco_to_pseudo = {i["id"]: i["pseudoseg_image_id"] for i in imgs}
    anns = api.loadAnns(api.getAnnIds())
    assert [a["id"] for a in anns] == list(range(1, len(rows) + 1))
    for ann in anns:
        row = by_key[(coco_to_pseudo[ann["image_id"]], ann["segment_id"])]
        expected = decode_rle({"size": [row["height"], row["width"]], "counts": row["rle_counts"]})
        got = api.annToMask(ann)
        assert got.shape == expected.shape and np.array_equal(got.astype(bool), expected)
        rle = api.annToRLE(ann)
        assert ann["area"] == row["area"] == int(mask_utils.area(rle))
        assert ann["bbox"] == pytest.approx(mask_utils.toBbox(rle).tolist())
        assert ann["iscrowd"] == 0 and ann["category_id"] == 1
        assert ann["score"] == pytest.approx(row["score"])
        assert ann["texts"] == row["texts"]
        assert ann["expressions"] == list(dict.fromkeys(t["expression"] for t in row["texts"]))
        assert ann["box_indices"] == row["box_indices"]
    first = next(a for a in anns if coco_to_pseudo[a["image_id"]] == "img_small" and a["segment_id"] == 0)
    assert first["expressions"] == ["a blue box", TRICKY]  # duplicates removed, order kept
    assert first["phrases"] == ["box", "car"]

    # Usable as a detection result list as well (COCO.loadRes needs score + segmentation).
    res = api.loadRes([{k: a[k] for k in ("image_id", "category_id", "segmentation", "score")} for a in anns])
    assert len(res.getAnnIds()) == len(anns)


def test_coco_export_is_deterministic_and_order_free(data, tmp_path):
    rows = data["small"][1] + data["voc"][1]
    manifest = [_manifest("img_small", data["small"][0]), _manifest("img_voc", data["voc"][0])]
    one = coco_json_bytes(coco_from_segments(manifest, rows, dataset="unit"))
    shuffled = rows[:]
    random.Random(3).shuffle(shuffled)
    two = coco_json_bytes(coco_from_segments(manifest[::-1], shuffled, dataset="unit"))
    assert one == two
    write_coco_json(json.loads(one), tmp_path / "a.json")
    write_coco_json(json.loads(one), tmp_path / "b.json")
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes() == one
    assert b"<b>red</b>" in one  # JSON text is stored verbatim (escaping is the HTML's job)
    info = json.loads(one)["info"]
    assert set(info) == {"description", "version", "contributor", "segments_schema"}  # no dates


def test_coco_export_rejects_mixed_artifacts(data):
    small, segs = data["small"]
    with pytest.raises(ValueError, match="no manifest row"):
        coco_from_segments([], segs, dataset="unit")
    with pytest.raises(ValueError, match="image is"):
        coco_from_segments([{**_manifest("img_small", small), "width": 61}], segs, dataset="unit")
    with pytest.raises(ValueError, match="duplicate image_id"):
        coco_from_segments([_manifest("img_small", small)] * 2, segs, dataset="unit")
    with pytest.raises(ValueError, match="duplicate segment"):
        coco_from_segments([_manifest("img_small", small)], segs + segs[:1], dataset="unit")


# -- overlay ----------------------------------------------------------------------------------------------------


def test_preview_frame_maps_xy_and_sizes():
    f = preview_frame(500, 1000, 100)  # height, width
    assert f.new_hw == (50, 100)
    assert f.apply_pixel(999, 0) == (99, 0) and f.apply_pixel(0, 499) == (0, 49)
    assert f.apply_pixel(500, 250) == (50, 25)
    assert f.apply_pixel(-5, 10_000) == (0, 49)  # clamped inside
    tall = preview_frame(2000, 3, 768)
    assert tall.new_hw == (768, 1)
    assert preview_frame(40, 60, 768).new_hw == (40, 60)


def test_overlay_tints_masks_only(data):
    rgb, segs = data["small"]
    out = render_overlay(rgb, segs, max_expressions=0)
    assert out.shape == rgb.shape and out.dtype == np.uint8
    union = np.zeros(rgb.shape[:2], bool)
    for s in segs:
        m = decode_rle({"size": [s["height"], s["width"]], "counts": s["rle_counts"]})
        assert (out[m] != rgb[m]).any(axis=-1).all(), f"segment {s['segment_id']} not tinted everywhere"
        union |= m
    assert np.array_equal(out[~union], rgb[~union])  # without labels nothing outside a mask changes
    assert np.array_equal(rgb, data["small"][0]) and rgb is data["small"][0]  # input untouched


def test_overlay_labels_stay_near_their_segments():
    rgb = np.full((200, 300, 3), 90, np.uint8)
    cat = np.zeros((200, 300), bool)
    cat[30:60, 40:100] = True
    dog = np.zeros((200, 300), bool)
    dog[120:190, 200:290] = True
    segs = [_segment("img", 0, cat, [_text("a cat"), _text("the grey cat", "cat"), _text("a third one")]),
            _segment("img", 1, dog, [_text("a dog")])]
    plain = render_overlay(rgb, segs, max_expressions=0)
    changed = (plain != render_overlay(rgb, segs)).any(axis=-1)
    ys, xs = np.nonzero(changed)
    # One label box per segment, top-left at its bbox's (x, y) = (column, row): (40, 30) and (200, 120).
    # (Its colour swatch may equal the contour pixels below it, hence "<= +1".)
    cat_label = (ys < 100) & (xs < 200)
    assert 30 <= ys[cat_label].min() <= 31 and 40 <= xs[cat_label].min() <= 41
    assert 120 <= ys[~cat_label].min() <= 121 and 200 <= xs[~cat_label].min() <= 201
    assert not cat_label.all() and cat_label.any()
    # Two expressions for the cat (two text lines), one for the dog: taller box.
    cat_h = ys[cat_label].max() - 30 + 1
    dog_h = ys[~cat_label].max() - 120 + 1
    assert 1.6 * dog_h < cat_h < 2.4 * dog_h
    assert not changed[:30].any() and not changed[:, :40].any() and not changed[65:120].any()


def test_overlay_downscales_voc(data):
    rgb, segs = data["voc"]
    out = render_overlay(rgb, segs, max_side=200)
    assert out.dtype == np.uint8 and out.shape == (150, 200, 3)
    frame = preview_frame(rgb.shape[0], rgb.shape[1], 200)
    base = frame.apply_image(rgb)
    plain = render_overlay(rgb, segs, max_side=200, max_expressions=0)
    union = np.zeros(base.shape[:2], bool)
    for s in segs:
        small = frame.apply_mask(decode_rle({"size": [s["height"], s["width"]], "counts": s["rle_counts"]}))
        union |= small
        inner = cv2.erode(small.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
        if inner.sum() < 10:
            continue
        assert (plain[inner] != base[inner]).any(axis=-1).mean() > 0.95
    assert np.array_equal(plain[~union], base[~union])
    big = render_overlay(rgb, segs, max_side=4096)
    assert big.shape == rgb.shape


def test_overlay_checks_inputs(data):
    rgb, segs = data["small"]
    with pytest.raises(ValueError, match="image is"):
        render_overlay(rgb[:30], segs)
    with pytest.raises(ValueError, match="uint8"):
        render_overlay(rgb.astype(np.float32), segs)
    assert np.array_equal(render_overlay(rgb, []), rgb)


# -- gallery ----------------------------------------------------------------------------------------------------


def _gallery(out_dir, data):
    items = []
    for key in ("small", "voc"):
        rgb, segs = data[key]
        items.append((segs[0]["image_id"], encode_png(render_overlay(rgb, segs, max_side=256)),
                      [e for s in segs for e in dict.fromkeys(t["expression"] for t in s["texts"])]))
    return write_gallery(out_dir, items, title="Shard <0> & co")


def test_gallery_links_images_and_escapes_texts(data, tmp_path):
    index = _gallery(tmp_path / "g", data)
    assert index == tmp_path / "g" / "index.html"
    page = index.read_text(encoding="utf-8")
    for image_id in ("img_small", "img_voc"):
        assert (tmp_path / "g" / f"{image_id}.png").is_file()
        assert f'<img src="{image_id}.png"' in page
    assert "the &lt;b&gt;red&lt;/b&gt; &amp; &quot;shiny&quot; car" in page
    assert "<b>" not in page and "Shard &lt;0&gt; &amp; co" in page
    assert "the person" in page
    png = (tmp_path / "g" / "img_voc.png").read_bytes()
    assert decode_image(png).rgb.shape == (192, 256, 3)
    assert sorted(p.name for p in (tmp_path / "g").iterdir()) == ["img_small.png", "img_voc.png", "index.html"]


def test_gallery_is_deterministic(data, tmp_path):
    _gallery(tmp_path / "a", data)
    _gallery(tmp_path / "b", data)
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir())
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_gallery_rejects_unsafe_names(tmp_path):
    with pytest.raises(ValueError, match="file name"):
        write_gallery(tmp_path, [("../evil", b"x", [])], title="t")
    with pytest.raises(ValueError, match="duplicate"):
        write_gallery(tmp_path, [("a", b"x", []), ("a", b"y", [])], title="t")
    assert not (tmp_path / "index.html").exists()


# -- one shard -------------------------------------------------------------------------------------------------


def _ingest_tar(path, images: dict[str, np.ndarray]) -> None:
    samples = []
    for image_id, rgb in images.items():
        meta = {"image_id": image_id, "source": f"{image_id}.png", "width": rgb.shape[1], "height": rgb.shape[0],
                "orig_width": rgb.shape[1], "orig_height": rgb.shape[0], "orig_mode": "RGB", "stored_ext": "png"}
        samples.append({"__key__": image_id, "png": encode_png(rgb), "json": json.dumps(meta).encode()})
    path.write_bytes(webdataset_tar_bytes(samples))


def test_preview_shard_joins_tar_and_segments(data, tmp_path):
    small, small_segs = data["small"]
    voc, voc_segs = data["voc"]
    tar = tmp_path / "shard-000000.tar"
    _ingest_tar(tar, {"img_small": small, "img_voc": voc, "img_plain": small[::-1].copy()})
    index = preview_shard(tar, voc_segs + small_segs, tmp_path / "preview", title="unit shard 0", max_side=300)
    page = index.read_text(encoding="utf-8")
    assert page.index("img_small.png") < page.index("img_voc.png") < page.index("img_plain.png")  # tar order
    assert "#0: a blue box | the &lt;b&gt;red&lt;/b&gt;" in page and "#2: (no text)" in page
    assert "(no segments)" in page
    assert decode_image((tmp_path / "preview" / "img_voc.png").read_bytes()).rgb.shape == (225, 300, 3)
    one = {p.name: p.read_bytes() for p in (tmp_path / "preview").iterdir()}
    preview_shard(tar, small_segs + voc_segs, tmp_path / "again", title="unit shard 0", max_side=300)
    assert one == {p.name: p.read_bytes() for p in (tmp_path / "again").iterdir()}

    with pytest.raises(ValueError, match="not in"):
        preview_shard(tar, [{**small_segs[0], "image_id": "img_gone"}], tmp_path / "bad", title="t")
    assert not (tmp_path / "bad" / "index.html").exists()
    limited = preview_shard(tar, voc_segs, tmp_path / "first", title="t", max_images=1)
    assert "img_voc.png" not in limited.read_text() and (tmp_path / "first" / "img_small.png").exists()


def test_labels_render_utf8_and_pages_carry_banner_heading_and_shard_links(data, tmp_path):
    from pseudoseg.pipeline.use.preview import gallery_html, index_html

    rgb, segs = data["small"]
    seg = {**segs[0], "texts": [{**segs[0]["texts"][0], "expression": "café crème"}]}
    accented = render_overlay(rgb, [seg], max_side=256)
    ascii_q = render_overlay(rgb, [{**seg, "texts": [{**seg["texts"][0], "expression": "caf? cr?me"}]}],
                             max_side=256)
    assert not np.array_equal(accented, ascii_q)  # é is drawn as é, not as "?"
    page = gallery_html("t", [("a.png", ["x"], "IMG_0001.JPG")], banner="random <models>")
    assert '<p class="banner">random &lt;models&gt;</p>' in page and "<strong>IMG_0001.JPG</strong>" in page
    top = index_html("d", [("shard-000000/index.html", "shard 0", 3), ("shard-000001/index.html", "shard 1", 2)])
    assert "5 images in 2 shards" in top and '<a href="shard-000001/index.html">shard 1</a> (2 images)' in top
