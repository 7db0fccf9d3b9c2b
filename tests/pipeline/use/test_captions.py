"""Ground-truth caption files (pipeline/use/captions.py): COCO captions JSON and Parquet layouts, the three lookup
keys (ingest id, source basename, full source path) and clear errors for layouts we do not read."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pseudoseg.pipeline.use.captions import CaptionFileError, load_gt_captions


def _write_json(path, data) -> str:
    path.write_text(json.dumps(data))
    return str(path)


def _write_parquet(path, columns: dict) -> str:
    pq.write_table(pa.table(columns), path)
    return str(path)


def test_coco_json_by_basename_in_file_order(tmp_path):
    f = _write_json(
        tmp_path / "captions_train2017.json",
        {
            "info": {},
            "licenses": [],
            "images": [
                {"id": 9, "file_name": "000000000009.jpg", "height": 480, "width": 640},
                {"id": 25, "file_name": "train2017/000000000025.jpg"},
                {"id": 30, "file_name": "000000000030.jpg"},
            ],
            "annotations": [
                {"id": 1, "image_id": 25, "caption": "A giraffe eating leaves. "},
                {"id": 2, "image_id": 9, "caption": "Closeup of bins of food."},
                {"id": 3, "image_id": 9, "caption": "   "},
                {"id": 4, "image_id": 25, "caption": " A giraffe near a tree."},
                {"id": 5, "image_id": 9, "caption": "A meal in containers."},
            ],
        },
    )
    gt = load_gt_captions(f)
    assert gt.lookup("abc123", "/data/coco/train2017/000000000009.jpg") == [
        "Closeup of bins of food.",
        "A meal in containers.",
    ]
    # A tar member matches by the member's basename; file_name's folder part is ignored.
    assert gt.lookup("def456", "/shards/coco-000.tar::images/000000000025.jpg") == [
        "A giraffe eating leaves.",
        "A giraffe near a tree.",
    ]
    assert gt.lookup("x", "000000000030.jpg") == []  # known image without captions
    assert gt.lookup("x", "/elsewhere/unknown.jpg") == []
    # The COCO integer id is not our ingest id.
    assert gt.lookup("9", "/nowhere/none.jpg") == []
    result = gt.lookup("abc123", "/data/coco/train2017/000000000009.jpg")
    result.append("mutated")
    assert len(gt.lookup("abc123", "/data/coco/train2017/000000000009.jpg")) == 2  # lookups return copies


def test_parquet_caption_rows_by_path_and_by_id(tmp_path):
    by_path = load_gt_captions(
        _write_parquet(
            tmp_path / "gt.parquet",
            {
                "path": ["/imgs/a.jpg", "/imgs/b.jpg", "/imgs/a.jpg", "/other/a.jpg"],
                "caption": ["first of a", "b", "second of a", "another a"],
            },
        )
    )
    assert by_path.lookup("id-a", "/imgs/a.jpg") == ["first of a", "second of a"]
    assert by_path.lookup("id-a", "/imgs//sub/../a.jpg") == ["first of a", "second of a"]  # normalised paths
    assert by_path.lookup("id-a", "/other/a.jpg") == ["another a"]
    assert by_path.lookup("id-a", "/third/a.jpg") == []  # a path column does not match by basename

    by_id = load_gt_captions(
        _write_parquet(
            tmp_path / "ids",
            {  # no extension: the content decides
                "image_id": ["0123abcd", "4567ef01"],
                "captions": [["one", " ", None, "two "], None],
            },
        )
    )
    assert by_id.lookup("0123abcd", "/any/where.jpg") == ["one", "two"]
    assert by_id.lookup("4567ef01", "/any/where.jpg") == []
    assert by_id.lookup("ffff", "/any/where.jpg") == []


def test_parquet_lookup_order_id_then_basename_then_path(tmp_path):
    gt = load_gt_captions(
        _write_parquet(
            tmp_path / "gt.parquet",
            {
                "image_id": ["id1", None, None],
                "file_name": [None, "x.jpg", None],
                "path": [None, None, "/p/y.jpg"],
                "caption": ["by id", "by name", "by path"],
            },
        )
    )
    assert gt.lookup("id1", "/p/x.jpg") == ["by id"]
    assert gt.lookup("id2", "/q/x.jpg") == ["by name"]
    assert gt.lookup("id2", "/p/y.jpg") == ["by path"]
    assert gt.lookup("id2", "relative/y.jpg") == []


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("list.json", [{"image": "a.jpg", "caption": "x"}], "not a COCO captions JSON"),
        ("no_ann.json", {"images": [{"id": 1, "file_name": "a.jpg"}]}, "'annotations'"),
        ("bad_img.json", {"images": [{"file_name": "a.jpg"}], "annotations": []}, r"images\[0\] needs 'id'"),
        (
            "bad_ann.json",
            {"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"image_id": 1}]},
            r"annotations\[0\] needs",
        ),
        (
            "dangling.json",
            {"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"image_id": 2, "caption": "x"}]},
            "unknown image id 2",
        ),
        (
            "same_name.json",
            {
                "images": [{"id": 1, "file_name": "a/x.jpg"}, {"id": 2, "file_name": "b/x.jpg"}],
                "annotations": [],
            },
            "share the file name 'x.jpg'",
        ),
    ],
)
def test_bad_json_layouts(tmp_path, name, content, message):
    with pytest.raises(CaptionFileError, match=message):
        load_gt_captions(_write_json(tmp_path / name, content))


def test_bad_parquet_and_other_files(tmp_path):
    with pytest.raises(CaptionFileError, match=r"key column .*found columns \['url', 'caption'\]"):
        load_gt_captions(_write_parquet(tmp_path / "a.parquet", {"url": ["u"], "caption": ["c"]}))
    with pytest.raises(CaptionFileError, match="exactly one of 'caption'"):
        load_gt_captions(
            _write_parquet(tmp_path / "b.parquet", {"path": ["p"], "caption": ["c"], "captions": [["c"]]})
        )
    with pytest.raises(CaptionFileError, match="exactly one of 'caption'"):
        load_gt_captions(_write_parquet(tmp_path / "c.parquet", {"path": ["p"], "text": ["c"]}))
    with pytest.raises(CaptionFileError, match="lists of strings"):
        load_gt_captions(_write_parquet(tmp_path / "d.parquet", {"path": ["p"], "captions": ["not a list"]}))
    text = tmp_path / "captions.txt"
    text.write_text("a.jpg\tA dog.\n")
    with pytest.raises(CaptionFileError, match="COCO captions JSON .* or a Parquet file; this is neither"):
        load_gt_captions(text)
    with pytest.raises(FileNotFoundError):
        load_gt_captions(tmp_path / "missing.json")
