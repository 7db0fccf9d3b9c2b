"""Plan + ingest throughput on photo-sized JPEGs (``make bench`` → bench/results/ingest.json)."""

from __future__ import annotations

import tempfile

from bench.fixtures import photo
from bench.timing import compare
from pseudoseg.pipeline.core.ingest import DecodeLimits, ingest_entries
from pseudoseg.pipeline.core.sources import EntryReader, list_source, plan_entries


def bench_ingest(n_images: int = 200, repeats: int = 3) -> dict:
    """Plan + ingest throughput on photo-sized JPEGs (640x480) in one shard (files in the page cache)."""
    import cv2
    import numpy as np

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(n_images):
            cv2.imwrite(f"{tmp}/img_{i:05d}.jpg", photo(rng, kernel=9))
        plan = list(plan_entries(list_source(tmp).entries, shard_size=n_images))

        def ingest() -> None:
            with EntryReader() as reader:
                result = ingest_entries(plan, reader.read, DecodeLimits())
            assert len(result.manifest) == n_images

        t = compare({"plan": lambda: list(plan_entries(list_source(tmp).entries, shard_size=n_images)),
                     "ingest": ingest}, repeats=repeats, warmup=1)
    return {"images": n_images, "repeats": repeats,
            "plan_images_per_s": round(n_images / t["plan"]["wall_s"]["median"], 1),
            "ingest_images_per_s": round(n_images / t["ingest"]["wall_s"]["median"], 1),
            "ingest_cpu_s_per_image": round(t["ingest"]["cpu_s"]["median"] / n_images, 6), "timings": t}


BENCHMARK = bench_ingest
