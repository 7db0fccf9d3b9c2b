"""Benchmarks (never timed tests): `make bench` writes results to bench/results/<name>.json.

Each benchmark records the machine (cores, torch device) next to its numbers, so results from a laptop and
a GPU host are never compared by accident.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from pipeline.ingest import DecodeLimits, ingest_entries
from pipeline.sources import EntryReader, list_source, plan_entries


def machine() -> dict:
    import torch

    return {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def bench_ingest(n_images: int = 200) -> dict:
    """Plan + ingest throughput on photo-sized JPEGs (640x480) in one shard."""
    import cv2
    import numpy as np

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(n_images):
            img = cv2.GaussianBlur(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8), (9, 9), 0)
            cv2.imwrite(f"{tmp}/img_{i:05d}.jpg", img)
        t0 = time.perf_counter()
        listing = list_source(tmp)
        plan = list(plan_entries(listing.entries, shard_size=n_images))
        t1 = time.perf_counter()
        with EntryReader() as reader:
            result = ingest_entries(plan, reader.read, DecodeLimits())
        t2 = time.perf_counter()
    assert len(result.manifest) == n_images
    return {"images": n_images, "plan_images_per_s": n_images / (t1 - t0),
            "ingest_images_per_s": n_images / (t2 - t1)}


BENCHMARKS = {"ingest": bench_ingest}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("names", nargs="*", default=sorted(BENCHMARKS))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in args.names:
        result = {"benchmark": name, "machine": machine(), "results": BENCHMARKS[name]()}
        (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
