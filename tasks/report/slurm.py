"""`pseudoseg slurm`: the DAG on a Slurm cluster, as two plain ``sbatch`` scripts.

* **luigid** — one job of one task: ``pseudoseg luigid --port 0 --address $(hostname) --announce FILE`` (FILE:
  ``<out>/<dataset>/logs/slurm/<submission>/luigid.json``, written once luigid listens), kept up until no task of
  the workers' array is left in the queue (a requeued task is pending, so it counts).
* **workers** — a job array, one task per node (``--nodes``): each waits for FILE, then runs ``pseudoseg workers``
  against that luigid with one worker process per GPU (``CUDA_VISIBLE_DEVICES`` = one of the GPUs Slurm gave the
  task), or ``--workers-per-node`` CPU workers. ``--requeue`` and ``--signal=B:USR1@<seconds>``: before a time
  limit the batch shell gets SIGUSR1, each worker finishes the task it runs and stops, and the array task requeues
  itself; SIGTERM (preemption, scancel) abandons the shard in progress (nothing committed, its lock released).
  Either way a requeued task or ``--resume`` finishes what is missing, and the per-shard records make that exact.

The luigid job is submitted held, the array after it (``--dependency=after:<luigid>``), then luigid is released: so
luigid sees the array in the queue from its first second. Plain sbatch rather than a submission library: nothing
more to install on a login node, and ``--dry-run`` prints the exact scripts, which a user can read, keep and submit
by hand. Logs: ``<out>/<dataset>/logs/slurm-luigid-<job>.log`` and ``slurm-workers-<array job>_<task>.log``.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

SUBMISSIONS = Path("logs") / "slurm"  # under <out>/<dataset>: one folder per submission (scripts, luigid.json)
ANNOUNCE = "luigid.json"
RECORD = "submitted.json"


@dataclass(frozen=True)
class SlurmJob:
    stage: str
    images: str
    dataset: str
    out: Path
    nodes: int = 1
    gpus_per_node: int = 0
    workers_per_node: int | None = None
    cpus_per_worker: int = 1
    partition: str | None = None
    time: str | None = None
    account: str | None = None
    signal_seconds: int = 120
    sbatch_args: tuple[str, ...] = ()
    settings: tuple[str, ...] = ()  # --config FILE / --set ITEM, passed on to every worker
    python: str = sys.executable
    submission: str = field(default_factory=lambda: time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + f"-{os.getpid()}")

    @property
    def workers(self) -> int:
        return self.workers_per_node or max(1, self.gpus_per_node)

    @property
    def folder(self) -> Path:
        return self.out / self.dataset / SUBMISSIONS / self.submission

    @property
    def logs(self) -> Path:
        return self.out / self.dataset / "logs"

    @property
    def workers_name(self) -> str:
        return f"pseudoseg-workers-{self.dataset}-{self.submission}"

    def common_header(self) -> list[str]:
        lines = []
        for flag, value in (("partition", self.partition), ("time", self.time), ("account", self.account)):
            if value:
                lines.append(f"#SBATCH --{flag}={value}")
        lines += [f"#SBATCH {arg}" for arg in self.sbatch_args]
        return lines

    def command(self, *args: str) -> str:
        return shlex.join([self.python, "-m", "pseudoseg.tasks.report.cli", *args])


def luigid_script(job: SlurmJob) -> str:
    announce = job.folder / ANNOUNCE
    return "\n".join([
        "#!/bin/bash",
        f"#SBATCH --job-name=pseudoseg-luigid-{job.dataset}",
        "#SBATCH --nodes=1",
        "#SBATCH --ntasks=1",
        "#SBATCH --cpus-per-task=1",
        f"#SBATCH --output={job.logs}/slurm-luigid-%j.log",
        *job.common_header(),
        "# luigid for the workers' array below; it writes its host and port to ANNOUNCE once it listens, and stops",
        "# when no task of the array is left in the queue.",
        "set -uo pipefail",
        f"ANNOUNCE={shlex.quote(str(announce))}",
        'STATE="${TMPDIR:-/tmp}/pseudoseg-luigid-${SLURM_JOB_ID}"',
        'mkdir -p -m 700 "$STATE"',
        f'{job.command("luigid", "--out", str(job.out), "--port", "0", "--announce", str(announce))} '
        '--address "$(hostname)" --state-path "$STATE/state.pickle" &',
        "luigid=$!",
        'trap \'kill "$luigid" 2>/dev/null; rm -rf "$STATE"\' EXIT',
        f"while [ -n \"$(squeue -h -o %i --name={shlex.quote(job.workers_name)})\" ]; do",
        '    kill -0 "$luigid" 2>/dev/null || exit 1',
        "    sleep 5",
        "done",
        'rm -f "$ANNOUNCE"',
        "",
    ])


def workers_script(job: SlurmJob) -> str:
    announce = job.folder / ANNOUNCE
    args = ["workers", job.stage, "--images", job.images, "--dataset", job.dataset, "--out", str(job.out),
            "--n", str(job.workers), *job.settings, "--array-task"]
    gres = [f"#SBATCH --gres=gpu:{job.gpus_per_node}"] if job.gpus_per_node else []
    gpus = ' --gpus "$CUDA_VISIBLE_DEVICES"' if job.gpus_per_node else ""
    return "\n".join([
        "#!/bin/bash",
        f"#SBATCH --job-name={job.workers_name}",
        f"#SBATCH --array=0-{job.nodes - 1}",
        "#SBATCH --nodes=1",
        "#SBATCH --ntasks=1",
        f"#SBATCH --cpus-per-task={job.workers * job.cpus_per_worker}",
        *gres,
        "#SBATCH --requeue",
        f"#SBATCH --signal=B:USR1@{job.signal_seconds}",
        "#SBATCH --open-mode=append",
        f"#SBATCH --output={job.logs}/slurm-workers-%A_%a.log",
        *job.common_header(),
        f"# {job.workers} worker process(es) per array task, against the luigid that ANNOUNCE names.",
        "set -uo pipefail",
        f"ANNOUNCE={shlex.quote(str(announce))}",
        "for _ in $(seq 600); do [ -s \"$ANNOUNCE\" ] && break; sleep 1; done",
        '[ -s "$ANNOUNCE" ] || { echo "pseudoseg: luigid did not write $ANNOUNCE within 600 s" >&2; exit 1; }',
        f"read -r HOST PORT < <({shlex.quote(job.python)} -c 'import json, sys; d = json.load(open(sys.argv[1])); "
        "print(d[\"host\"], d[\"port\"])' \"$ANNOUNCE\")",
        'echo "array task ${SLURM_ARRAY_TASK_ID} (restart ${SLURM_RESTART_COUNT:-0}) on $(hostname): luigid '
        '$HOST:$PORT"',
        f'{job.command(*args)} --scheduler-host "$HOST" --scheduler-port "$PORT"{gpus} &',
        "pid=$!",
        "requeue=0",
        "# SIGUSR1 (--signal, before the time limit): each worker finishes its task and stops, then this task",
        "# requeues itself; SIGTERM (preemption, scancel): the shard in progress is abandoned, nothing committed.",
        'trap \'requeue=1; kill -USR1 "$pid"\' USR1',
        'trap \'kill -TERM "$pid"\' TERM',
        'wait "$pid"; status=$?',
        'while kill -0 "$pid" 2>/dev/null; do wait "$pid"; status=$?; done',
        'if [ "$requeue" = 1 ]; then scontrol requeue "${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"; fi',
        'exit "$status"',
        "",
    ])


def previous_submissions(out: Path, dataset: str) -> list[dict]:
    """The records of earlier submissions for this dataset, oldest first."""
    records = []
    for path in sorted((out / dataset / SUBMISSIONS).glob(f"*/{RECORD}")):
        try:
            records.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return records


class SubmitError(RuntimeError):
    """sbatch or scontrol refused: its message, one line."""


def _sbatch(args: list[str], script: Path) -> str:
    found = subprocess.run(["sbatch", "--parsable", *args, str(script)], capture_output=True, text=True)
    if found.returncode != 0:
        raise SubmitError(f"sbatch {script.name}: {found.stderr.strip() or found.stdout.strip()}")
    return found.stdout.strip().split(";", 1)[0]


def submit(job: SlurmJob) -> dict:
    """Write the two scripts under ``job.folder`` and submit them: luigid held, the array after it, luigid
    released. Returns the record written beside them (``submitted.json``)."""
    job.folder.mkdir(parents=True, exist_ok=True)
    job.logs.mkdir(parents=True, exist_ok=True)
    luigid, workers = job.folder / "luigid.sbatch", job.folder / "workers.sbatch"
    luigid.write_text(luigid_script(job))
    workers.write_text(workers_script(job))
    luigid_id = _sbatch(["--hold"], luigid)
    try:
        array_id = _sbatch([f"--dependency=after:{luigid_id}"], workers)
    except SubmitError:
        subprocess.run(["scancel", luigid_id], capture_output=True)
        raise
    released = subprocess.run(["scontrol", "release", luigid_id], capture_output=True, text=True)
    if released.returncode != 0:
        raise SubmitError(f"scontrol release {luigid_id}: {released.stderr.strip()}")
    record = {"submission": job.submission, "stage": job.stage, "images": job.images, "luigid_job": luigid_id,
              "workers_job": array_id, "array_tasks": job.nodes, "workers_per_task": job.workers,
              "gpus_per_node": job.gpus_per_node, "announce": str(job.folder / ANNOUNCE),
              "submitted": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (job.folder / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return record


def missing_sbatch() -> str | None:
    if shutil.which("sbatch") is None:
        return "sbatch is not on PATH: run this on a Slurm login node (or see the scripts with --dry-run)"
    return None
