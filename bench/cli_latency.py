"""Seconds until `pseudoseg` answers what a person types first (bench/results/cli_latency.json)."""

from __future__ import annotations

import time
from pathlib import Path

from bench.fixtures import tiny_png


def bench_cli_latency(repeats: int = 5) -> dict:
    """Seconds until `pseudoseg` answers, for what a person types first: `stages`, a key typo in --set, a section
    typo, a missing --images, an unknown stage (issue 20: each under 2 s — no model library is imported before the
    arguments and settings are checked). Commands interleaved, each `repeats` times; min and median."""
    import statistics
    import subprocess
    import sys
    import tempfile

    import numpy as np

    images = Path(tempfile.mkdtemp(prefix="bench-cli-"))
    (images / "a.png").write_bytes(tiny_png(np.zeros((8, 8, 3), np.uint8)))
    cases = {
        "stages": ["stages"],
        "key_typo": ["run", "Ingest", "--images", str(images), "--set", "ingest.shard_sizee=3"],
        "section_typo": ["run", "Ingest", "--images", str(images), "--set", "ingset.shard_size=3"],
        "missing_images": ["run", "Ingest", "--images", str(images / "nope")],
        "unknown_stage": ["run", "Ingets", "--images", str(images)],
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, args in cases.items():
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "pseudoseg.tasks.report.cli", *args], capture_output=True, cwd=images)
            times[name].append(time.perf_counter() - t0)
    return {name: {"min_s": round(min(t), 3), "median_s": round(statistics.median(t), 3), "runs": len(t)}
            for name, t in times.items()}


BENCHMARK = bench_cli_latency
