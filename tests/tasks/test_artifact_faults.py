"""Faults in committed artifacts, through the real `pseudoseg` command: corrupted, cut, deleted or foreign upstream
files, garbage done.json records, two runs on one output root, and a chaos run (10 SIGKILLs at seeded moments +
one corrupted upstream file). Every case ends byte-identical to a clean run (done.json ``seconds`` excepted)."""

from __future__ import annotations

import json
import re
import shutil
import signal
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pseudoseg.pipeline.core.artifacts import unit_file
from tests.helpers import assert_same_artifacts, cli, cli_env, write_good_images

pytestmark = pytest.mark.slow
WARNING = "WARNING: pseudoseg: "


def settings(models: Path, shard_size: int = 3) -> list[str]:
    return ["--set", f"ingest.shard_size={shard_size}", "--set", f"models.cache_dir={models}"]


def run(target: str, images: Path, out: Path, env: dict[str, str], *extra: str, timeout: float = 240):
    proc = cli(["run", target, "--images", str(images), "--dataset", "ds", "--out", str(out), *extra], env)
    text, _ = proc.communicate(timeout=timeout)
    return proc.returncode, text


def table_rows(text: str) -> dict[str, list[str]]:
    """stage folder → [shards, done, failed, in, ok, rejected, seconds] of the end-of-run table (its columns:
    stage, unit, shards, done, failed, ran, skipped, in, ok, rejected, rows, rows are, seconds, reasons)."""
    from pseudoseg.tasks.stages.catalog import outputs

    folder = {o.name: o.folder for o in outputs()}
    lines = text[text.rindex("\nstage "):].splitlines()[3:]
    rows = {}
    for parts in (line.split() for line in lines):
        if len(parts) < 14 or parts[0] not in folder:
            break
        rows[folder[parts[0]]] = [*parts[2:5], *parts[7:10], parts[12]]
    return rows


def assert_accounting(text: str, stages: dict[str, tuple[int, int, int, int]]) -> None:
    """Per stage: (shards = done, in, ok, rejected) and in = ok + rejected."""
    rows = table_rows(text)
    for stage, (shards, n_in, ok, rejected) in stages.items():
        row = rows[stage]
        assert row[:6] == [str(shards), str(shards), "0", str(n_in), str(ok), str(rejected)], (stage, row)
        assert n_in == ok + rejected


def one(folder: Path, pattern: str) -> Path:
    (path,) = folder.glob(pattern)
    return path


def flip(path: Path, count: int = 16) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + count] = bytes(b ^ 0xFF for b in data[middle:middle + count])
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_cache):
    """5 good images + 1 broken (2 shards of 3), tiny models, and a clean `run SamEmbeddings` (ingest + SAM)."""
    tmp = tmp_path_factory.mktemp("faults")
    images = tmp / "images"
    write_good_images(images, 5)
    (images / "x_broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    models, reference = tiny_cache, tmp / "reference"
    code, text = run("SamEmbeddings", images, reference, cli_env(tmp), *settings(models))
    assert code == 0, text
    return images, models, reference


EXPECTED = {"ingest": (2, 6, 5, 1), "sam_embeddings": (2, 5, 5, 0)}


def copy_reference(reference: Path, out: Path, *redo: str) -> Path:
    """A copy of the clean tree with the done.json of ``redo`` units removed (so this run reads their inputs)."""
    shutil.copytree(reference, out, symlinks=True)  # <stage>/latest stays a link
    for pattern in redo:
        one(out / "ds", pattern).unlink()
    return out / "ds"


def cut_parquet_to_half_its_rows(path: Path) -> None:
    table = pq.read_table(path)
    pq.write_table(table.slice(0, table.num_rows // 2), path, compression="zstd")


def foreign_schema_version(path: Path) -> None:
    table = pq.read_table(path)
    meta = dict(table.schema.metadata)
    meta[b"pseudoseg.schema"] = meta[b"pseudoseg.schema"].replace(b"/v1", b"/v0")
    pq.write_table(table.replace_schema_metadata(meta), path, compression="zstd", write_statistics=True,
                   use_dictionary=True)


def stale_schema_version_matching_its_record(path: Path) -> None:
    """As an older pseudoseg would have left it: a v0 file whose done.json records exactly its bytes."""
    import hashlib

    foreign_schema_version(path)
    done = unit_file(path.parent, path.name.split(".")[0], "done.json")
    record = json.loads(done.read_text())
    for entry in record["files"]:
        if entry["name"] == path.name:
            entry.update(num_bytes=path.stat().st_size, sha256=hashlib.sha256(path.read_bytes()).hexdigest())
    done.write_text(json.dumps(record, sort_keys=True, indent=2) + "\n")


FAULTS = {
    # name: (file to damage, damage, expected warning fragments)
    "flipped_tar_bytes": ("ingest/latest/shard-000001.tar", flip,
                          ["ingest shard 1 failed verification before sam_embeddings shard 1 read it",
                           "shard-000001.tar: sha256"]),
    "parquet_cut_to_half_its_rows": ("ingest/latest/shard-000001.parquet", cut_parquet_to_half_its_rows,
                                     ["ingest shard 1 is invalid", "shard-000001.parquet: ", "bytes, recorded"]),
    "deleted_tar": ("ingest/latest/shard-000001.tar", Path.unlink,
                    ["ingest shard 1 is invalid", "shard-000001.tar: missing"]),
    "foreign_schema_version": ("ingest/latest/shard-000001.parquet", foreign_schema_version,
                               ["ingest shard 1 ", "shard-000001.parquet: "]),
    "stale_schema_version_matching_its_record": (
        "ingest/latest/shard-000001.parquet", stale_schema_version_matching_its_record,
        ["ingest shard 1 failed its contract before sam_embeddings shard 1 read it",
         "shard-000001.parquet: schema version mismatch: expected manifest/v1, found manifest/v0"]),
    "flipped_plan_bytes": ("plan/latest/plan.parquet", flip,
                           ["ingest plan failed verification before ingest shard 1 read it", "plan.parquet: sha256"]),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_a_damaged_upstream_file_is_named_invalidated_and_redone_in_the_same_run(tmp_path, setup, fault):
    images, models, reference = setup
    pattern, damage, fragments = FAULTS[fault]
    redo = ["sam_embeddings/latest/_meta/shard-000001.done.json"]
    if pattern.startswith("plan/"):
        redo.append("ingest/latest/_meta/shard-000001.done.json")  # the plan is read by the ingest shards
    ds = copy_reference(reference, tmp_path / "out", *redo)
    damage(one(ds, pattern))

    code, text = run("SamEmbeddings", images, tmp_path / "out", cli_env(tmp_path), *settings(models))
    assert code == 0, text
    (line,) = [ln for ln in text.splitlines() if ln.startswith(WARNING)]  # one line says what happened
    assert all(f in line for f in fragments), line
    assert "moved to ds/" in line and line.endswith("; redoing it")
    assert "1 unit(s) failed verification or had an invalid done.json and were redone:" in text
    assert_accounting(text, EXPECTED)
    assert_same_artifacts(tmp_path / "out", reference)
    (evidence,) = one(ds, pattern).parent.joinpath(".quarantine").iterdir()
    assert (evidence / "reason.txt").read_text().strip() in line


@pytest.mark.parametrize("garbage", [b"{garbage", b'{"schema": "shard_stats/v1", "stage": "ingest"}'])
def test_a_garbage_done_json_means_not_done_never_a_crash(tmp_path, setup, garbage):
    images, models, reference = setup
    ds = copy_reference(reference, tmp_path / "out")
    one(ds, "ingest/latest/_meta/shard-000001.done.json").write_bytes(garbage)

    if garbage == b"{garbage":
        # Not needed by the target (its shards are done): exit 0, the summary counts the shard as not done.
        code, text = run("SamEmbeddings", images, tmp_path / "out", cli_env(tmp_path), *settings(models))
        assert code == 0, text
        assert table_rows(text)["ingest"][:3] == ["2", "1", "1"]

    # Needed: the shard is redone, in the same run, and says so in one line.
    one(ds, "sam_embeddings/latest/_meta/shard-000001.done.json").unlink()
    code, text = run("SamEmbeddings", images, tmp_path / "out", cli_env(tmp_path), *settings(models))
    assert code == 0, text
    (line,) = [ln for ln in text.splitlines() if ln.startswith(WARNING)]
    assert line.startswith(f"{WARNING}ingest shard 1 is invalid: shard-000001.done.json: invalid: "), line
    assert_accounting(text, EXPECTED)
    assert_same_artifacts(tmp_path / "out", reference)


PRODUCE_LOG = """
import os, time
import pseudoseg.tasks.engine.base as base
import pseudoseg.tasks.stages.ingest as ingest
def slow_logged(produce):
    def wrapper(self):
        with open({log!r}, "a") as fh:
            fh.write(f"{{os.getpid()}} {{self.describe()}}\\n")
        time.sleep(1.0)  # both runs overlap on every unit
        return produce(self)
    return wrapper
for cls in (base.ShardTask, ingest.PlanIngest):
    cls.produce_unit = slow_logged(cls.produce_unit)
"""


def test_two_runs_on_one_output_root_share_the_units_without_failures(tmp_path, setup):
    images, models, reference = setup
    out, log = tmp_path / "out", tmp_path / "produced.log"
    env = cli_env(tmp_path, PRODUCE_LOG.format(log=str(log)))
    args = ["run", "SamEmbeddings", "--images", str(images), "--dataset", "ds", "--out", str(out),
            *settings(models)]
    procs = [cli(args, env), cli(args, env)]
    texts = [p.communicate(timeout=240)[0] for p in procs]
    for proc, text in zip(procs, texts, strict=True):
        assert proc.returncode == 0, text
        run_log = Path(re.search(r"^log: (.+)$", text, re.M).group(1))  # Luigi's summary is in the run's log
        assert "This progress looks :) because there were no failed tasks" in run_log.read_text(), text
        assert_accounting(text, EXPECTED)
    produced = [line.split(" ", 1)[1] for line in log.read_text().splitlines()]
    assert sorted(produced) == sorted(["ingest plan", "ingest shard 0", "ingest shard 1", "sam_embeddings shard 0",
                                       "sam_embeddings shard 1"]), "every unit produced exactly once"
    logs = [Path(re.search(r"^log: (.+)$", t, re.M).group(1)).read_text() for t in texts]
    assert any("pseudoseg: waiting for " in t for t in logs), "the second run waited for a unit in progress"
    assert_same_artifacts(out, reference)


# ------------------------------------------------------------------------------------------------ chaos
CHAOS = """
import os, signal
import pseudoseg.pipeline.core.artifacts as artifacts
import pseudoseg.tasks.engine.base as base
import pseudoseg.tasks.stages.ingest as ingest
KILL_AT, COUNT = int(os.environ.get("CHAOS_KILL_AT", "0")), os.environ.get("CHAOS_COUNT")
_n = [0]
def event():
    _n[0] += 1
    if COUNT:
        with open(COUNT, "a") as fh:
            fh.write("x")
    if _n[0] == KILL_AT:
        os.kill(os.getpid(), signal.SIGKILL)
def counted(fn):
    def wrapper(*args, **kwargs):
        event()
        return fn(*args, **kwargs)
    return wrapper
# The moments: every rename and fsync (commits, quarantines, temporaries), every sample written to a tar,
# every image step and the start of every unit's production.
os.replace, os.fsync = counted(os.replace), counted(os.fsync)
artifacts.TarSpool.write = counted(artifacts.TarSpool.write)
base.ProgressReporter.step = counted(base.ProgressReporter.step)
for cls in (base.ShardTask, ingest.PlanIngest):
    cls.produce_unit = counted(cls.produce_unit)
"""
# FMbSeg Stage 1 without 1.2: ingest → CLIP dense → detections, ingest → SAM embeddings; both → Stage 1.1 → labels.
TWO_BRANCHES = ["--set", "fmbseg.stage12=false"]
KILLS, SEED = 10, 11


def test_chaos_ten_sigkills_and_a_corrupted_upstream_end_byte_identical(tmp_path, tiny_cache):
    images = tmp_path / "images"
    write_good_images(images, 3)
    (images / "x_broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    models, counts = tiny_cache, tmp_path / "events"
    args = ("FmbsegLabels", images)
    opts = [*settings(models, shard_size=2), *TWO_BRANCHES]
    env = cli_env(tmp_path, CHAOS)

    # The moments of the work left after ingest: those of a clean run minus those of ingest alone.
    env["CHAOS_COUNT"] = str(counts)
    out = tmp_path / "out"
    code, text = run("Ingest", images, out, env, *opts)
    assert code == 0, text
    ingest_events = len(counts.read_text())
    counts.unlink()
    code, text = run(*args, tmp_path / "reference", env, *opts)
    assert code == 0, text
    events = len(counts.read_text()) - ingest_events
    del env["CHAOS_COUNT"]

    tar = one(out / "ds", "ingest/latest/shard-000001.tar")
    flip(tar)  # same size: only sha256 sees it; both branches read it

    # 10 seeded moments spread over the work (cumulative event positions p1 < ... < p10 < events): run i dies
    # at its (p_i - p_i-1)-th event. Killed work is redone, so no run can reach the end: all 10 die.
    rng = np.random.default_rng(SEED)
    moments = np.sort(rng.choice(np.arange(1, events), size=KILLS, replace=False))
    for kill, step in enumerate(np.diff(moments, prepend=0)):
        env["CHAOS_KILL_AT"] = str(int(step))
        code, text = run(*args, out, env, *opts)
        assert code == -signal.SIGKILL, (kill, int(step), text)
    del env["CHAOS_KILL_AT"]
    code, text = run(*args, out, env, *opts)
    assert code == 0, text

    assert_same_artifacts(out, tmp_path / "reference")
    reasons = [p.read_text() for p in tar.parent.glob(".quarantine/*/reason.txt")]
    assert any("shard-000001.tar: sha256" in r for r in reasons), reasons
