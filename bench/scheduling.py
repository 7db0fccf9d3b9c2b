"""Run overhead against the number of shards: `pseudoseg run Ingest` over n one-image shards
(bench/results/scheduling.json)."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from bench.fixtures import image_lists
from bench.timing import REPO, timed_cli


def _fit(points: list[tuple[int, float]]) -> dict:
    """Least-squares a + b·T and a + b·T + c·T² over (T, seconds) points."""
    import numpy as np

    t = np.array([p[0] for p in points], float)
    y = np.array([p[1] for p in points], float)
    out = {}
    for degree, names in ((1, ("a_s", "b_ms_per_shard")), (2, ("a_s", "b_ms_per_shard", "c_us_per_shard2"))):
        if len(set(t)) <= degree:
            continue
        coef = np.polyfit(t, y, degree)[::-1]  # a, b, c
        scale = (1.0, 1e3, 1e6)
        out[f"degree_{degree}"] = {n: round(float(c * k), 6) for n, c, k in zip(names, coef, scale, strict=False)}
    return out


def _summarise_runs(runs: list[dict], key: str) -> dict:
    import statistics

    by: dict[tuple, list[dict]] = {}
    for r in runs:
        by.setdefault((r["phase"], r[key]), []).append(r)
    out: dict[str, dict] = {}
    for (phase, n), rows in sorted(by.items()):
        entry = out.setdefault(phase, {}).setdefault(str(n), {})
        for metric in ("cpu_s", "wall_s", "max_rss_mb"):
            values = [r[metric] for r in rows]
            entry[metric] = {"min": min(values), "median": round(statistics.median(values), 2)}
        entry["load_1m"] = [r["load_before"][0] for r in rows]
    return out


def bench_scheduling(sizes: tuple[int, ...] = (1_000, 10_000, 100_000), repeats: int = 2, workers: int = 2,
                     baseline: str | None = None, baseline_sizes: tuple[int, ...] = (500, 1_000, 2_000)) -> dict:
    """Run overhead against the number of shards: `pseudoseg run Ingest` over n one-image shards (8×8 PNGs,
    ``ingest.shard_size=1``, ``--workers`` 2, default ``[pseudoseg] shards_per_task``), first run and no-op
    rerun, for each n in ``sizes``; repeats interleaved (all sizes, then again). Images and outputs on tmpfs
    (/dev/shm) where there is one, so the disk's fsync latency (6 fsyncs per shard commit) does not hide the
    scheduling cost. Each number: wall and CPU time (user + sys of the command and its worker processes:
    os.wait4) and peak RSS, with the load average; per size min and median, and a + b·T (+ c·T²) fits of the
    minima. ``baseline``: a git revision of this repository run the same way at ``baseline_sizes`` (one
    task per shard there), for the before/after per-shard cost."""
    import shutil
    import subprocess

    shm = Path("/dev/shm")
    base = Path(tempfile.mkdtemp(prefix="pseudoseg-sched-", dir=shm if shm.is_dir() else None))
    try:
        all_sizes = sorted(set(sizes) | (set(baseline_sizes) if baseline else set()))
        t0 = time.perf_counter()
        lists = image_lists(base / "images", all_sizes)
        make_images_s = time.perf_counter() - t0
        code_before = None
        if baseline:
            code_before = base / "baseline-code"
            code_before.mkdir()
            archive = subprocess.run(["git", "archive", baseline], cwd=REPO, capture_output=True, check=True).stdout
            subprocess.run(["tar", "-x", "-C", str(code_before)], input=archive, check=True)

        def one(n: int, rep: int, code: Path, label: str) -> list[dict]:
            out = base / f"out-{label}-{n}-{rep}"
            args = ["run", "Ingest", "--images", str(lists[n]), "--dataset", "ds", "--out", str(out),
                    "--set", "ingest.shard_size=1", "--set", "core.log_level=WARNING", "--workers", str(workers)]
            rows = []
            for phase in ("first", "rerun"):
                row = {"shards": n, "repeat": rep, "phase": phase, **timed_cli(args, code)}
                print(json.dumps(row), flush=True)
                rows.append(row)
            shutil.rmtree(out, ignore_errors=True)
            return rows

        runs, before = [], []
        for rep in range(repeats):
            for n in sizes:
                runs += one(n, rep, REPO, "now")
            if code_before is not None:
                for n in baseline_sizes:
                    before += one(n, rep, code_before, "baseline")

        from pseudoseg.tasks.engine.base import RANGES_PER_STAGE  # the default `auto`

        result: dict = {
            "storage": "tmpfs (/dev/shm)" if base.parent == shm else "disk",
            "workers": workers, "images_per_shard": 1, "shards_per_task": "auto",
            "luigi_tasks": {str(n): -(-n // -(-n // RANGES_PER_STAGE)) + 2 for n in sizes},  # ranges + plan + wrapper
            "make_images_s": round(make_images_s, 1), "repeats": repeats,
            "by_shards": _summarise_runs(runs, "shards"), "runs": runs,
        }
        result["fits_of_minima"] = {
            phase: {metric: _fit([(int(n), v[metric]["min"]) for n, v in rows.items()])
                    for metric in ("cpu_s", "wall_s")}
            for phase, rows in result["by_shards"].items()}
        if code_before is not None:
            result["baseline"] = {"revision": baseline, "by_shards": _summarise_runs(before, "shards"), "runs": before}
            result["baseline"]["fits_of_minima"] = {
                phase: {metric: _fit([(int(n), v[metric]["min"]) for n, v in rows.items()])
                        for metric in ("cpu_s", "wall_s")}
                for phase, rows in result["baseline"]["by_shards"].items()}
        return result
    finally:
        shutil.rmtree(base, ignore_errors=True)


BENCHMARK = bench_scheduling
