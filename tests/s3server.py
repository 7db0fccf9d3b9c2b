"""An S3-compatible server on 127.0.0.1 for the object-storage tests: moto's standalone server (``moto_server``),
a real HTTP server speaking the S3 protocol in a subprocess of its own (so a test can stop it as a store goes
down), started and stopped by the ``s3`` fixture. Buckets live in the server's memory: a restarted server is empty
until the test uploads again."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "pseudoseg-test", "AWS_SECRET_ACCESS_KEY": "pseudoseg-test",
               "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class S3Server:
    def __init__(self, port: int) -> None:
        self.port = port
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server did not start on port {self.port}") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(timeout=30)
        self.proc = None

    def fs(self):
        """A plain s3fs client of this server (the tests' own uploads and deletions)."""
        import s3fs

        return s3fs.S3FileSystem(endpoint_url=self.endpoint, key=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                                 secret=CREDENTIALS["AWS_SECRET_ACCESS_KEY"], skip_instance_cache=True,
                                 use_listings_cache=False)

    def upload(self, folder: Path, url: str) -> None:
        """Every file under ``folder`` to ``s3://bucket/prefix/`` (the bucket made when missing)."""
        fs = self.fs()
        bucket = url.removeprefix("s3://").split("/", 1)[0]
        if not fs.exists(bucket):
            fs.mkdir(bucket)
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                fs.pipe(f"{url.removeprefix('s3://').rstrip('/')}/{path.relative_to(folder).as_posix()}",
                        path.read_bytes())


@pytest.fixture
def s3(monkeypatch) -> Iterator[S3Server]:
    """A fresh S3 server on 127.0.0.1 and this process's AWS credentials set for it (subprocesses get them from
    ``s3_env``); stopped after the test."""
    server = S3Server(free_port())
    server.start()
    for key, value in CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    try:
        yield server
    finally:
        server.stop()
