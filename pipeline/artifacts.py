"""Content-addressed, atomic shard artifacts.

Layout: ``<root>/<dataset>/<stage>/<params-hash>/shard-NNNNNN.<suffix>`` plus ``params.json`` beside.
Every file is written to a hidden temporary name in the same folder and renamed into place, and the shard's
``done.json`` is renamed last, so a crash at any point leaves no visible artifact for that shard.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import pyarrow as pa
import webdataset as wds

from schemas import SHARD_STATS, Contract

TMP_PREFIX = ".tmp-"
# Packages whose version can change an artifact's bytes; recorded in every done.json.
VERSIONED_PACKAGES = ("pseudoseg", "numpy", "pillow", "opencv-python", "pyarrow", "webdataset", "torch",
                      "transformers", "segment-anything", "spacy", "pycocotools")


def canonical_json(value: Any) -> str:
    """Sorted, compact JSON: the one spelling used for hashing parameters."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def params_hash(params: Mapping[str, Any], length: int = 12) -> str:
    """Hash of the content-affecting parameters (including upstream hashes), naming the output folder."""
    return hashlib.sha256(canonical_json(params).encode()).hexdigest()[:length]


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def shard_name(shard: int) -> str:
    return f"shard-{shard:06d}"


@dataclass(frozen=True)
class StageDir:
    """One stage's output folder for one parameter set."""

    root: Path
    dataset: str
    stage: str
    params: Mapping[str, Any]

    @property
    def hash(self) -> str:
        return params_hash(self.params)

    @property
    def path(self) -> Path:
        return Path(self.root) / self.dataset / self.stage / self.hash

    def shard_path(self, shard: int, suffix: str) -> Path:
        """``suffix`` without the leading dot, e.g. 'parquet', 'rejects.parquet', 'tar', 'done.json'."""
        return self.path / f"{shard_name(shard)}.{suffix}"

    def done_path(self, shard: int) -> Path:
        return self.shard_path(shard, "done.json")

    def write_params(self) -> None:
        """params.json: the parameters behind the hash, human-readable. Idempotent."""
        target = self.path / "params.json"
        body = (json.dumps(dict(self.params), sort_keys=True, indent=2, default=str) + "\n").encode()
        if not target.exists() or target.read_bytes() != body:
            atomic_write_bytes(target, body)

    def clear_unfinished(self, shard: int) -> None:
        """Before (re)running a shard: remove what a killed attempt left behind — hidden temporaries, and
        payloads renamed into place before the attempt died without writing done.json."""
        if not self.path.exists() or self.done_path(shard).exists():
            return
        name = shard_name(shard)
        for p in self.path.iterdir():
            if p.name.startswith(f"{TMP_PREFIX}{name}.") or p.name.startswith(f"{name}."):
                p.unlink(missing_ok=True)


def atomic_write_bytes(target: Path, data: bytes) -> None:
    """Write to a hidden temporary sibling, fsync, then rename: readers see all of the file or none of it."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{TMP_PREFIX}{target.name}.{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, target)


def webdataset_tar_bytes(samples: Iterable[Mapping[str, Any]]) -> bytes:
    """A WebDataset tar of ``samples`` (dicts with ``__key__`` and ``ext → bytes``), in the given order.

    webdataset's own TarWriter, with a fixed mtime so the same samples always give the same bytes."""
    buf = io.BytesIO()
    with wds.TarWriter(buf, mtime=0.0, encoder=False) as writer:
        for sample in samples:
            writer.write(dict(sample))
    return buf.getvalue()


class TarSpool:
    """A WebDataset tar written sample by sample to the hidden temporary of its final path, so a shard of large
    samples (feature caches, SAM embeddings: gigabytes per 1000 images) never sits in memory. Same bytes as
    :func:`webdataset_tar_bytes` for the same samples. Use as a context manager, then put ``spool.path`` in
    ``ShardOutput.files``: :func:`commit_shard` renames it into place. On an exception the temporary is removed.
    """

    def __init__(self, target: Path) -> None:
        self.target = Path(target)
        self.path = self.target.with_name(f"{TMP_PREFIX}{self.target.name}.{os.getpid()}")
        self.count = 0

    def __enter__(self) -> TarSpool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "wb")  # noqa: SIM115 — closed in __exit__
        self._writer = wds.TarWriter(self._fh, mtime=0.0, encoder=False)
        return self

    def write(self, sample: Mapping[str, Any]) -> None:
        self._writer.write(dict(sample))
        self.count += 1

    def __exit__(self, exc_type, exc, tb) -> None:
        self._writer.close()
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        if exc_type is not None:
            self.path.unlink(missing_ok=True)


def _file_digest(path: Path) -> tuple[int, str]:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return path.stat().st_size, h.hexdigest()


def package_versions() -> dict[str, str]:
    out = {}
    for name in VERSIONED_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


@dataclass
class ShardOutput:
    """What one shard task produced: named payloads (suffix → bytes, or the path of a finished :class:`TarSpool`
    temporary) plus its accounting."""

    files: dict[str, bytes | Path] = field(default_factory=dict)
    in_count: int = 0
    ok_count: int = 0
    rejected_count: int = 0

    def add_table(self, suffix: str, contract: Contract, table: pa.Table) -> None:
        self.files[suffix] = contract.to_parquet_bytes(table)


class AccountingError(RuntimeError):
    """A shard's counts do not add up (in != ok + rejected): a bug, never written as done."""


def commit_shard(stage_dir: StageDir, shard: int, output: ShardOutput, *, seconds: float) -> dict[str, Any]:
    """Rename every payload into place, then write done.json last. Returns the stats record."""
    if output.in_count != output.ok_count + output.rejected_count:
        raise AccountingError(
            f"{stage_dir.stage} shard {shard}: in={output.in_count} != ok={output.ok_count} "
            f"+ rejected={output.rejected_count}"
        )
    stage_dir.write_params()
    files = []
    for suffix in sorted(output.files):
        data = output.files[suffix]
        path = stage_dir.shard_path(shard, suffix)
        if isinstance(data, Path):  # a spooled temporary, already fsynced
            num_bytes, digest = _file_digest(data)
            os.replace(data, path)
        else:
            atomic_write_bytes(path, data)
            num_bytes, digest = len(data), sha256_hex(data)
        files.append({"name": path.name, "num_bytes": num_bytes, "sha256": digest})
    stats = {
        "stage": stage_dir.stage,
        "dataset": stage_dir.dataset,
        "shard": shard,
        "params_hash": stage_dir.hash,
        "params": {k: canonical_json(v) for k, v in sorted(stage_dir.params.items())},
        "in_count": output.in_count,
        "ok_count": output.ok_count,
        "rejected_count": output.rejected_count,
        "seconds": round(float(seconds), 3),
        "versions": package_versions(),
        "files": files,
    }
    atomic_write_bytes(stage_dir.done_path(shard), SHARD_STATS.to_json_bytes(stats))
    return stats


def read_shard_stats(path: Path) -> dict[str, Any]:
    return SHARD_STATS.read_json(path)
