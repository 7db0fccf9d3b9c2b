"""Trainer input: samples/s of the training loader against raw reads of the same tar files
(bench/results/trainer_loader.json)."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from bench.fixtures import drop_page_cache, synthetic_training_caches
from bench.timing import compare


def bench_trainer_loader(n_use: int = 96, n_align: int = 256, shards: int = 4, workers: int = 2,
                         repeats: int = 5, legacy: bool = True, process_workers: bool = True,
                         device: str = "cpu") -> dict:
    """Trainer input: samples/s of the training loader (``models.training.trainer.make_loader`` over the trainers'
    own datasets, ``models.training.datasets.UseSegmentDataset`` / ``AlignmentDataset``, ``collate_use`` /
    ``collate_alignment``, the trainers' batch sizes 32 / 5: ``workers`` threads, ``ThreadBatchLoader``) against a
    raw sequential read of the same tar files (4 MiB reads, bytes discarded), USE and alignment caches at real
    sizes (``bench.fixtures.synthetic_training_caches``).

    Raw reads are timed **cold** (each file's pages dropped first with posix_fadvise DONTNEED, inside the timing:
    the disk; what a COCO-sized cache of ~900 GB sees) and **warm** (page cache: memory bandwidth). The loader is
    timed in the same two states: ``loader`` reads the page cache, ``loader_cold`` first drops the same files'
    pages the same way — ``loader_cold_over_raw_cold`` is the like-for-like ratio. One repeat of a loader = one
    epoch of one loader kept across repeats (its first epoch is the warm-up, so the per-item pooling weights and
    patch labels come from the dataset's cache, as in every epoch of a run after the first: the loader then reads
    the feature members alone, the raw read every byte of the tars, label PNGs included); ``loader_first`` is a
    run's first epoch: a new dataset and loader each repeat, nothing cached, page cache warm.
    ``loader_process_workers`` (``process_workers``): the same batch reads through DataLoader worker processes
    (persistent; batches in shared memory), the path before ``ThreadBatchLoader``. ``legacy``: the datasets (no derived cache) through the
    pre-issue-12 path (one item at a time, ``collate_*`` stacking, workers restarted every epoch) — dense mask
    pooling is not reproduced there, so legacy USE is faster than the old code was. All variants interleaved, min
    and median of ``repeats``. ``device`` "cuda" (or "auto" on a GPU host): pinned batches, each moved to the GPU
    as ``train`` does (``to_device``), synchronised."""
    import torch

    from pseudoseg.models.device import resolve_device
    from pseudoseg.models.training.datasets import AlignmentDataset, UseSegmentDataset
    from pseudoseg.models.training.trainer import (
        TrainConfig,
        collate_alignment,
        collate_use,
        make_loader,
        to_device,
    )
    from pseudoseg.pipeline.features.cache import TarStore

    torch.set_num_threads(1)
    dev = resolve_device(device)
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        t0 = time.perf_counter()
        d = synthetic_training_caches(Path(tmp), n_use=n_use, n_align=n_align, shards=shards)
        build_s = time.perf_counter() - t0
        files = {"use": d["use"], "alignment": d["align"] + d["labels"]}
        builders = {
            "use": lambda **kw: UseSegmentDataset(TarStore(d["use"]), d["segments"], d["text_index"], d["text_emb"],
                                                  seed=0, **kw),
            "alignment": lambda **kw: AlignmentDataset(TarStore(d["align"]), TarStore(d["labels"]), block=-1,
                                                       mode="majority", crop=0, repeats=1, seed=0, **kw)}
        configs = {"use": (collate_use, TrainConfig.use_paper(num_workers=workers)),
                   "alignment": (collate_alignment, TrainConfig.alignment_paper(num_workers=workers))}

        def raw(paths: list[str], cold: bool):
            def run() -> int:
                n = 0
                for p in paths:
                    fd = os.open(p, os.O_RDONLY)
                    try:
                        if cold:
                            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                        while chunk := os.read(fd, 4 << 20):
                            n += len(chunk)
                    finally:
                        os.close(fd)
                return n
            return run

        class Legacy(torch.utils.data.Dataset):  # one item at a time, per-epoch workers (before issue 12)
            def __init__(self, ds) -> None:
                self.ds = ds

            def __len__(self) -> int:
                return len(self.ds)

            def __getitem__(self, i: int):
                return self.ds[i]

            def set_epoch(self, epoch: int) -> None:
                self.ds.set_epoch(epoch)

        def one_epoch(loader, n_items: int, epoch: int) -> None:
            if hasattr(loader.sampler, "set_epoch"):
                loader.sampler.set_epoch(epoch)
            seen = 0
            for batch in loader:
                batch = to_device(batch, dev) if dev.type == "cuda" else batch
                seen += int(batch["image_index"].max()) + 1 if "image_index" in batch else len(batch["tokens"])
            assert seen == n_items, (seen, n_items)

        def epoch_of(loader, n_items: int, cold: list[str] | None = None):
            state = {"epoch": 0}

            def run() -> None:
                state["epoch"] += 1
                if cold:
                    drop_page_cache(cold)
                one_epoch(loader, n_items, state["epoch"])
            return run

        def first_epoch(name: str):
            def run() -> None:
                ds = builders[name]()
                loader, _ = make_loader(ds, configs[name][1], configs[name][0], dev)
                one_epoch(loader, len(ds), 0)
            return run

        variants, loaders, datasets = {}, [], {}
        for name, (collate, cfg) in configs.items():
            ds = datasets[name] = builders[name]()
            variants[f"{name}/raw_cold"] = raw(files[name], True)
            variants[f"{name}/raw_warm"] = raw(files[name], False)
            loader, _ = make_loader(ds, cfg, collate, dev)
            loaders.append(loader)
            variants[f"{name}/loader"] = epoch_of(loader, len(ds))
            variants[f"{name}/loader_cold"] = epoch_of(loader, len(ds), cold=files[name])
            variants[f"{name}/loader_first"] = first_epoch(name)
            if process_workers:
                procs = builders[name]()
                procs.thread_batches = False
                loader, _ = make_loader(procs, cfg, collate, dev)
                loaders.append(loader)
                variants[f"{name}/loader_process_workers"] = epoch_of(loader, len(ds))
            if legacy:
                old, _ = make_loader(Legacy(builders[name](cache_bytes=0)), cfg, collate, dev)
                variants[f"{name}/loader_legacy"] = epoch_of(old, len(ds))
        timings = compare(variants, repeats=repeats, warmup=1)
        out: dict = {"build_s": round(build_s, 1), "workers": workers, "device": str(dev),
                     "loader": type(loaders[0]).__name__, "torch_threads_per_process": 1,
                     "repeats": repeats,
                     "notes": ["X_over_Y_{median,best}: images/s of X over images/s of Y, medians / bests; "
                               "loader_cold_over_raw_cold is like for like (both drop the same files' pages "
                               "inside the timing)",
                               "main_process_cpu_s counts the loader threads (ThreadBatchLoader), not the "
                               "worker processes of loader_process_workers / loader_legacy",
                               "the machine is shared: see load_before / load_after; medians move with the "
                               "load, bests less"]}
        for name, (_, cfg) in configs.items():
            mb = sum(os.path.getsize(p) for p in files[name]) / 1e6
            n = len(datasets[name])
            row = {"images": n, "batch_size": cfg.batch_size, "tar_mb": round(mb, 1),
                   "mb_per_image": round(mb / n, 3)}
            for v in ("raw_cold", "raw_warm", "loader", "loader_cold", "loader_first", "loader_process_workers",
                      "loader_legacy"):
                t = timings.get(f"{name}/{v}")
                if t is None:
                    continue
                row[v] = {"images_per_s_median": round(n / t["wall_s"]["median"], 1),
                          "images_per_s_best": round(n / t["wall_s"]["min"], 1),
                          "mb_per_s_median": round(mb / t["wall_s"]["median"], 1),
                          "main_process_cpu_s_median": t["cpu_s"]["median"], "wall_s": t["wall_s"]}
            for v, ref in (("loader_cold", "raw_cold"), ("loader", "raw_warm"), ("loader", "raw_cold"),
                           ("loader_first", "raw_cold"), ("loader_process_workers", "raw_cold")):
                if v not in row:
                    continue
                for stat in ("median", "best"):
                    row[f"{v}_over_{ref}_{stat}"] = round(row[v][f"images_per_s_{stat}"]
                                                          / row[ref][f"images_per_s_{stat}"], 3)
            if "loader_legacy" in row:
                row["loader_over_legacy"] = round(row["loader"]["images_per_s_median"]
                                                  / row["loader_legacy"]["images_per_s_median"], 3)
            out[name] = row
        del loaders
    return out


BENCHMARK = bench_trainer_loader
