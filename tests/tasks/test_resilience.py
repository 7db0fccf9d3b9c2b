"""The real `pseudoseg` command in subprocesses: SIGKILL mid-shard and mid-commit, then rerun; luigid with two
worker processes. Faults are injected through a sitecustomize module, so no test hook lives in product code."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import assert_same_artifacts, cli, cli_env, write_good_images

pytestmark = pytest.mark.slow
SHARD_SIZE = "3"


def run_ingest(images: Path, out: Path, env: dict[str, str], *extra: str):
    return cli(["run", "Ingest", "--images", str(images), "--dataset", "ds", "--out", str(out),
                "--set", f"ingest.shard_size={SHARD_SIZE}", *extra], env)


def finish(proc, timeout: float = 240) -> str:
    text, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, text
    return text


def wait_for(path: Path, proc, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"process ended before {path.name} appeared:\n{proc.stdout.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {path}")
        time.sleep(0.05)


def shard_files(out: Path) -> dict[int, list[str]]:
    files: dict[int, list[str]] = {}
    for p in (out / "ds" / "ingest").rglob("shard-*"):
        if p.name.endswith(".failed.json"):  # _meta/: the last attempt failed (for `pseudoseg status`), no artifact
            continue
        files.setdefault(int(p.name[6:12]), []).append(p.name)
    return files


@pytest.fixture(scope="module")
def images_and_reference(tmp_path_factory):
    """9 images (3 shards) and the artifacts of one uninterrupted run."""
    tmp = tmp_path_factory.mktemp("kill")
    images = tmp / "images"
    write_good_images(images, 8)
    (images / "x_broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    reference = tmp / "reference"
    finish(run_ingest(images, reference, cli_env(tmp)))
    return images, reference


HANG_IN_DECODE = """
import pathlib, time
import pseudoseg.pipeline.core.ingest as ingest
_decode, _calls = ingest.decode_image, [0]
def decode_then_hang(data, **kw):
    _calls[0] += 1
    if _calls[0] == 5:  # second shard, second image: mid-shard
        pathlib.Path({marker!r}).touch()
        time.sleep(3600)
    return _decode(data, **kw)
ingest.decode_image = decode_then_hang
"""

DIE_MID_COMMIT = """
import os, pathlib, signal
import pseudoseg.pipeline.core.artifacts as artifacts
_write, _count = artifacts.atomic_write_bytes, [0]
def write_then_die(target, data, *args):
    _write(target, data, *args)
    if pathlib.Path(target).name.startswith("shard-") and not str(target).endswith(".done.json"):
        _count[0] += 1
        if _count[0] == 4:  # first payload of the second shard is in place, its done.json is not
            pathlib.Path({marker!r}).touch()
            os.kill(os.getpid(), signal.SIGKILL)
artifacts.atomic_write_bytes = write_then_die
"""


@pytest.mark.parametrize("shards_per_task", ["auto", "3"])  # auto = 1 here; 3: one Luigi task for all 3 shards
def test_sigkill_mid_shard_leaves_no_visible_artifact_and_rerun_is_byte_identical(tmp_path, images_and_reference,
                                                                                   shards_per_task):
    images, reference = images_and_reference
    out, marker = tmp_path / "out", tmp_path / "hanging"
    proc = run_ingest(images, out, cli_env(tmp_path, HANG_IN_DECODE.format(marker=str(marker))),
                      "--set", f"pseudoseg.shards_per_task={shards_per_task}")
    wait_for(marker, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)

    files = shard_files(out)
    assert len(files) == 1, f"only the first shard may be visible after the kill: {files}"
    (finished,) = files.values()
    assert any(name.endswith(".done.json") for name in finished)

    finish(run_ingest(images, out, cli_env(tmp_path), "--set", f"pseudoseg.shards_per_task={shards_per_task}"))
    assert_same_artifacts(out, reference)


def test_sigkill_between_payload_and_done_json_is_redone_on_rerun(tmp_path, images_and_reference):
    images, reference = images_and_reference
    out, marker = tmp_path / "out", tmp_path / "died"
    proc = run_ingest(images, out, cli_env(tmp_path, DIE_MID_COMMIT.format(marker=str(marker))))
    proc.communicate(timeout=240)
    assert proc.returncode == -signal.SIGKILL and marker.exists()

    files = shard_files(out)
    partial = [s for s, names in files.items() if not any(n.endswith(".done.json") for n in names)]
    assert len(partial) == 1, files  # payload renamed, done.json missing → Luigi sees it incomplete

    finish(run_ingest(images, out, cli_env(tmp_path)))
    assert_same_artifacts(out, reference)


RUN_LOG = """
import os, time
import pseudoseg.tasks.engine.base as base
_run = base.ShardTask.run
def logged_run(self):
    with open({log!r}, "a") as fh:
        fh.write(f"{{os.getpid()}} {{self.task_id}}\\n")
    time.sleep(0.5)  # keep both workers busy long enough to share the shards
    return _run(self)
base.ShardTask.run = logged_run
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(server: subprocess.Popen, port: int, timeout: float = 60) -> None:
    """Until ``server`` (e.g. luigid) accepts connections on ``port`` of this host."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            assert server.poll() is None and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.2)


@pytest.mark.parametrize("shards_per_task", ["auto", "3"])  # auto = 1 here; 3: ranges [0, 3), [3, 6), [6, 7)
def test_luigid_and_two_workers_do_every_shard_exactly_once(tmp_path, shards_per_task):
    images = tmp_path / "images"
    write_good_images(images, 14)
    out, log, port = tmp_path / "out", tmp_path / "runs.log", free_port()
    env = {**cli_env(tmp_path), "XDG_STATE_HOME": str(tmp_path / "state")}
    luigid = cli(["luigid", "--out", str(out), "--port", str(port)], env)
    try:
        wait_for_port(luigid, port)
        workers = cli(["workers", "Ingest", "--n", "2", "--images", str(images), "--dataset", "ds",
                       "--out", str(out), "--scheduler-port", str(port),
                       "--set", "ingest.shard_size=2", "--set", f"pseudoseg.shards_per_task={shards_per_task}"],
                      cli_env(tmp_path, RUN_LOG.format(log=str(log))))
        finish(workers)
    finally:
        luigid.terminate()
        luigid.wait(timeout=30)

    runs = [line.split(" ", 1) for line in log.read_text().splitlines()]
    task_ids = [task_id for _, task_id in runs]
    assert len(task_ids) == 7 and len(set(task_ids)) == 7, "each of the 7 shards ran exactly once"
    done = sorted(p.name for p in (out / "ds" / "ingest").rglob("*.done.json"))
    assert done == [f"shard-{i:06d}.done.json" for i in range(7)]
    assert (tmp_path / "state" / "pseudoseg" / "luigid" / "state.pickle").exists(), "luigid keeps its state per user"
    assert not (out / ".luigid").exists(), "nothing of luigid's in the shared output root"


FAIL_SHARD_1 = """
import os
import pseudoseg.tasks.stages.ingest as ingest
_produce = ingest.IngestShard.produce
def produce_or_fail(self, progress):
    with open({log!r}, "a") as fh:
        fh.write(f"{{self.shard}}\\n")
    if self.shard == 1:
        raise RuntimeError("injected failure in shard 1")
    return _produce(self, progress)
ingest.IngestShard.produce = produce_or_fail
"""

RUN_LOG_ONLY = """
import pseudoseg.tasks.stages.ingest as ingest
_produce = ingest.IngestShard.produce
def logged(self, progress):
    with open({log!r}, "a") as fh:
        fh.write(f"{{self.shard}}\\n")
    return _produce(self, progress)
ingest.IngestShard.produce = logged
"""


def test_a_failed_shard_is_reported_and_only_it_is_redone_on_rerun(tmp_path, images_and_reference):
    images, reference = images_and_reference
    out, log = tmp_path / "out", tmp_path / "runs.log"
    proc = run_ingest(images, out, cli_env(tmp_path, FAIL_SHARD_1.format(log=str(log))),
                      "--set", "scheduler.retry_count=1")
    text, _ = proc.communicate(timeout=240)
    assert proc.returncode == 1, text
    table = text[text.index("\nstage "):]
    assert table.splitlines()[3].split()[:5] == ["Ingest", "images", "3", "2", "1"]  # shards, done, failed
    assert sorted(shard_files(out)) == [0, 2]  # the failed shard left nothing visible
    record = json.loads(next(out.glob("*/run.json")).read_text())
    assert record["status"] == "failed" and record["failures"][-1].startswith("failed: Ingest shard 1: RuntimeError")

    log.unlink()
    rerun = run_ingest(images, out, cli_env(tmp_path, RUN_LOG_ONLY.format(log=str(log))))
    finish(rerun)
    assert log.read_text().split() == ["1"], "only the failed shard runs again"
    assert_same_artifacts(out, reference)
