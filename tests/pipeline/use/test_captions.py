"""Ground-truth caption files (pipeline/use/captions.py): COCO captions JSON and Parquet layouts, the three lookup
keys (ingest id, path relative to the images root or full source path, a bare name only when no other input has
it), clear errors for layouts we do not read, and a content change named."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pseudoseg.pipeline.use.captions import (
    CaptionFileChanged,
    CaptionFileError,
    Match,
    check_gt_captions,
    load_gt_captions,
    name_index,
)


def _write_json(path, data) -> str:
    path.write_text(json.dumps(data))
    return str(path)


def _write_parquet(path, columns: dict) -> str:
    pq.write_table(pa.table(columns), path)
    return str(path)


def test_coco_json_by_file_name_relative_to_the_images_root_in_file_order(tmp_path):
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
    nine = ["Closeup of bins of food.", "A meal in containers."]
    giraffe = ["A giraffe eating leaves.", "A giraffe near a tree."]
    # a bare file_name (COCO's usual): the image of that name, wherever under the root, when only one has it
    assert gt.match("abc", "/data/coco/train2017/000000000009.jpg", "000000000009.jpg").captions == nine
    assert gt.match("abc", "/data/coco/train2017/000000000009.jpg", "train2017/000000000009.jpg").captions == nine
    # a file_name with folders is that path under the root (a tar member's name included), nothing else
    assert gt.match("d", "/shards/coco-000.tar::./train2017/000000000025.jpg",
                    "train2017/000000000025.jpg").captions == giraffe
    assert gt.match("d", "/data/other/000000000025.jpg", "other/000000000025.jpg").captions == []
    assert gt.match("d", "/data/000000000025.jpg", "000000000025.jpg").captions == []
    assert gt.match("x", "/data/000000000030.jpg", "000000000030.jpg") == Match([])  # known, without captions
    assert gt.match("x", "/elsewhere/unknown.jpg", "unknown.jpg") == Match([])
    assert gt.match("9", "/nowhere/none.jpg", "none.jpg") == Match([])  # COCO's integer id is not our ingest id
    result = gt.match("abc", "/d/000000000009.jpg", "000000000009.jpg").captions
    result.append("mutated")
    assert gt.match("abc", "/d/000000000009.jpg", "000000000009.jpg").captions == nine  # copies
    assert gt.sha256 == hashlib.sha256(Path(f).read_bytes()).hexdigest()


def test_a_bare_name_shared_by_several_inputs_is_ambiguous_never_another_images_caption(tmp_path):
    """The issue's case: cats/0001.jpg's caption must never reach dogs/0001.jpg."""
    gt = load_gt_captions(_write_json(tmp_path / "c.json", {
        "images": [{"id": 1, "file_name": "cats/0001.jpg"}, {"id": 2, "file_name": "0002.jpg"}],
        "annotations": [{"image_id": 1, "caption": "a tabby cat"}, {"image_id": 2, "caption": "a bird"}]}))
    names = name_index(["cats/0001.jpg", "dogs/0001.jpg", "a/0002.jpg", "b/0002.jpg", "c/0002.jpg", "d/0002.jpg"])
    assert names[0] == {"0001.jpg": 2, "0002.jpg": 4}
    assert gt.match("i1", "/r/cats/0001.jpg", "cats/0001.jpg", *names).captions == ["a tabby cat"]
    assert gt.match("i2", "/r/dogs/0001.jpg", "dogs/0001.jpg", *names) == Match([])
    found = gt.match("i3", "/r/b/0002.jpg", "b/0002.jpg", *names)
    assert found.captions == [] and found.ambiguous == (
        f"{tmp_path}/c.json names '0002.jpg' without a folder, and 4 inputs have that name (a/0002.jpg, b/0002.jpg, "
        "c/0002.jpg, ...): give its path relative to the images root (file_name or path) instead")
    alone = name_index(["x/0002.jpg"])
    assert gt.match("i3", "/r/x/0002.jpg", "x/0002.jpg", *alone).captions == ["a bird"]


def test_parquet_caption_rows_by_path_and_by_id(tmp_path):
    by_path = load_gt_captions(
        _write_parquet(
            tmp_path / "gt.parquet",
            {
                "path": ["/imgs/a.jpg", "/imgs/b.jpg", "/imgs/a.jpg", "/other/a.jpg", "sub/c.jpg"],
                "caption": ["first of a", "b", "second of a", "another a", "c"],
            },
        )
    )
    assert by_path.lookup("id-a", "/imgs/a.jpg") == ["first of a", "second of a"]
    assert by_path.lookup("id-a", "/imgs//sub/../a.jpg") == ["first of a", "second of a"]  # normalised paths
    assert by_path.lookup("id-a", "/other/a.jpg") == ["another a"]
    assert by_path.lookup("id-a", "/third/a.jpg") == []  # a path column does not match by basename
    assert by_path.match("id-c", "/root/sub/c.jpg", "./sub/c.jpg").captions == ["c"]  # relative to the root

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


def test_parquet_lookup_order_id_then_path_then_name(tmp_path):
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


def test_the_file_is_checked_once_and_a_changed_content_is_named(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": []}))
    check_gt_captions(str(f))
    digest = hashlib.sha256(f.read_bytes()).hexdigest()
    assert load_gt_captions(f, expect=digest[:16]).sha256 == digest
    f.write_text(json.dumps({"images": [{"id": 1, "file_name": "b.jpg"}], "annotations": []}))
    with pytest.raises(CaptionFileChanged, match=rf"c\.json changed during the run: its sha256 was {digest[:16]}\.\.\."):
        load_gt_captions(f, expect=digest[:16])
    f.unlink()
    with pytest.raises(CaptionFileChanged, match="cannot be read any more"):
        load_gt_captions(f, expect=digest[:16])
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [{"id": 1}], "annotations": []}')
    with pytest.raises(ValueError, match=r"bad\.json: images\[0\] needs 'id' and 'file_name'"):
        check_gt_captions(str(bad))
    with pytest.raises(ValueError, match="missing.json: cannot be read"):
        check_gt_captions(str(tmp_path / "missing.json"))
    check_gt_captions("")  # none configured


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
                "images": [{"id": 1, "file_name": "a/x.jpg"}, {"id": 2, "file_name": "./a//x.jpg"}],
                "annotations": [],
            },
            "images 1 and 2 have the same file_name 'a/x.jpg'",
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
