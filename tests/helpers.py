"""Shared helpers for the DAG-level tests: image folders, CLI subprocesses with injected faults, tree bytes."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import cv2
import luigi.configuration
import numpy as np

from pseudoseg.pipeline.core.artifacts import LATEST_LINK

REPO = Path(__file__).resolve().parents[1]


def write_good_images(folder: Path, count: int, *, seed: int = 0, size: tuple[int, int] = (48, 64)) -> list[Path]:
    """Distinct small photos-like images (random blobs), alternating JPEG and PNG."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        img = cv2.GaussianBlur(rng.integers(0, 256, (*size, 3), dtype=np.uint8), (5, 5), 0)
        path = folder / f"good_{i:03d}.{'jpg' if i % 2 == 0 else 'png'}"
        cv2.imwrite(str(path), img)
        paths.append(path)
    return paths


@contextlib.contextmanager
def luigi_settings(**sections: dict[str, object]) -> Iterator[None]:
    """Temporarily set luigi.cfg values in this process, e.g. luigi_settings(ingest={"shard_size": 3})."""
    cfg = luigi.configuration.get_config()
    saved = []
    for section, values in sections.items():
        if not cfg.has_section(section):
            cfg.add_section(section)
        for key, value in values.items():
            saved.append((section, key, cfg.get(section, key, None)))
            cfg.set(section, key, str(value))
    try:
        yield
    finally:
        for section, key, old in saved:
            if old is None:
                cfg.remove_option(section, key)
            else:
                cfg.set(section, key, old)


def cli_env(tmp_path: Path, sitecustomize: str | None = None) -> dict[str, str]:
    """Environment for a `python -m tasks.cli` subprocess; ``sitecustomize`` code runs at interpreter start,
    which is how tests inject faults or run logs into the real command without hooks in product code."""
    env = os.environ.copy()
    env["LUIGI_CONFIG_PATH"] = str(REPO / "luigi.cfg")
    paths = [str(REPO)]
    if sitecustomize is not None:
        site = tmp_path / "site"
        site.mkdir(exist_ok=True)
        (site / "sitecustomize.py").write_text(textwrap.dedent(sitecustomize))
        paths.insert(0, str(site))
    env["PYTHONPATH"] = os.pathsep.join(paths + [env.get("PYTHONPATH", "")])
    return env


def in_terminal(argv: list[str], env: dict[str, str], cwd: Path, *, timeout: float = 600,
                columns: int = 120, interrupt_when: str | None = None) -> tuple[int, str]:
    """Run ``argv`` as a person does in a terminal: stdin, stdout and stderr on a pseudo-terminal of ``columns``
    columns (so ``isatty()`` is true and progress bars draw). Returns (exit status, everything it printed, with
    carriage returns as newlines). ``interrupt_when``: send Ctrl-C (SIGINT to its process group, as a terminal
    does) once this text has been printed."""
    import fcntl
    import pty
    import select
    import signal
    import struct
    import termios
    import time

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    interrupted = False
    try:
        while True:
            if time.monotonic() > deadline:
                os.killpg(proc.pid, signal.SIGKILL)
                raise TimeoutError(f"{argv} did not end within {timeout} s:\n" + b"".join(chunks).decode(errors="replace"))
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: every process holding the terminal has closed it
                    break
                if not data:
                    break
                chunks.append(data)
                if interrupt_when and not interrupted and interrupt_when.encode() in b"".join(chunks):
                    os.killpg(proc.pid, signal.SIGINT)
                    interrupted = True
            elif proc.poll() is not None:
                break
    finally:
        os.close(master)
    code = proc.wait(timeout=60)
    return code, b"".join(chunks).decode("utf-8", errors="replace").replace("\r\n", "\n").replace("\r", "\n")


def cli(args: list[str], env: dict[str, str], **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pseudoseg.tasks.report.cli", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


RUN_REPORTS = ("run.json", "README.md", "logs")  # in a dataset root: about one run (times, ran/skipped), not artifacts


def is_run_report(rel: Path) -> bool:
    """``rel`` (under an output root or a dataset root) is a run's report: run.json, the dataset card, a log."""
    parts = rel.parts
    return bool(parts) and (parts[0] in RUN_REPORTS or (len(parts) >= 2 and parts[1] in RUN_REPORTS))


def assert_same_artifacts(a: Path, b: Path) -> None:
    """Two output trees byte-identical (``tree_bytes``: hidden entries such as .quarantine/, .lock-* and
    temporaries are not artifacts) except the run-dependent ``seconds`` of each done.json."""
    ta, tb = tree_bytes(a), tree_bytes(b)
    assert ta.keys() == tb.keys()
    for rel in ta:
        if rel.endswith(".done.json"):
            ja, jb = json.loads(ta[rel]), json.loads(tb[rel])
            ja.pop("seconds"), jb.pop("seconds")
            assert ja == jb, rel
        else:
            assert ta[rel] == tb[rel], rel


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every visible file under ``root`` (relative path → bytes); hidden temporaries are not artifacts, nor are the
    reports every run rewrites (run.json, the dataset card, logs/), nor the files seen again through a stage's
    ``latest`` link (its target is listed; the ``LATEST`` file names it)."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not any(part.startswith(".") or part == LATEST_LINK for part in p.relative_to(root).parts)
        and not is_run_report(p.relative_to(root))
    }
