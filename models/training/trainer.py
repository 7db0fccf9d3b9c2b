"""Seeded, resumable training loops for the trainable heads (USE head, FMbSeg alignment block).

`train(model, loss_fn_step, dataset, config, out_dir)` owns everything a run writes to `out_dir`:

    out_dir/checkpoints/epoch-0003.pt   model + optimizer + scheduler + RNG states + epoch + config + metadata
                                        (torch.save to a temporary name, then os.replace: a kill leaves no torn file)
    out_dir/metrics.jsonl               one line per optimiser step: {"epoch", "step", "loss", "lr", ...extra}
    out_dir/loss.png                    the loss curve (matplotlib Agg, object API: no global backend switch)
    out_dir/model.pt                    final weights + head config + metadata, written last when the last epoch
                                        ends (the run's completion marker)

Reproducibility: the caller seeds and builds the model; `train` seeds python `random`, numpy and torch from
`config.seed`, reseeds the DataLoader generator per epoch from (seed, epoch) (so epoch e's shuffle and worker
seeds do not depend on what ran before), seeds each worker's numpy/random from torch's per-worker seed, and
restores the global RNG states from the checkpoint. On CPU an interrupted run resumed from its last checkpoint
gives bit-identical weights to an uninterrupted one (tested, SIGKILL included). On CUDA with bf16 autocast the
same code runs; results are close but not bit-exact (non-deterministic kernels).

A checkpoint belongs to one run: resuming with a different config (except num_workers, device,
keep_checkpoints) or different metadata raises `CheckpointMismatchError`. `epochs` is the schedule horizon, so
"run 1 epoch now, the rest later" is `stop_after_epochs=1` with the full `epochs`, never a smaller `epochs`.

Data: any map-style or `IterableDataset` whose samples `collate_fn` turns into a batch; `loss_fn_step(model,
batch) -> loss` or `(loss, {name: float})` runs under `models.adapters._hf.autocast`. For an IterableDataset without
`__len__` set `config.steps_per_epoch` (the epoch is cut there); a dataset with `set_epoch(epoch)` is told the
epoch before each pass (WebDataset-style reshuffling). A dataset with `epoch_indexed = True` (the trainers' own:
every random choice from (seed, epoch, index)) is asked for `(epoch, index)` pairs by an `EpochSampler` (same
order as the shuffled DataLoader) and gets persistent workers: started once per `train` call, prefetching
`PREFETCH_FACTOR` batches each, never seeing a stale epoch; its `__getitems__` may return a `Collated` batch it
built in place (read straight into one tensor, in shared memory inside a worker), which the collate functions
pass through. One that also sets `thread_batches = True` (the trainers' cache datasets, whose reads release the
GIL) gets `num_workers` threads of the training process instead of worker processes (`ThreadBatchLoader`: the
same batches, none through shared memory). `use_step` / `collate_use` and `alignment_step` /
`collate_alignment` are the two heads' step functions and sample formats.
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import logging
import math
import os
import random
import re
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, default_collate, get_worker_info

from pseudoseg.models.adapters.weights import CheckpointError, load_state_strict, load_weights
from pseudoseg.models.device import autocast, resolve_device
from pseudoseg.models.training.losses import segment_text_loss, segment_text_loss_dedup, tsupcon_loss
from pseudoseg.models.training.params import TrainAlignmentParams, TrainUseParams

__all__ = [
    "TrainConfig", "TrainResult", "CheckpointMismatchError", "InputCheck", "InputChangedError", "train",
    "seed_everything", "latest_checkpoint",
    "load_trained", "use_step", "collate_use", "alignment_step", "collate_alignment", "Collated", "EpochSampler",
    "BatchBuffers", "empty_batch", "epoch_index", "ThreadBatchLoader",
]

log = logging.getLogger(__name__)
CHECKPOINT_FORMAT = 1
_CKPT = re.compile(r"^epoch-(\d{4,})\.pt$")
# Batches each DataLoader worker keeps ready (torch's default is 2): covers a slow item or two without stalling.
PREFETCH_FACTOR = 4
# Fields that may change between a run and its resumption without changing the numbers on CPU.
_RESUMABLE_FIELDS = frozenset({"num_workers", "device", "keep_checkpoints"})


# ------------------------------------------------------------------------------------------------ config
@dataclass(frozen=True)
class TrainConfig:
    """Optimiser, schedule and loader settings of one training run.

    optimizer "adamw" | "sgd" (momentum, nesterov off); scheduler, stepped once per optimiser step over
    epochs × steps_per_epoch steps: "poly" lr·(1 − t/T)^poly_power, "cosine" min_lr + (lr − min_lr)·½(1 + cos πt/T),
    "constant". grad_clip: max global grad norm (None = off). steps_per_epoch: required for IterableDatasets
    without __len__; otherwise taken from the loader (and, if set, caps it).
    """

    lr: float
    weight_decay: float
    epochs: int
    batch_size: int
    optimizer: str = "adamw"
    scheduler: str = "poly"
    poly_power: float = 0.9
    momentum: float = 0.9
    min_lr: float = 0.0
    grad_clip: float | None = None
    num_workers: int = 0
    seed: int = 0
    device: str = "auto"
    shuffle: bool = True
    drop_last: bool = False
    steps_per_epoch: int | None = None
    keep_checkpoints: int = 2

    def __post_init__(self) -> None:
        if self.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {self.optimizer!r}")
        if self.scheduler not in ("poly", "cosine", "constant"):
            raise ValueError(f"scheduler must be 'poly', 'cosine' or 'constant', got {self.scheduler!r}")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError(f"epochs, batch_size and lr must be positive: {self}")

    @classmethod
    def use_paper(cls, params: TrainUseParams | None = None, **overrides: Any) -> TrainConfig:
        """use-paper §4.2: AdamW + polynomial decay with the optimiser and schedule of ``params`` (defaults: lr 1e-3,
        weight decay 0.01, power 0.9, 5 epochs, batch 32; ``models.training.params.TrainUseParams``)."""
        return cls(**{**(params or TrainUseParams()).optimisation(), **overrides})

    @classmethod
    def alignment_paper(cls, params: TrainAlignmentParams | None = None, **overrides: Any) -> TrainConfig:
        """fmbseg-paper §4.1: SGD + cosine annealing with the optimiser and schedule of ``params`` (defaults: batch
        5 images, 10 epochs; the paper's lr / momentum / weight decay are in an appendix we do not have: lr 0.01,
        momentum 0.9, weight decay 1e-4, annealed to 0, the usual SGD settings for a small head;
        ``models.training.params.TrainAlignmentParams``)."""
        return cls(**{**(params or TrainAlignmentParams()).optimisation(), **overrides})


@dataclass
class TrainResult:
    out_dir: Path
    model_path: Path | None  # out_dir/model.pt once the last epoch is done, else None (stopped early)
    checkpoint_path: Path | None  # the latest checkpoint
    metrics_path: Path
    plot_path: Path | None
    start_epoch: int  # first epoch this call ran (0-based)
    epochs_completed: int  # epochs done in total, this call and earlier ones
    epochs_run: int  # epochs this call ran
    steps_run: int
    resumed: bool
    last_epoch_loss: float | None  # mean loss of the last epoch this call ran
    seconds: float
    history: list[dict] = field(default_factory=list)  # per-epoch {"epoch", "loss", "lr", "steps"} of this call


class CheckpointMismatchError(ValueError):
    """out_dir holds checkpoints of a different run (config or metadata differ)."""


@dataclass(frozen=True)
class InputCheck:
    """How `train` checks the files its dataset reads: ``full()`` on the first epoch each call runs — sha256 of
    every file, in one background thread beside that epoch's batches, so its reads overlap the training's (and warm
    the page cache for them) — and ``quick()`` after every later epoch (sizes). Each returns {what: problem}, empty
    when the files are as recorded. A problem stops the run before the epoch's checkpoint is written
    (`InputChangedError`): no checkpoint ever follows an epoch trained on unverified data."""

    full: Callable[[], dict[str, str]]
    quick: Callable[[], dict[str, str]]


class Background:
    """``fn()`` in a daemon thread: ``done()``, and ``result()`` (waits; re-raises what ``fn`` raised). A run that
    stops early does not wait for it."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self._value: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn,), name="verify-inputs", daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            self._value = fn()
        except BaseException as e:  # noqa: BLE001 — handed to result()
            self._error = e

    def done(self) -> bool:
        return not self._thread.is_alive()

    def result(self) -> Any:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value


class InputChangedError(RuntimeError):
    """The training input failed its check (`InputCheck`); ``problems``: {what: problem}."""

    def __init__(self, problems: Mapping[str, str], *, epoch: int, how: str) -> None:
        self.problems = dict(problems)
        listed = "; ".join(f"{k}: {v}" for k, v in sorted(self.problems.items()))
        super().__init__(f"training input failed its {how} check in epoch {epoch}, before that epoch's "
                         f"checkpoint: {listed}")


# ------------------------------------------------------------------------------------------------ seeding
def seed_everything(seed: int) -> None:
    """Seed python `random`, numpy's global RNG and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _seed_worker(worker_id: int) -> None:
    # torch seeds each worker with base_seed + worker_id; base_seed comes from the loader's generator.
    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919 + 12_345) % 2**63


def _rng_state() -> dict:
    np_state = np.random.get_state(legacy=False)
    return {
        "python": random.getstate(),
        "numpy": {"bit_generator": np_state["bit_generator"], "key": np_state["state"]["key"].tolist(),
                  "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                  "gauss": float(np_state["gauss"])},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state({"bit_generator": n["bit_generator"],
                         "state": {"key": np.asarray(n["key"], dtype=np.uint32), "pos": n["pos"]},
                         "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------------------ pieces
def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int):
    total = max(1, total_steps)
    floor = config.min_lr / config.lr

    def factor(step: int) -> float:
        t = min(step, total) / total
        if config.scheduler == "poly":
            return (1.0 - t) ** config.poly_power
        if config.scheduler == "cosine":
            return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * t))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor of a (nested) batch to `device`; float16/bfloat16 features become float32 there."""
    if isinstance(batch, torch.Tensor):
        t = batch.to(device, non_blocking=True)
        return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


class Collated(dict):
    """A batch that a dataset's ``__getitems__`` assembled itself (e.g. reading each sample's arrays straight into
    one batch tensor): ``collate_use`` / ``collate_alignment`` hand it on unchanged."""


def empty_batch(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor for a batch a dataset fills in place. Inside a DataLoader worker it is allocated in
    shared memory, as ``default_collate`` does, so sending it to the main process copies nothing."""
    shape = tuple(int(v) for v in shape)
    if get_worker_info() is None:  # numpy's allocator asks for transparent huge pages on large arrays (torch's does
        # not): a fresh batch buffer then costs a few page faults instead of one per 4 KiB
        return torch.from_numpy(np.empty(shape, torch.empty(0, dtype=dtype).numpy().dtype))
    numel = math.prod(shape)
    storage = torch.empty(0, dtype=dtype)._typed_storage()._new_shared(numel, device="cpu")
    return torch.empty(0, dtype=dtype).new(storage).resize_(shape)


class BatchBuffers:
    """The batch buffers of one dataset (``empty``: what ``empty_batch`` gives), each handed out again once nothing
    refers to it: no tensor made from it, nor any view of one, is alive — Python's reference count says so exactly
    (a tensor from ``torch.from_numpy`` holds a reference to its array until its storage is freed). A reused
    buffer skips what fresh memory costs (a page fault per page, zeroing, and huge-page compaction when memory is
    fragmented: ~190 MB per USE batch). Buffers are kept up to ``max_bytes``; beyond, batches get fresh memory.
    Thread-safe. Inside a DataLoader worker process every batch is fresh shared memory (``empty_batch``)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes, self.nbytes = int(max_bytes), 0
        self._arrays: dict[tuple[tuple[int, ...], np.dtype], list[np.ndarray]] = {}
        self._lock = threading.Lock()

    def empty(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        if get_worker_info() is not None:
            return empty_batch(shape, dtype)
        key = (tuple(int(v) for v in shape), torch.empty(0, dtype=dtype).numpy().dtype)
        with self._lock:  # a free buffer becomes a tensor before another thread can see it free
            arrays = self._arrays.setdefault(key, [])
            for array in arrays:
                if sys.getrefcount(array) <= 3:  # the list, this loop's name, getrefcount's argument: no tensor
                    return torch.from_numpy(array)
            array = np.empty(*key)  # large arrays get transparent huge pages from numpy's allocator
            if self.nbytes + array.nbytes <= self.max_bytes:
                arrays.append(array)
                self.nbytes += array.nbytes
            return torch.from_numpy(array)

    def __getstate__(self) -> dict[str, Any]:  # a DataLoader worker process starts with none
        return {"max_bytes": self.max_bytes}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["max_bytes"])


def epoch_index(index: Any, epoch: int) -> tuple[int, int]:
    """(epoch, index) of an item request: ``EpochSampler`` sends pairs, a plain loader ints (then ``epoch`` is
    the dataset's own, from ``set_epoch``)."""
    if isinstance(index, (tuple, list)):
        return int(index[0]), int(index[1])
    return int(epoch), int(index)


class EpochSampler(Sampler):
    """The item order of one epoch as ``(epoch, index)`` pairs, for datasets whose items depend on the epoch
    (``epoch_indexed = True``: their random choices come from (seed, epoch, index) alone, e.g.
    ``pipeline.features.cache.sample_rng``). The epoch travels with each index, so persistent DataLoader workers
    and batches prefetched across an epoch boundary can never use a stale ``set_epoch``.

    The order is the one ``DataLoader(shuffle=True, generator=g)`` gives after ``g.manual_seed(_epoch_seed(seed,
    epoch))`` (its worker-seed draw first, then ``randperm``): runs are unchanged by the switch and an epoch's
    order never depends on what ran before it."""

    def __init__(self, n: int, seed: int, shuffle: bool = True) -> None:
        self.n, self.seed, self.shuffle, self.epoch = int(n), int(seed), bool(shuffle), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        epoch = self.epoch
        if not self.shuffle:
            return iter([(epoch, i) for i in range(self.n)])
        g = torch.Generator()
        g.manual_seed(_epoch_seed(self.seed, epoch))
        torch.empty((), dtype=torch.int64).random_(generator=g)  # DataLoader's base-seed draw precedes the order
        return iter([(epoch, i) for i in torch.randperm(self.n, generator=g).tolist()])


def _pin(batch: Any) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.pin_memory()
    if isinstance(batch, Mapping):
        return {k: _pin(v) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_pin(v) for v in batch)
    return batch


class ThreadBatchLoader:
    """The DataLoader of a dataset with ``thread_batches = True`` (epoch-indexed, with a ``__getitems__`` that
    reads a batch straight into its tensors and releases the GIL for the reads): ``workers`` threads of this
    process assemble the batches of an ``EpochSampler`` order, ``prefetch`` batches each ahead, delivered in
    order — the batches a ``DataLoader`` of the same sampler, batch size, ``drop_last`` and ``collate_fn``
    gives (``dataset.__getitems__(indices)`` then ``collate_fn``), without worker processes: no batch goes
    through shared memory, whose fresh pages (4 KiB each, no huge pages) cost more than the reads themselves.
    Pinned (``pin_memory``) by the thread that built it. The threads persist from epoch to epoch (``close``)."""

    def __init__(self, dataset: Dataset, sampler: EpochSampler, *, batch_size: int, drop_last: bool,
                 collate_fn: Callable, workers: int, prefetch: int, pin_memory: bool) -> None:
        if workers < 1 or batch_size < 1:
            raise ValueError(f"ThreadBatchLoader needs workers >= 1 and batch_size >= 1, got {workers}, {batch_size}")
        self.dataset, self.sampler, self.batch_size, self.drop_last = dataset, sampler, batch_size, drop_last
        self.collate_fn, self.workers, self.prefetch, self.pin_memory = collate_fn, workers, prefetch, pin_memory
        self._pool: ThreadPoolExecutor | None = None  # persistent: started on the first epoch, kept for the next
        self._hints: ThreadPoolExecutor | None = None  # one thread: read-ahead hints, in batch order

    def close(self) -> None:
        """Stop the threads (restarted by the next epoch)."""
        for pool in (self._pool, self._hints):
            if pool is not None:
                pool.shutdown(wait=True)
        self._pool = self._hints = None

    def __del__(self) -> None:
        for pool in (getattr(self, "_pool", None), getattr(self, "_hints", None)):
            if pool is not None:
                pool.shutdown(wait=False)

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _batch(self, indices: list) -> Any:
        batch = self.collate_fn(self.dataset.__getitems__(indices))
        return _pin(batch) if self.pin_memory else batch

    def __iter__(self):
        order = list(self.sampler)
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        pending: collections.deque = collections.deque()
        window = self.workers * self.prefetch  # batches queued at once
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="batches")
        pool = self._pool
        # Read-ahead (datasets with ``will_need``): one thread tells the kernel, in batch order, what the next
        # ``window`` batches after the queued ones will read, so the disk works on them while the threads read
        # these (a hint blocks its caller ~0.3 ms per MB-sized member: kept off the training loop's thread).
        advise = getattr(self.dataset, "will_need", None)
        if advise is not None and self._hints is None:
            self._hints = ThreadPoolExecutor(1, thread_name_prefix="read-ahead")
        hints: list[concurrent.futures.Future] = []

        def queue(i: int) -> None:
            while advise is not None and len(hints) < min(i + 1 + window, len(batches)):
                hints.append(self._hints.submit(advise, batches[len(hints)]))
            pending.append(pool.submit(self._batch, batches[i]))

        try:
            queued = min(window, len(batches))
            for i in range(queued):
                queue(i)
            while pending:
                batch = pending.popleft().result()
                if queued < len(batches):
                    queue(queued)
                    queued += 1
                yield batch
        finally:  # an epoch cut short (steps_per_epoch, an exception): drop what was queued, wait for the rest
            for f in pending:
                f.cancel()
            concurrent.futures.wait([*pending, *hints])  # hints take ~ms: let them finish
            for f in hints:  # a hint that failed (e.g. a shard removed) is the batch read's to report
                if f.exception() is not None:
                    log.debug("read-ahead hint failed: %s", f.exception())


def make_loader(dataset: Dataset | IterableDataset, config: TrainConfig, collate_fn: Callable | None,
                device: torch.device) -> tuple[DataLoader | ThreadBatchLoader, torch.Generator]:
    """The training DataLoader. Pinned memory on CUDA; ``PREFETCH_FACTOR`` batches per worker. A dataset with
    ``epoch_indexed = True`` gets an ``EpochSampler`` and persistent workers (started once per ``train`` call,
    not once per epoch); any other keeps per-epoch workers (it may draw from the worker's global RNG, which
    ``_seed_worker`` reseeds per epoch). An epoch-indexed dataset with ``thread_batches = True`` and
    ``num_workers > 0`` gets a ``ThreadBatchLoader`` (``num_workers`` threads) instead: the same batches."""
    generator = torch.Generator()
    iterable = isinstance(dataset, IterableDataset)
    workers = config.num_workers
    epoch_indexed = bool(getattr(dataset, "epoch_indexed", False)) and not iterable
    sampler = EpochSampler(len(dataset), config.seed, config.shuffle) if epoch_indexed else None
    if epoch_indexed and workers > 0 and getattr(dataset, "thread_batches", False):
        return ThreadBatchLoader(dataset, sampler, batch_size=config.batch_size, drop_last=config.drop_last,
                                 collate_fn=collate_fn or default_collate, workers=workers,
                                 prefetch=PREFETCH_FACTOR, pin_memory=device.type == "cuda"), generator
    loader = DataLoader(
        dataset, batch_size=config.batch_size, shuffle=None if epoch_indexed else config.shuffle and not iterable,
        sampler=sampler, num_workers=workers, collate_fn=collate_fn or default_collate,
        worker_init_fn=_seed_worker, generator=generator, drop_last=config.drop_last,
        pin_memory=device.type == "cuda", persistent_workers=epoch_indexed and workers > 0,
        prefetch_factor=PREFETCH_FACTOR if workers > 0 else None,
    )
    return loader, generator


def _steps_per_epoch(loader: DataLoader, config: TrainConfig) -> int:
    try:
        n = len(loader)
    except TypeError:
        n = None
    if n is None and config.steps_per_epoch is None:
        raise ValueError("the dataset has no __len__: set TrainConfig.steps_per_epoch (batches per epoch)")
    if config.steps_per_epoch is not None:
        n = config.steps_per_epoch if n is None else min(n, config.steps_per_epoch)
    if n < 1:
        raise ValueError(f"an epoch would have {n} steps (dataset smaller than a batch with drop_last?)")
    return n


def _atomic_write(path: Path, write: Callable[[Any], None]) -> None:
    """``write(file)`` into a hidden temporary sibling, fsync, rename: a kill never leaves a torn file."""
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_torch_save(obj: Any, path: Path) -> None:
    _atomic_write(path, lambda f: torch.save(obj, f))


def _checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := _CKPT.match(p.name))]
    return sorted(found)


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest complete checkpoint in out_dir/checkpoints, or None."""
    found = _checkpoints(Path(out_dir) / "checkpoints")
    return found[-1][1] if found else None


def _read_metrics(path: Path) -> list[dict]:
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line torn by a kill mid-write
                continue
    return rows


def _rewrite_metrics(path: Path, rows: Sequence[dict]) -> None:
    _atomic_write(path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in rows).encode()))


def _plot(metrics: Path, out: Path) -> Path | None:
    rows = [r for r in _read_metrics(metrics) if "loss" in r]
    if not rows:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    steps = [r["step"] for r in rows]
    ax.plot(steps, [r["loss"] for r in rows], lw=0.8, alpha=0.6, label="step loss")
    by_epoch: dict[int, list[dict]] = {}
    for r in rows:
        by_epoch.setdefault(r["epoch"], []).append(r)
    ax.plot([rs[-1]["step"] for rs in by_epoch.values()],
            [float(np.mean([r["loss"] for r in rs])) for rs in by_epoch.values()], "o-", label="epoch mean")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    _atomic_write(out, lambda f: fig.savefig(f, format="png"))
    return out


def _config_diff(saved: dict, config: TrainConfig) -> dict[str, tuple[Any, Any]]:
    now = asdict(config)
    return {k: (saved.get(k), now[k]) for k in now if k not in _RESUMABLE_FIELDS and saved.get(k) != now[k]}


# ------------------------------------------------------------------------------------------------ train
@dataclass
class _Run:
    """One call of ``train``: what its steps share (the model, optimiser, schedule, loader and where it writes)."""

    model: nn.Module
    loss_fn_step: Callable[[nn.Module, Any], torch.Tensor | tuple[torch.Tensor, dict]]
    dataset: Dataset | IterableDataset
    config: TrainConfig
    out: Path
    metadata: dict
    device: torch.device
    loader: DataLoader
    generator: torch.Generator
    steps_per_epoch: int
    optimizer: torch.optim.Optimizer
    scheduler: Any
    global_step: int = 0
    steps_run: int = 0

    @property
    def ckpt_dir(self) -> Path:
        return self.out / "checkpoints"

    @property
    def metrics_path(self) -> Path:
        return self.out / "metrics.jsonl"

    @property
    def plot_path(self) -> Path:
        return self.out / "loss.png"

    @property
    def model_path(self) -> Path:
        return self.out / "model.pt"


def train(
    model: nn.Module,
    loss_fn_step: Callable[[nn.Module, Any], torch.Tensor | tuple[torch.Tensor, dict]],
    dataset: Dataset | IterableDataset,
    config: TrainConfig,
    out_dir: str | Path,
    *,
    resume: bool = True,
    metadata: dict | None = None,
    collate_fn: Callable[[list], Any] | None = None,
    stop_after_epochs: int | None = None,
    input_check: InputCheck | None = None,
) -> TrainResult:
    """Train `model` in place for `config.epochs` epochs (see the module docstring for what lands in out_dir).

    metadata: JSON-serialisable facts the weights depend on (feature-cache hash, vocabulary, backbone ids, head
    config); stored in every checkpoint and in model.pt, and checked on resume. resume=False starts over and
    deletes the earlier checkpoints and metrics of out_dir. stop_after_epochs: run at most this many epochs in
    this call (the rest on a later call) — the schedule still spans config.epochs. input_check: see `InputCheck`
    (sha256 on this call's first epoch, sizes after each later one; `InputChangedError` before a checkpoint).
    Returns a `TrainResult`; raises FloatingPointError on a non-finite loss (nothing of that step is written).
    """
    t_start = time.perf_counter()
    metadata = json.loads(json.dumps(metadata or {}))  # must be JSON: it is compared and stored as such
    run = _start_run(model, loss_fn_step, dataset, config, Path(out_dir), metadata, collate_fn)
    start_epoch, resumed = _resume_or_start_over(run, resume)
    last_epoch = config.epochs if stop_after_epochs is None else min(config.epochs, start_epoch + stop_after_epochs)
    history: list[dict] = []
    last_plot, plot_every_s = time.perf_counter(), 60.0
    for epoch in range(start_epoch, last_epoch):
        first = input_check is not None and epoch == start_epoch
        losses = _run_epoch(run, epoch, Background(input_check.full) if first else None, input_check)
        _save_checkpoint(run, epoch)
        history.append({"epoch": epoch, "loss": float(np.mean(losses)), "lr": run.optimizer.param_groups[0]["lr"],
                        "steps": len(losses)})
        if time.perf_counter() - last_plot > plot_every_s:  # the plot costs ~1 s; always redrawn at the end
            _plot(run.metrics_path, run.plot_path)
            last_plot = time.perf_counter()
        log.info("epoch %d/%d: loss %.4f (%d steps)", epoch + 1, config.epochs, history[-1]["loss"], len(losses))
    return _finish_run(run, history, start_epoch, resumed, t_start)


def _start_run(model: nn.Module, loss_fn_step: Callable, dataset: Dataset | IterableDataset, config: TrainConfig,
               out: Path, metadata: dict, collate_fn: Callable[[list], Any] | None) -> _Run:
    """The folders (leftover temporaries removed), seeds, device, loader, optimiser and schedule of one call."""
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    for stale in list((out / "checkpoints").glob(".tmp-*")) + list(out.glob(".tmp-*")):
        stale.unlink(missing_ok=True)
    seed_everything(config.seed)
    device = resolve_device(config.device)
    model.to(device)
    loader, generator = make_loader(dataset, config, collate_fn, device)
    steps_per_epoch = _steps_per_epoch(loader, config)
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config, steps_per_epoch * config.epochs)
    return _Run(model, loss_fn_step, dataset, config, out, metadata, device, loader, generator, steps_per_epoch,
                optimizer, scheduler)


def _resume_or_start_over(run: _Run, resume: bool) -> tuple[int, bool]:
    """(first epoch to run, resumed): the latest checkpoint restored when ``resume``; else everything earlier of
    out_dir removed."""
    ckpt = latest_checkpoint(run.out) if resume else None
    if not resume:
        for _, p in _checkpoints(run.ckpt_dir):
            p.unlink()
        for p in (run.metrics_path, run.plot_path, run.model_path):
            p.unlink(missing_ok=True)
    if ckpt is None:
        run.metrics_path.unlink(missing_ok=True)
        return 0, False
    state = _checkpoint_of_this_run(run, ckpt)
    load_state_strict(run.model, state["model"], path=ckpt, what="trainer")
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"])
    run.global_step = state["global_step"]
    # drop metric lines of the epoch the interruption cut short
    _rewrite_metrics(run.metrics_path, [r for r in _read_metrics(run.metrics_path)
                                        if r.get("epoch", 1e18) <= state["epoch"]])
    log.info("resumed from %s (epoch %d done)", ckpt, state["epoch"])
    return state["epoch"] + 1, True


def _checkpoint_of_this_run(run: _Run, ckpt: Path) -> dict:
    """The checkpoint's state, checked to belong to this run (config, metadata, steps per epoch)."""
    state = load_weights(ckpt, what="trainer")
    if not isinstance(state, dict) or not {"config", "metadata", "steps_per_epoch", "model"} <= set(state):
        raise CheckpointError(f"trainer checkpoint {ckpt} is not a checkpoint of this trainer (keys "
                              f"{sorted(state)[:8] if isinstance(state, dict) else type(state).__name__})")
    diff = _config_diff(state["config"], run.config)
    if diff or state["metadata"] != run.metadata or state["steps_per_epoch"] != run.steps_per_epoch:
        raise CheckpointMismatchError(
            f"{ckpt} belongs to a different run: config differences {diff}, metadata "
            f"{'equal' if state['metadata'] == run.metadata else 'differs'}, steps/epoch {state['steps_per_epoch']} "
            f"vs {run.steps_per_epoch}. Use another out_dir, or resume=False to start over "
            "(to split one run over several calls keep `epochs` and pass stop_after_epochs)."
        )
    return state


def _run_epoch(run: _Run, epoch: int, full: Background | None, input_check: InputCheck | None) -> list[float]:
    """One epoch's steps (each loss a line of metrics.jsonl), then the input check that must pass before its
    checkpoint: ``full`` (sha256, running beside this call's first epoch) or the quick size check."""
    run.generator.manual_seed(_epoch_seed(run.config.seed, epoch))
    if isinstance(run.loader.sampler, EpochSampler):
        run.loader.sampler.set_epoch(epoch)
    if hasattr(run.dataset, "set_epoch"):
        run.dataset.set_epoch(epoch)
    run.model.train()
    losses: list[float] = []
    with open(run.metrics_path, "a") as mf:
        for i, batch in enumerate(run.loader):
            if i >= run.steps_per_epoch:
                break
            if full is not None and full.done() and full.result():  # stop at once, not at the epoch's end
                raise InputChangedError(full.result(), epoch=epoch, how="sha256")
            losses.append(_step(run, epoch, batch, mf))
    if not losses:
        raise ValueError(f"epoch {epoch} got no batch from the dataset")
    if input_check is not None:  # before the checkpoint: it must never follow an epoch of unverified data
        problems = full.result() if full is not None else input_check.quick()
        if problems:
            raise InputChangedError(problems, epoch=epoch, how="sha256" if full is not None else "size")
    return losses


def _step(run: _Run, epoch: int, batch: Any, metrics: Any) -> float:
    """One optimiser step on ``batch``; its loss (and the loss function's extras) as a line of ``metrics``."""
    batch = to_device(batch, run.device)
    with autocast(run.device):
        result = run.loss_fn_step(run.model, batch)
    loss, extra = result if isinstance(result, tuple) else (result, {})
    if not torch.isfinite(loss):
        raise FloatingPointError(f"non-finite loss {float(loss)} at epoch {epoch}, step {run.global_step}")
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if run.config.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.config.grad_clip)
    lr = run.optimizer.param_groups[0]["lr"]
    run.optimizer.step()
    run.scheduler.step()
    run.global_step += 1
    run.steps_run += 1
    value = float(loss.detach())
    row = {"epoch": epoch, "step": run.global_step, "loss": value, "lr": lr}
    row.update({k: float(v) for k, v in extra.items()})
    metrics.write(json.dumps(row) + "\n")
    return value


def _save_checkpoint(run: _Run, epoch: int) -> None:
    """``checkpoints/epoch-NNNN.pt`` (atomically), keeping the newest ``keep_checkpoints``."""
    state = {
        "format": CHECKPOINT_FORMAT, "epoch": epoch, "global_step": run.global_step,
        "steps_per_epoch": run.steps_per_epoch, "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(), "rng": _rng_state(),
        "config": asdict(run.config), "metadata": run.metadata, "head": getattr(run.model, "config", None),
    }
    _atomic_torch_save(state, run.ckpt_dir / f"epoch-{epoch:04d}.pt")
    for _, old in _checkpoints(run.ckpt_dir)[: -max(1, run.config.keep_checkpoints)]:
        old.unlink(missing_ok=True)


def _finish_run(run: _Run, history: list[dict], start_epoch: int, resumed: bool, t_start: float) -> TrainResult:
    """The loss plot, and model.pt once every epoch is done: written last, it is the run's completion marker (a
    Luigi target)."""
    if history or not run.plot_path.exists():
        _plot(run.metrics_path, run.plot_path)
    done = _checkpoints(run.ckpt_dir)
    completed = done[-1][0] + 1 if done else 0
    final = None
    if completed >= run.config.epochs:
        if history or not run.model_path.exists():
            _atomic_torch_save({"format": CHECKPOINT_FORMAT, "model": run.model.state_dict(),
                                "head": getattr(run.model, "config", None), "metadata": run.metadata,
                                "config": asdict(run.config), "epochs": completed}, run.model_path)
        final = run.model_path
    return TrainResult(
        out_dir=run.out, model_path=final, checkpoint_path=done[-1][1] if done else None,
        metrics_path=run.metrics_path, plot_path=run.plot_path if run.plot_path.exists() else None,
        start_epoch=start_epoch, epochs_completed=completed, epochs_run=len(history), steps_run=run.steps_run,
        resumed=resumed, last_epoch_loss=history[-1]["loss"] if history else None,
        seconds=time.perf_counter() - t_start, history=history,
    )


def load_trained(path: str | Path, kind: str | None = None, map_location: str | torch.device = "cpu"):
    """Load out_dir/model.pt (or a checkpoint). With `kind` ("use" | "alignment") → (rebuilt head, record);
    without → the raw record {"model": state_dict, "head": config, "metadata", "config", ...}."""
    record = load_weights(path, what="trained head")
    if map_location != "cpu":
        record = _to_device(record, torch.device(map_location))
    if kind is None:
        return record
    from pseudoseg.models.training.heads import build_head

    if not isinstance(record, dict) or "model" not in record or "head" not in record:
        raise CheckpointError(f"trained head checkpoint {path} holds no 'model' and 'head' (found "
                              f"{sorted(record)[:8] if isinstance(record, dict) else type(record).__name__})")
    head = build_head(kind, record["head"])
    load_state_strict(head, record["model"], path=path, what="trained head")
    return head, record


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(v, device) for v in value)
    return value


# ------------------------------------------------------------------------------------------------ USE head
def _tensor(x: Any, dtype: torch.dtype | None = None) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x)) if not isinstance(x, torch.Tensor) else x
    return t.to(dtype) if dtype is not None else t


def collate_use(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """USE samples (one image each) → one batch.

    Sample keys (arrays or tensors; features may be float16):
      clip_patches [Lc, h, w, Cc], clip_cls [Cc] or [Lc, Cc]      (optional if the head uses no CLIP)
      dino_patches [Ld, h, w, Cd], dino_cls [Cd] or [Ld, Cd]      (optional if the head uses no DINOv2)
      image uint8 [H, W, 3]      instead of the features, for online encoding (`use_step(encode=...)`)
      weights float [S_i, h*w]   mask-pooling weights (`models.training.heads.mask_pooling_weights`), S_i ≥ 0
      text_emb float [S_i, D]    CLIP text embedding of one text per segment (the dataset samples one of a
                                 segment's texts per epoch, as the paper does)
      text_ids int [S_i]         id of that text (equal id = identical text), for the dedup loss
    Batch: features stacked [B, ...]; images a list of B numpy arrays (left on the host: the encoders take
    numpy); weights / text_emb / text_ids concatenated [S, ...]; image_index int [S].
    """
    if isinstance(samples, Collated):
        return dict(samples)
    out: dict[str, Any] = {}
    for key in ("clip_patches", "clip_cls", "dino_patches", "dino_cls"):
        if key in samples[0] and samples[0][key] is not None:
            out[key] = torch.stack([_tensor(s[key]) for s in samples])
    if "image" in samples[0]:
        out["images"] = [np.asarray(s["image"]) for s in samples]
    weights = [_tensor(s["weights"], torch.float32) for s in samples]
    out["weights"] = torch.cat(weights)
    out["image_index"] = torch.cat([torch.full((len(w),), b, dtype=torch.long) for b, w in enumerate(weights)])
    out["text_emb"] = torch.cat([_tensor(s["text_emb"], torch.float32) for s in samples])
    out["text_ids"] = torch.cat([_tensor(s["text_ids"], torch.long).reshape(-1) for s in samples])
    return out


def use_step(params: TrainUseParams, encode: Callable[[list[np.ndarray]], Mapping[str, np.ndarray]] | None = None
             ) -> Callable[[nn.Module, dict], torch.Tensor]:
    """Step for `USEHead` on `collate_use` batches: segment embeddings vs their texts, symmetric contrastive loss
    (use-paper Eq. 1) with ``params.logit_scale`` (the paper's 30); ``params.dedup`` masks identical texts
    (`segment_text_loss_dedup`).

    encode: online features — called with the batch's `images` (list of uint8 [H, W, 3]), it runs the frozen
    encoders and returns float32 arrays keyed like the cached ones ({clip,dino}_{patches,cls}, batch first, e.g.
    `pipeline.features.cache.encode_use_batch` with the roles bound); they join the batch on the head's device."""

    logit_scale, dedup = params.logit_scale, params.dedup

    def step(model: nn.Module, batch: dict) -> torch.Tensor:
        if encode is not None:
            dev = batch["weights"].device
            batch = {**batch, **{k: torch.from_numpy(np.ascontiguousarray(v)).to(dev, torch.float32)
                                 for k, v in encode(batch["images"]).items()}}
        seg = model(weights=batch["weights"], image_index=batch["image_index"],
                    clip_patches=batch.get("clip_patches"), dino_patches=batch.get("dino_patches"),
                    clip_cls=batch.get("clip_cls"), dino_cls=batch.get("dino_cls"))
        if dedup:
            return segment_text_loss_dedup(seg, batch["text_emb"], batch["text_ids"], logit_scale)
        return segment_text_loss(seg, batch["text_emb"], logit_scale)

    return step


# ------------------------------------------------------------------------------------------------ alignment
def collate_alignment(samples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
    """Alignment samples (one image each): tokens [h, w, C] (or [N, C]), labels int [h, w] (or [N]), −1 = ignore.

    Images of one batch may have different grids: tokens are then padded to the longest N (labels −1 there) and
    `padding_mask` bool [B, N] (True = padding) is added. Batch: tokens [B, N, C], labels [B, N].
    """
    if isinstance(samples, Collated):
        return dict(samples)
    toks = [_tensor(s["tokens"]) for s in samples]
    toks = [t.reshape(-1, t.shape[-1]) for t in toks]
    labs = [_tensor(s["labels"], torch.long).reshape(-1) for s in samples]
    n = max(t.shape[0] for t in toks)
    if all(t.shape[0] == n for t in toks):
        return {"tokens": torch.stack(toks), "labels": torch.stack(labs)}
    tokens = toks[0].new_zeros(len(toks), n, toks[0].shape[1])
    labels = torch.full((len(toks), n), -1, dtype=torch.long)
    pad = torch.ones(len(toks), n, dtype=torch.bool)
    for b, (t, y) in enumerate(zip(toks, labs, strict=True)):
        tokens[b, : len(t)], labels[b, : len(y)], pad[b, : len(t)] = t, y, False
    return {"tokens": tokens, "labels": labels, "padding_mask": pad}


def alignment_step(text_protos: torch.Tensor | np.ndarray, params: TrainAlignmentParams
                   ) -> Callable[[nn.Module, dict], torch.Tensor]:
    """Step for `AlignmentBlock` on `collate_alignment` batches: TSupCon (fmbseg-paper Eq. 1–4) of all patches of the
    batch against the K frozen text prototypes [K, D] (labels index them; −1 = ignore), with ``params.temperature``
    and ``params.anchor_positive``.

    temperature 1.0 and anchor_positive=True (the defaults) are the equations as written (bare dot products of unit vectors; the
    anchor among its own positives in Eq. 4); see `models.training.losses.tsupcon_loss`. With unit vectors τ = 1 bounds
    every logit to [−1, 1]: the loss is flat and patches move slowly. Measured (`make bench`,
    bench/results/tsupcon_temperature.json, 3 seeds, CPU): held-out accuracy 0.43 at τ 1 vs 0.94 at τ 0.1 on the
    synthetic clusters (10 epochs), 0.11 vs 0.90 on the oracle VOC features (4 epochs); 10× the learning rate
    does not help τ 1 (0.52, 0.10), 10× the epochs does (1.00, 0.91). τ 0.1 stays an option for short budgets."""
    protos = torch.as_tensor(np.asarray(text_protos) if not isinstance(text_protos, torch.Tensor) else text_protos)
    temperature, anchor_positive = params.temperature, params.anchor_positive
    cache: dict[torch.device, torch.Tensor] = {}

    def step(model: nn.Module, batch: dict) -> torch.Tensor:
        z = model(batch["tokens"], batch.get("padding_mask"))
        dev = z.device
        if dev not in cache:
            cache[dev] = protos.to(dev, torch.float32)
        return tsupcon_loss(z.reshape(-1, z.shape[-1]), batch["labels"].reshape(-1), cache[dev], temperature,
                            anchor_positive=anchor_positive)

    return step
