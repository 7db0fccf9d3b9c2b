"""A real single-node Slurm cluster for the tests: munged, slurmctld and slurmd from Debian's ``munge`` and
``slurm-wlm`` packages (``make cluster-deps`` installs them), each in the foreground as a child of the test, all
state, sockets and logs in a temporary folder, a ``slurm.conf`` generated with this machine's CPUs and no GPUs. The
``slurm`` fixture yields the environment (``SLURM_CONF``) under which sbatch, squeue, scancel and scontrol talk to
it, and stops every daemon afterwards."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


SLURM_CONF = """\
ClusterName=pseudoseg-test
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser={user}
SlurmdUser={user}
AuthType=auth/munge
AuthInfo=socket={root}/munge/munge.socket
CredType=cred/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MinJobAge=600
KillWait=10
SchedulerParameters=sched_interval=1
NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=1000 State=UNKNOWN
# More tasks than cores: the test's luigid job and its CPU workers share this machine's cores.
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
"""


class SlurmCluster:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: list[subprocess.Popen] = []
        self.env = {**os.environ, "SLURM_CONF": str(root / "slurm.conf")}

    def start(self) -> None:
        missing = [name for name in DAEMONS if shutil.which(name) is None]
        if missing:
            pytest.fail(f"{', '.join(missing)} not installed: `make cluster-deps` installs Debian's slurm-wlm and "
                        "munge (.ci/run does)", pytrace=False)
        root = self.root
        for sub in ("munge", "state", "spool", "log"):
            (root / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
        (root / "munge").chmod(0o755)  # the socket's folder: every user's commands reach munged
        subprocess.run(["mungekey", "--create", f"--keyfile={root / 'munge' / 'munge.key'}"], check=True,
                       capture_output=True)
        (root / "slurm.conf").write_text(SLURM_CONF.format(
            root=root, cpus=os.cpu_count() or 1, user=os.environ.get("USER") or "root", ctld_port=free_port(),
            slurmd_port=free_port()))
        self._spawn(["munged", "--foreground", "--force", f"--key-file={root / 'munge' / 'munge.key'}",
                     f"--socket={root / 'munge' / 'munge.socket'}", f"--pid-file={root / 'munge' / 'munged.pid'}",
                     f"--log-file={root / 'munge' / 'munged.log'}", f"--seed-file={root / 'munge' / 'seed'}"],
                    "munged")
        self._wait(lambda: (root / "munge" / "munge.socket").exists(), "munged's socket")
        conf = str(root / "slurm.conf")
        self._spawn(["slurmctld", "-D", "-i", "-f", conf], "slurmctld")
        self._wait(lambda: self.run("scontrol", "ping").returncode == 0 and "UP" in self.run("scontrol", "ping").stdout,
                   "slurmctld")
        self._spawn(["slurmd", "-D", "-N", "localhost", "-f", conf], "slurmd")
        self._wait(lambda: "idle" in self.run("sinfo", "-h", "-o", "%T").stdout, "slurmd (node idle)")

    def _spawn(self, argv: list[str], name: str) -> None:
        log = open(self.root / "log" / f"{name}.out", "wb")  # noqa: SIM115 — open while the daemon runs
        self.procs.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                           start_new_session=True))
        log.close()

    def _wait(self, ready, what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if time.monotonic() > deadline or any(p.poll() is not None for p in self.procs):
                logs = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted((self.root / "log").glob("*"))
                                 if p.is_file())
                raise RuntimeError(f"{what} did not come up:\n{logs}")
            time.sleep(0.2)

    def run(self, *argv: str) -> subprocess.CompletedProcess:
        return subprocess.run(list(argv), env=self.env, capture_output=True, text=True)

    def queue(self, name: str | None = None) -> list[str]:
        """Jobs (array tasks one per line: ``<jobid>_<task> <state>``) in the queue, of job name ``name``."""
        argv = ["squeue", "-h", "-r", "-o", "%i %T"] + ([f"--name={name}"] if name else [])
        return [line for line in self.run(*argv).stdout.splitlines() if line.strip()]

    def stop(self) -> None:
        self.run("scancel", "--full", "--user", os.environ.get("USER") or "root")
        for proc in reversed(self.procs):  # slurmd, slurmctld, munged
            if proc.poll() is None:
                with _suppress():
                    os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    with _suppress():
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=20)
        self.procs.clear()


class _suppress:
    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, *_: object) -> bool:
        return kind is not None and issubclass(kind, ProcessLookupError)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory) -> Iterator[SlurmCluster]:
    """A single-node Slurm cluster (munged + slurmctld + slurmd), up for a test module, stopped after it."""
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
