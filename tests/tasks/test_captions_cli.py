"""Ground-truth captions through the real `pseudoseg` command: a caption reaches the image it names (by its path
under the images root), never another image sharing its file name; a bare name several inputs share is a reject
row; a malformed caption file stops the command before anything runs; a caption file edited during a run fails it
with one line, and the next run captions into a new folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pseudoseg.pipeline.core.artifacts import record_unit_file
from pseudoseg.schemas import CAPTIONS, REJECTS, SHARD_STATS
from tests.helpers import cli, cli_env, write_good_images
from tests.tasks.test_bad_inputs_cli import ingest_rows

pytestmark = pytest.mark.slow

NAMES = ["cats/0001.jpg", "dogs/0001.jpg", "a/0002.jpg", "b/0002.jpg", "solo.jpg"]
EDIT_AFTER_ONE_SHARD = """
import pseudoseg.tasks.stages.use as use
_produce = use.UseCaptionsShard.produce
def produce_then_edit(self, progress):
    output = _produce(self, progress)
    with open({path!r}, "w") as fh:  # the caption file is edited while the stage is half done
        fh.write({edited!r})
    return output
use.UseCaptionsShard.produce = produce_then_edit
"""


def captions_file(path: Path, solo: str = "a photo on its own") -> str:
    path.write_text(json.dumps({
        "images": [{"id": 1, "file_name": "cats/0001.jpg"}, {"id": 2, "file_name": "0002.jpg"},
                   {"id": 3, "file_name": "solo.jpg"}],
        "annotations": [{"image_id": 1, "caption": "a tabby cat on a sofa"}, {"image_id": 2, "caption": "a bird"},
                        {"image_id": 3, "caption": solo}]}))
    return path.read_text()


def images_tree(root: Path) -> Path:
    images = root / "images"
    for name, path in zip(NAMES, write_good_images(root / "flat", len(NAMES)), strict=True):
        (images / name).parent.mkdir(parents=True, exist_ok=True)
        (images / name).write_bytes(path.read_bytes())  # a PNG named .jpg is decoded by content
    return images


def captions_run(images: Path, out: Path, captions: Path, env: dict, *extra: str) -> tuple[int, str]:
    proc = cli(["run", "UseCaptions", "--images", str(images), "--dataset", "ds", "--out", str(out),
                "--set", f"use.gt_captions={captions}", "--set", "use.generate_captions=false", *extra], env)
    text, _ = proc.communicate(timeout=300)
    return proc.returncode, text


def captions_of(folder: Path) -> tuple[dict[str, list[str]], dict[str, str], int]:
    """(image id → GT captions, image id → reject reason, shards done) of one use_captions hash folder."""
    rows: dict[str, list[str]] = {}
    reasons: dict[str, str] = {}
    done = sorted(folder.glob("_meta/*.done.json"))
    for record in done:
        stats = SHARD_STATS.read_json(record)
        shard_rows = CAPTIONS.read_parquet(record_unit_file(record, "parquet")).to_pylist()
        shard_rejects = REJECTS.read_parquet(record_unit_file(record, "rejects.parquet")).to_pylist()
        assert stats["in_count"] == stats["ok_count"] + stats["rejected_count"] == (
            len({r["image_id"] for r in shard_rows}) + len(shard_rejects))
        for r in shard_rows:
            rows.setdefault(r["image_id"], []).append(r["caption"])
        reasons.update({r["image_id"]: r["reason"] for r in shard_rejects})
    return rows, reasons, len(done)


def test_captions_bind_to_the_path_not_the_name_and_a_mid_run_edit_fails_with_one_line(tmp_path):
    images, out, captions = images_tree(tmp_path), tmp_path / "out", tmp_path / "captions.json"

    # a malformed caption file: one line, exit 2, nothing runs or is written
    captions.write_text('{"images": [{"file_name": "solo.jpg"}], "annotations": []}')
    code, text = captions_run(images, out, captions, cli_env(tmp_path))
    assert code == 2, text
    (line,) = text.strip().splitlines()
    assert line == (f"pseudoseg: [use] gt_captions = '{captions}' (from --set use.gt_captions={captions}): must be "
                    f"a COCO captions JSON or a caption Parquet (empty: none): {captions}: images[0] needs 'id' and "
                    "'file_name', found {'file_name': 'solo.jpg'}")
    assert not out.exists()

    first = captions_file(captions)
    edited = first.replace("a photo on its own", "the same photo, edited")
    env = cli_env(tmp_path, EDIT_AFTER_ONE_SHARD.format(path=str(captions), edited=edited))
    code, text = captions_run(images, out, captions, env, "--set", "ingest.shard_size=3")
    assert code == 1, text
    last = text.strip().splitlines()[-1]
    assert last.startswith(f"pseudoseg: failed, not retried: CaptionFileChanged: {captions} changed during the run: "
                           "its sha256 was "), last
    (half,) = [f for f in (out / "ds" / "use_captions").iterdir() if not f.is_symlink() and f.is_dir()]
    assert captions_of(half)[2] == 1, "one shard holds the first version; nothing of the second is in its folder"

    manifest, _ = ingest_rows(out)
    assert len(manifest) == len(NAMES), "no image lost"
    ids = {r["source"].removeprefix(f"{images}/"): r["image_id"] for r in manifest}

    # the rerun (no edit now) captions the edited file into a new folder, every shard
    code, text = captions_run(images, out, captions, cli_env(tmp_path), "--set", "ingest.shard_size=3")
    assert code == 0, text
    latest = out / "ds" / "use_captions" / (out / "ds" / "use_captions" / "LATEST").read_text().strip()
    assert latest != half
    rows, reasons, shards = captions_of(latest)
    assert shards == 2
    assert rows == {ids["cats/0001.jpg"]: ["a tabby cat on a sofa"], ids["solo.jpg"]: ["the same photo, edited"]}
    assert reasons == {ids["dogs/0001.jpg"]: "no_caption",  # never the cat's caption
                       ids["a/0002.jpg"]: "ambiguous_caption_match", ids["b/0002.jpg"]: "ambiguous_caption_match"}
