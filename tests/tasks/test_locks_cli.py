"""A stale lock holder that resumes, through the real `pseudoseg` command: run A is paused past
`lock_stale_seconds` in the middle of a shard (as a suspended VM on another host would be), run B takes the shard
over; A resumes while B is half way through. A clears nothing of B's and its late commit is refused with one WARNING
line; B commits, and the output is byte-identical to an undisturbed run."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import assert_same_artifacts, cli, cli_env, write_good_images
from tests.tasks.test_bad_inputs_cli import ingest_rows

pytestmark = pytest.mark.slow

# After producing its shard (its temporaries exist) the process says so and stops itself; `host` fakes the host
# name, so the other run judges the lock by its heartbeat, as a lock from another host.
PAUSE_AFTER_PRODUCE = """
import os, signal, socket
{host}
import pseudoseg.tasks.stages.ingest as ingest
_produce = ingest.IngestShard.produce
def produce_then_pause(self, progress):
    output = _produce(self, progress)
    open({ready!r}, "w").close()
    os.kill(os.getpid(), signal.SIGSTOP)
    return output
ingest.IngestShard.produce = produce_then_pause
"""


def wait_for(path: Path, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + 120
    while not path.exists():
        assert proc.poll() is None, f"{what} ended early:\n{proc.communicate()[0]}"
        assert time.monotonic() < deadline, f"{what} never got there"
        time.sleep(0.1)


def test_a_resumed_stale_holder_touches_nothing_of_the_new_holders_and_its_commit_is_refused(tmp_path):
    images, out, reference = tmp_path / "images", tmp_path / "out", tmp_path / "reference"
    write_good_images(images, 3)
    args = ["run", "Ingest", "--images", str(images), "--dataset", "ds", "--set", "pseudoseg.lock_stale_seconds=2"]
    tmp_dir = out / "ds" / "ingest"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()

    a = cli([*args, "--out", str(out)], cli_env(tmp_path / "a", PAUSE_AFTER_PRODUCE.format(
        host='socket.gethostname = lambda: "paused-host"', ready=str(tmp_path / "a.ready"))))
    b = None
    try:
        wait_for(tmp_path / "a.ready", a, "run A")
        b = cli([*args, "--out", str(out)], cli_env(tmp_path / "b", PAUSE_AFTER_PRODUCE.format(
            host="", ready=str(tmp_path / "b.ready"))))
        wait_for(tmp_path / "b.ready", b, "run B")  # B took the stale lock over and produced the shard
        (folder,) = [f for f in tmp_dir.iterdir() if f.is_dir() and not f.is_symlink()]
        b_temporaries = {p.name for p in (folder / ".tmp").iterdir()}
        assert b_temporaries, "B is half way: its temporaries are there"

        a.send_signal(signal.SIGCONT)  # A resumes: its lock is B's now
        a_text, _ = a.communicate(timeout=120)
        assert {p.name for p in (folder / ".tmp").iterdir()} >= b_temporaries, "A removed B's temporaries"
        assert not (folder / "_meta" / "shard-000000.done.json").exists(), "A committed"
        warnings = [line for line in a_text.splitlines() if "not committed" in line]
        assert len(warnings) == 1, a_text
        assert warnings[0].startswith("WARNING: pseudoseg: ingest shard 0: not committed: this process's lock on it "
                                      "was taken over while it worked"), warnings[0]

        b.send_signal(signal.SIGCONT)
        b_text, _ = b.communicate(timeout=120)
        assert b.returncode == 0, b_text
    finally:
        for proc in (a, b):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.kill()
                proc.communicate()

    manifest, rejects = ingest_rows(out)  # in = ok + rejected
    assert len(manifest) == 3 and rejects == [], "no image lost"
    proc = cli([*args, "--out", str(reference)], cli_env(tmp_path))
    text, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, text
    assert_same_artifacts(out / "ds" / "ingest", reference / "ds" / "ingest")
