"""`pseudoseg slurm` on a real single-node Slurm cluster (tests/slurmcluster.py: munged, slurmctld, slurmd from
Debian's packages): luigid as one job, two array tasks of CPU workers, the sample set through the whole DAG with
the demo's settings (tiny models; shards of 2 images) — the tree is byte-identical to a local `pseudoseg run`'s;
and through Ingest and UseCaptions when one array task is cancelled mid-shard (scancel) and requeued."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pseudoseg.pipeline.core.sample_set import write_sample_set
from pseudoseg.tasks.engine.shipped import DEMO_CONFIG
from tests.helpers import REPO, assert_same_artifacts, cli_env
from tests.slurmcluster import SlurmCluster, slurm  # noqa: F401 — the fixture

pytestmark = [pytest.mark.slow]

STAGE = "UseCaptions"
DEMO_SETTINGS = ["--config", str(DEMO_CONFIG)]  # FullDAG at the demo's sizes (4x4 SAM points, few epochs)


def settings(models: Path) -> list[str]:
    return ["--set", "ingest.shard_size=2", "--set", "use.caption_max_new_tokens=2", "--set",
            f"models.cache_dir={models}", "--set", "pseudoseg.shards_per_task=1"]


def pseudoseg(args: list[str], env: dict[str, str], timeout: float = 600) -> tuple[int, str]:
    proc = subprocess.run([sys.executable, "-m", "pseudoseg.tasks.report.cli", *args], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
    return proc.returncode, proc.stdout


def reference(tmp_path_factory, models: Path, stage: str, extra: list[str]) -> tuple[Path, Path]:
    """(the sample set's images, the output root of a local `pseudoseg run STAGE`) — the reference."""
    tmp = tmp_path_factory.mktemp("slurm-reference")
    images = write_sample_set(tmp / "samples").root
    code, text = pseudoseg(["run", stage, "--images", str(images), "--dataset", "demo", "--out", str(tmp / "out"),
                            *settings(models), *extra], cli_env(tmp))
    assert code == 0, text
    return images, tmp / "out"


@pytest.fixture(scope="module")
def local(tmp_path_factory, tiny_cache) -> tuple[Path, Path]:
    return reference(tmp_path_factory, tiny_cache, STAGE, [])


@pytest.fixture(scope="module")
def local_full_dag(tmp_path_factory, tiny_cache) -> tuple[Path, Path]:
    return reference(tmp_path_factory, tiny_cache, "FullDAG", DEMO_SETTINGS)


def job_env(tmp_path: Path, cluster: SlurmCluster, sitecustomize: str | None = None) -> dict[str, str]:
    """What the jobs run with (sbatch passes the submitting environment on): the cluster's SLURM_CONF, and a
    luigid that hands a dead worker's task to another after 5 s (Luigi's default: 60 s)."""
    quick = tmp_path / "scheduler.cfg"
    quick.write_text("[scheduler]\nworker_disconnect_delay = 5\nretry_delay = 1\n")
    return {**cli_env(tmp_path, sitecustomize), "SLURM_CONF": cluster.env["SLURM_CONF"],
            "LUIGI_CONFIG_PATH": str(quick)}


def submit(images: Path, out: Path, env: dict[str, str], models: Path, stage: str = STAGE,
           extra: tuple[str, ...] = ()) -> dict:
    code, text = pseudoseg(["slurm", stage, "--images", str(images), "--dataset", "demo", "--out", str(out),
                            "--nodes", "2", "--workers-per-node", "1", *settings(models), *extra], env, timeout=120)
    assert code == 0 and "submitted" in text, text
    (record,) = [json.loads(p.read_text()) for p in (out / "demo" / "logs" / "slurm").glob("*/submitted.json")]
    return record


def wait_until_gone(cluster: SlurmCluster, out: Path, timeout: float = 400) -> None:
    deadline = time.monotonic() + timeout
    while [line for line in cluster.queue() if line.split()[1] != "COMPLETED"]:
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted((out / "demo" / "logs").glob(
                "slurm-*.log")))
            pytest.fail(f"the jobs did not end within {timeout} s: {cluster.queue()}\n{logs}")
        time.sleep(1)


def test_slurm_runs_the_dag_as_a_local_run_does(slurm, local_full_dag, tiny_cache, tmp_path):  # noqa: F811
    images, reference = local_full_dag
    out = tmp_path / "out"
    env = job_env(tmp_path, slurm)
    started = time.monotonic()
    record = submit(images, out, env, tiny_cache, "FullDAG", tuple(DEMO_SETTINGS))
    assert len(slurm.queue(f"pseudoseg-workers-demo-{record['submission']}")) == 2, slurm.queue()
    seen_status = False
    while slurm.queue():
        if not seen_status and list(out.glob("demo/*/*/_meta/shard-*.done.json")):
            code, text = pseudoseg(["status", str(out), "--dataset", "demo"], env)
            assert code == 0 and "ingest" in text.lower(), text  # while the job runs
            seen_status = True
        wait_until_gone(slurm, out) if seen_status else time.sleep(0.5)
    wall = time.monotonic() - started
    assert seen_status
    logs = out / "demo" / "logs"
    workers = sorted(p.name for p in logs.glob(f"slurm-workers-{record['workers_job']}_*.log"))
    assert workers == [f"slurm-workers-{record['workers_job']}_{i}.log" for i in (0, 1)], workers
    assert (logs / f"slurm-luigid-{record['luigid_job']}.log").is_file()
    assert_same_artifacts(reference, out)
    print(f"slurm run: {wall:.1f} s wall (submission to both jobs gone), 2 array tasks x 1 CPU worker")

    code, text = pseudoseg(["slurm", "FullDAG", "--images", str(images), "--dataset", "demo", "--out", str(out),
                            *settings(tiny_cache), *DEMO_SETTINGS], env)
    assert code == 2 and "--resume" in text, "a second submission must be asked for"


BLOCK_TASK_1 = """
import os, pathlib, time
task, restart = os.environ.get("SLURM_ARRAY_TASK_ID"), os.environ.get("SLURM_RESTART_COUNT", "0")
marker = pathlib.Path(os.environ["PSEUDOSEG_TEST_MARKER"])
if task is not None and restart == "0":
    import pseudoseg.tasks.engine.base as base
    start = base.ProgressReporter.start
    def start_then_hold(self, total, items="images"):
        start(self, total, items)
        if getattr(base, "_held", False):
            return
        base._held = True
        if task == "1":  # inside its first shard (lock held): wait there for scancel
            marker.write_text(str(os.getpid()))
            time.sleep(600)
        else:  # task 0 waits until task 1 is inside a shard, so both have work
            while not marker.exists():
                time.sleep(0.2)
    base.ProgressReporter.start = start_then_hold
"""


def test_an_array_task_cancelled_mid_shard_and_requeued_ends_byte_identical(slurm, local, tiny_cache,  # noqa: F811
                                                                            tmp_path):
    images, reference = local
    out = tmp_path / "out"
    env = job_env(tmp_path, slurm, BLOCK_TASK_1)
    env["PSEUDOSEG_TEST_MARKER"] = str(tmp_path / "task-1-in-a-shard")
    record = submit(images, out, env, tiny_cache)
    task = f"{record['workers_job']}_1"
    deadline = time.monotonic() + 300
    while not (tmp_path / "task-1-in-a-shard").exists():
        assert time.monotonic() < deadline, f"array task 1 never started a shard: {slurm.queue()}"
        time.sleep(0.2)
    assert slurm.run("scancel", task).returncode == 0
    while any(line.startswith(f"{task} ") for line in slurm.queue()):
        time.sleep(0.2)
    requeued = slurm.run("scontrol", "requeue", task)
    assert requeued.returncode == 0, requeued.stderr
    slurm.run("scontrol", "update", f"jobid={task}", "StartTime=now")  # Slurm holds a requeued job back 2 min
    wait_until_gone(slurm, out)
    log = (out / "demo" / "logs" / f"slurm-workers-{task}.log").read_text()
    assert "restart 0" in log and "restart 1" in log, log  # the cancelled life and the requeued one, one log
    assert "interrupted" in log, log  # the shard in progress was abandoned, not left half-done
    assert_same_artifacts(reference, out)
