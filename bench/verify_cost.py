"""What checking every input file against its done.json costs, per stage and for the trainers
(bench/results/verify_cost.json)."""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

from bench.fixtures import drop_page_cache, synthetic_training_caches
from bench.timing import compare

# the result file `make bench` writes, whose stage numbers ``stages=False`` keeps
PREVIOUS = Path(__file__).resolve().parent / "results" / "verify_cost.json"


def bench_verify_cost(repeats: int = 3, stages: bool = True, trainers: bool = True, n_use: int = 16,
                      n_align: int = 16) -> dict:
    """What checking every input file against its done.json costs, per stage: `make demo`'s DAG (tiny models,
    sample set) run once with ``[pseudoseg] verify = off``, each task's run time taken from Luigi's
    PROCESSING_TIME event; then, files hot in the page cache as when a stage reads them, the time to check each
    task's inputs by size and by sha256 (best of ``repeats``). Plus this machine's sha256 throughput, which
    with bytes per image gives the cost at real-model scale (see the README's numbers). ``trainers``: the
    trainers' first-epoch sha256 check at real cache sizes (``_trainer_verify_cost``). ``stages=False`` measures
    the trainers only and keeps the stage numbers of the result file already there (``stages_measured`` says
    when they were)."""
    out: dict = {}
    if trainers:
        out["trainers"] = _trainer_verify_cost(n_use=n_use, n_align=n_align, repeats=repeats)
    if stages:
        return {**_stage_verify_cost(repeats), **out}
    if PREVIOUS.exists():
        old = json.loads(PREVIOUS.read_text())
        kept = {k: v for k, v in old.get("results", {}).items() if k != "trainers"}
        if kept:
            out = {**kept, "stages_measured": {"utc": old.get("utc"), "machine": old.get("machine"),
                                               "load_before": old.get("load_before"),
                                               "load_after": old.get("load_after")}, **out}
    return out


def _trainer_verify_cost(n_use: int, n_align: int, repeats: int) -> dict:
    """The trainers' first epoch with and without its input check (``models.training.trainer.InputCheck``: sha256
    of every cache file in a thread beside the epoch), at the real cache sizes of ``bench.fixtures.synthetic_training_caches``
    (USE 5.9 MB/image, alignment 1.6 MB/image + label PNGs), CPU, the trainers' heads, batch sizes and loader.
    ``hot``: the files in the page cache; ``cold``: their pages dropped (posix_fadvise DONTNEED) before each epoch,
    inside the timing, so both the loader and the hash read the disk. Interleaved, ``repeats`` each. The later
    epochs check sizes only (``size_check_s``). ``share_of_training``: the first epoch's extra time over a whole
    run at the default epochs (USE 5, alignment 10)."""
    import hashlib

    import numpy as np
    import torch

    from pseudoseg.models.training import trainer as T
    from pseudoseg.models.training.datasets import AlignmentDataset, UseSegmentDataset
    from pseudoseg.models.training.heads import AlignmentBlock, USEHead
    from pseudoseg.models.training.params import TrainAlignmentParams, TrainUseParams
    from pseudoseg.pipeline.features.cache import TarStore

    torch.set_num_threads(1)

    def sha256_all(paths: list[str]) -> dict[str, str]:
        for path in paths:
            h = hashlib.sha256()
            with open(path, "rb") as fh:
                while block := fh.read(1 << 20):
                    h.update(block)
        return {}

    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        d = synthetic_training_caches(Path(tmp), n_use=n_use, n_align=n_align, shards=2)
        protos = np.random.default_rng(0).standard_normal((171, 768)).astype(np.float32)
        kinds = {
            "use": (d["use"], lambda: UseSegmentDataset(TarStore(d["use"]), d["segments"], d["text_index"],
                                                        d["text_emb"], seed=0),
                    lambda: USEHead(clip_dim=1024, clip_blocks=3, dino_dim=1024, dino_blocks=2, embed_dim=768),
                    T.use_step(TrainUseParams()), T.collate_use,
                    T.TrainConfig.use_paper(epochs=1, num_workers=2), TrainUseParams().epochs),
            "alignment": (d["align"] + d["labels"],
                          lambda: AlignmentDataset(TarStore(d["align"]), TarStore(d["labels"]), block=-1,
                                                   mode="majority", crop=0, repeats=1, seed=0),
                          lambda: AlignmentBlock(1024, 768), T.alignment_step(protos, TrainAlignmentParams()),
                          T.collate_alignment, T.TrainConfig.alignment_paper(epochs=1, num_workers=2),
                          TrainAlignmentParams().epochs)}
        runs = {"n": 0}

        def epoch(kind: str, verified: bool, cold: bool):
            files, dataset, head, step, collate, config, _ = kinds[kind]

            def run() -> None:
                runs["n"] += 1
                if cold:
                    drop_page_cache(files)
                check = T.InputCheck(full=lambda: sha256_all(files), quick=dict) if verified else None
                torch.manual_seed(0)
                T.train(head(), step, dataset(), config, Path(tmp) / f"run-{runs['n']}", resume=False,
                      collate_fn=collate, input_check=check)
            return run

        variants = {f"{kind}/{'verified' if v else 'plain'}_{'cold' if c else 'hot'}": epoch(kind, v, c)
                    for kind in kinds for c in (False, True) for v in (False, True)}
        variants.update({f"{kind}/sha256_alone_hot": (lambda files=kinds[kind][0]: sha256_all(files))
                         for kind in kinds})
        timings = compare(variants, repeats=repeats, warmup=1)
        result: dict = {"images": {"use": n_use, "alignment": n_align}, "repeats": repeats, "torch_threads": 1,
                        "loader_threads": 2}
        for kind, (files, *_, epochs) in kinds.items():
            t0 = time.perf_counter()
            for path in files:
                os.stat(path)
            row = {"cache_mb": round(sum(os.path.getsize(f) for f in files) / 1e6, 1),
                   "sha256_alone_hot_s": timings[f"{kind}/sha256_alone_hot"]["wall_s"]["median"],
                   "size_check_s": round(time.perf_counter() - t0, 6), "default_epochs": epochs}
            for state in ("hot", "cold"):
                plain = timings[f"{kind}/plain_{state}"]["wall_s"]
                verified = timings[f"{kind}/verified_{state}"]["wall_s"]
                extra = verified["median"] - plain["median"]
                row[state] = {"first_epoch_s_median": plain["median"], "first_epoch_s_best": plain["min"],
                              "verified_first_epoch_s_median": verified["median"],
                              "verified_first_epoch_s_best": verified["min"],
                              "extra_s_median": round(extra, 3),
                              "first_epoch_overhead_median": round(extra / plain["median"], 4),
                              "first_epoch_overhead_best": round((verified["min"] - plain["min"]) / plain["min"], 4),
                              "share_of_training_median": round(extra / (plain["median"] * epochs), 4)}
            result[kind] = row
    return result


def _stage_verify_cost(repeats: int) -> dict:
    """The per-stage part of ``bench_verify_cost``."""
    import hashlib
    import statistics

    import luigi

    from pseudoseg.pipeline.core.artifacts import record_problems
    from pseudoseg.tasks.engine.base import CommittedTask
    from pseudoseg.tasks.report import cli
    from pseudoseg.tasks.report.summary import walk_dag
    from pseudoseg.tasks.stages.dag import FullDAG
    from pseudoseg.tasks.stages.train import TrainTask

    block = os.urandom(256 << 20)
    sha_mb_s = []
    for _ in range(5):
        t0 = time.perf_counter()
        hashlib.sha256(block).hexdigest()
        sha_mb_s.append(256 * 1.048576 / (time.perf_counter() - t0))
    del block

    run_s: dict[str, float] = {}

    @luigi.Task.event_handler(luigi.Event.PROCESSING_TIME)
    def record(task, seconds):  # noqa: ANN001
        run_s[task.task_id] = seconds

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        code = cli.main(["demo", "--out", tmp, "--set", "pseudoseg.verify=off"])
        demo_s = time.perf_counter() - t0
        assert code == 0, "demo failed"
        dag = FullDAG(images=str(Path(tmp) / "demo" / "samples" / "images"), dataset="demo",
                      out=str(Path(tmp).resolve()))
        stages: dict[str, dict] = {}
        for task in walk_dag([dag]):
            if isinstance(task, CommittedTask):
                inputs, name = task.inputs_to_verify(), task.stage_dir.stage
            elif isinstance(task, TrainTask):
                inputs = [t for g in task.requires().values() for t in (g if isinstance(g, list) else [g])
                          if isinstance(t, CommittedTask)]
                name = task.stage
            else:
                continue
            if task.task_id not in run_s or not inputs:
                continue
            row = stages.setdefault(name, {"tasks": 0, "input_mb": 0.0, "run_s": 0.0, "size_s": 0.0,
                                           "sha256_s": 0.0})
            row["tasks"] += 1
            row["run_s"] += run_s[task.task_id]
            row["input_mb"] += sum((u.stage_dir.path / f).stat().st_size
                                   for u in inputs for f in _record_files(u)) / 1e6
            for mode in ("size", "sha256"):
                times = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    for u in inputs:
                        assert not record_problems(u.stage_dir, u.unit, mode)
                    times.append(time.perf_counter() - t0)
                row[f"{mode}_s"] += min(times)
        units = [t for t in walk_dag([dag]) if isinstance(t, CommittedTask)]
        t0 = time.perf_counter()
        for _ in range(repeats):
            assert all(t.complete() for t in units)
        complete_ms = (time.perf_counter() - t0) / repeats / len(units) * 1e3
        t0 = time.perf_counter()
        for _ in range(repeats):
            assert all(os.path.exists(t.output().path) for t in units)
        exists_ms = (time.perf_counter() - t0) / repeats / len(units) * 1e3
        for row in stages.values():
            row["sha256_share"] = round(row["sha256_s"] / row["run_s"], 4) if row["run_s"] else None
            row["size_share"] = round(row["size_s"] / row["run_s"], 5) if row["run_s"] else None
            # hashing alone (sha256 minus the size check, whose cost is reading records + computing folders)
            row["hash_share"] = round(max(0.0, row["sha256_s"] - row["size_s"]) / row["run_s"], 5) if row["run_s"] else None
            for key in ("input_mb", "run_s", "size_s", "sha256_s"):
                row[key] = round(row[key], 4)
    return {"sha256_mb_per_s": [round(x) for x in sha_mb_s], "sha256_mb_per_s_median": round(statistics.median(sha_mb_s)),
            "demo_s": round(demo_s, 1), "repeats": repeats, "load_avg_1m_at_end": os.getloadavg()[0],
            "complete_ms_per_unit": round(complete_ms, 3), "output_exists_ms_per_unit": round(exists_ms, 3),
            "stages": dict(sorted(stages.items()))}


def _record_files(unit) -> list[str]:  # noqa: ANN001
    from pseudoseg.pipeline.core.artifacts import read_record

    return [f["name"] for f in read_record(unit.stage_dir, unit.unit)["files"]]


BENCHMARK = bench_verify_cost
