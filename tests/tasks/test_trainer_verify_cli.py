"""Trainers check their inputs' content, through the real `pseudoseg` command: two same-size members of the feature
cache swapped once the trainer has started (sizes still match) are caught by the sha256 check of the first epoch;
the cache shard is quarantined and redone (one WARNING line) and training resumes, ending with the weights of a run
that never saw the fault."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from tests.helpers import cli, cli_env, write_good_images

pytestmark = pytest.mark.slow

SETTINGS = ["--set", "models.device=cpu", "--set", "fmbseg.short_side=112", "--set", "fmbseg.min_crops=0",
            "--set", "fmbseg.points_per_side=2", "--set", "fmbseg.pred_iou_thresh=-1",
            "--set", "fmbseg.stability_score_thresh=-1", "--set", "fmbseg.min_mask_region_area=0",
            "--set", "fmbseg.min_area_fraction=0", "--set", "fmbseg.max_area_fraction=1",
            "--set", "features_fmbseg.short_side=56", "--set", "train_alignment.epochs=2"]

# When training starts (the inputs passed their size check), the two images' DINOv2 patch tokens — members of one
# size — trade places inside the cache tar: same size, other content.
SWAP_WHEN_TRAINING_STARTS = """
import glob, os, tarfile
import pseudoseg.tasks.stages.train as train_tasks
_train = train_tasks.train
def swap_then_train(*args, **kwargs):
    if not getattr(swap_then_train, "done", False):
        swap_then_train.done = True
        (path,) = {{os.path.realpath(p) for p in glob.glob({pattern!r})}}
        with tarfile.open(path) as tar:
            a, b = [m for m in tar.getmembers() if m.name.endswith(".dino_patches.npy")]
        assert a.size == b.size
        with open(path, "r+b") as fh:
            fh.seek(a.offset_data); first = fh.read(a.size)
            fh.seek(b.offset_data); second = fh.read(b.size)
            fh.seek(a.offset_data); fh.write(second)
            fh.seek(b.offset_data); fh.write(first)
    return _train(*args, **kwargs)
train_tasks.train = swap_then_train
"""


def train_alignment(images: Path, out: Path, env: dict, tiny_cache: Path) -> str:
    proc = cli(["run", "TrainAlignment", "--images", str(images), "--dataset", "ds", "--out", str(out),
                "--set", f"models.cache_dir={tiny_cache}", *SETTINGS], env)
    try:
        text, _ = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert proc.returncode == 0, text
    return text


def test_swapped_same_size_cache_members_are_caught_on_the_first_epoch_and_healed(tmp_path, tiny_cache):
    images, out, reference = tmp_path / "images", tmp_path / "out", tmp_path / "reference"
    write_good_images(images, 2, size=(64, 64))  # one size: their patch-token members have one size
    train_alignment(images, reference, cli_env(tmp_path / "ref"), tiny_cache)  # undisturbed
    shutil.copytree(reference, out, symlinks=True)  # its inputs, done; the trainer runs again, with the fault
    shutil.rmtree(out / "ds" / "train_alignment")
    fault = SWAP_WHEN_TRAINING_STARTS.format(pattern=str(out / "ds" / "features_fmbseg" / "*" / "shard-*.tar"))
    text = train_alignment(images, out, cli_env(tmp_path, fault), tiny_cache)
    warnings = [line for line in text.splitlines() if line.startswith("WARNING:")]
    assert len(warnings) == 1, text
    assert warnings[0].startswith("WARNING: pseudoseg: features_fmbseg shard 0 failed verification before "
                                  "TrainAlignment read it: shard-000000.tar: sha256 "), warnings[0]
    (quarantined,) = {q.resolve() for q in (out / "ds" / "features_fmbseg").glob("*/.quarantine/*")}
    assert (quarantined / "shard-000000.tar").exists(), "the bad file is kept as evidence"

    got, want = (torch.load(o / "ds" / "train_alignment" / "latest" / "model.pt", weights_only=True)
                 for o in (out, reference))
    assert got["model"].keys() == want["model"].keys()
    assert all(torch.equal(got["model"][k], want["model"][k]) for k in want["model"]), \
        "trained on the healed cache: the weights of an undisturbed run"
    metrics = [(o / "ds" / "train_alignment" / "latest" / "metrics.jsonl").read_text() for o in (out, reference)]
    assert metrics[0] == metrics[1], "no step of the swapped data is left in the record"
