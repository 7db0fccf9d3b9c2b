"""Peak RSS of `pseudoseg run` over 10 against 100 one-image shards (bench/results/memory.json)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from bench.fixtures import photo
from bench.timing import timed_cli


def bench_memory(shard_counts: tuple[int, ...] = (10, 100), repeats: int = 3) -> dict:
    """Peak RSS (os.wait4 ru_maxrss of the command and its workers) of `pseudoseg run Ingest` and of `run
    SamEmbeddings` (tiny SAM; its ingest already done, so the process runs the model stage) over 10 vs 100
    one-image shards (32×40 PNGs), one worker, default shards_per_task; repeats interleaved, min and median, the
    load average with each run. The tiny model is built once before (not measured)."""
    import shutil

    import cv2
    import numpy as np

    base = Path(tempfile.mkdtemp(prefix="pseudoseg-mem-"))
    try:
        folder = base / "images"
        folder.mkdir()
        rng = np.random.default_rng(0)
        names = []
        for i in range(max(shard_counts)):
            cv2.imwrite(str(folder / f"img_{i:04d}.png"), photo(rng, (32, 40), kernel=5))
            names.append(f"img_{i:04d}.png")
        lists = {}
        for n in (2, *shard_counts):
            lists[n] = base / f"list-{n}.txt"
            lists[n].write_text("\n".join(f"images/{name}" for name in names[:n]) + "\n")
        common = ["--dataset", "ds", "--set", "ingest.shard_size=1", "--set", f"models.cache_dir={base / 'models'}",
                  "--set", "models.device=cpu", "--set", "core.log_level=WARNING"]
        timed_cli(["run", "SamEmbeddings", "--images", str(lists[2]), "--out", str(base / "warm"), *common])

        runs = []
        for rep in range(repeats):
            for n in shard_counts:
                out = base / f"out-{n}-{rep}"
                for stage in ("Ingest", "SamEmbeddings"):
                    row = {"stage": stage, "shards": n, "repeat": rep,
                           **timed_cli(["run", stage, "--images", str(lists[n]), "--out", str(out), *common])}
                    print(json.dumps(row), flush=True)
                    runs.append(row)
                shutil.rmtree(out, ignore_errors=True)
        import statistics

        summary: dict = {}
        for stage in ("Ingest", "SamEmbeddings"):
            entry = summary.setdefault(stage, {})
            for n in shard_counts:
                values = [r["max_rss_mb"] for r in runs if r["stage"] == stage and r["shards"] == n]
                entry[str(n)] = {"max_rss_mb_min": min(values), "max_rss_mb_median": statistics.median(values),
                                 "load_1m": [r["load_before"][0] for r in runs
                                             if r["stage"] == stage and r["shards"] == n]}
            low, high = (entry[str(n)]["max_rss_mb_median"] for n in (min(shard_counts), max(shard_counts)))
            entry["growth_median"] = round(high / low - 1, 4)
        return {"repeats": repeats, "summary": summary, "runs": runs}
    finally:
        shutil.rmtree(base, ignore_errors=True)


BENCHMARK = bench_memory
