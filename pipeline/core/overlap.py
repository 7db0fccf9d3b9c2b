"""Host work beside the accelerator: decode ahead of a loop (``prefetch``) and post-process behind it (``Behind``).

Both keep a sequential loop's semantics: results are handed back strictly in submission order, a function's
exception travels with its item (``Outcome.get`` re-raises it where the loop asks for the result, so per-image error
handling sees it exactly where the sequential code did) and nothing runs more than a bounded number of items ahead.
The work itself (decoding, resizing, thresholding, RLE) is deterministic, so a loop's output is byte for byte the
same with any depth; 0 runs everything inline, in the caller's thread.

Threads, not processes: image decoding (PIL / OpenCV), numpy and OpenCV release the GIL for the heavy parts, and the
model forward the loop runs meanwhile releases it too.
"""

from __future__ import annotations

import queue
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class Outcome(Generic[R]):
    """What a function returned, or the exception it raised (``get`` returns the one or raises the other)."""

    value: Any = None
    error: BaseException | None = None

    def get(self) -> R:
        if self.error is not None:
            raise self.error
        return self.value

    @classmethod
    def of(cls, fn: Callable[..., R], *args: Any) -> Outcome[R]:
        try:
            return cls(value=fn(*args))
        except Exception as exc:  # noqa: BLE001 — handed to the caller, who decides
            return cls(error=exc)

    @classmethod
    def of_future(cls, future: Future) -> Outcome:
        exc = future.exception()
        return cls(error=exc) if exc is not None else cls(value=future.result())


_END = object()


def prefetch(items: Iterable[T], fn: Callable[[T], R], *, ahead: int, threads: int = 1,
             name: str = "prefetch") -> Iterator[tuple[T, Outcome[R]]]:
    """``(item, Outcome of fn(item))`` for every item, in the order of ``items``.

    ahead > 0: one feeder thread iterates ``items`` (so reading the source happens in the background too) and hands
    each item to a pool of ``threads`` threads running ``fn``; at most ``ahead`` items are read and not yet consumed.
    An exception raised while iterating ``items`` is raised here, after the items before it. ahead = 0: inline.
    Closing the generator early stops the feeder and drops what it prepared.
    """
    if ahead <= 0:
        for item in items:
            yield item, Outcome.of(fn, item)
        return
    pending: queue.Queue = queue.Queue(maxsize=ahead)
    stop = threading.Event()
    pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix=name)

    def put(entry: Any) -> bool:
        while not stop.is_set():
            try:
                pending.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def feed() -> None:
        source = iter(items)
        try:
            while not stop.is_set():  # checked before every read: a closed consumer stops the reading
                try:
                    item = next(source)
                except StopIteration:
                    put((_END, None))
                    return
                if not put((item, pool.submit(fn, item))):
                    return
        except BaseException as exc:  # noqa: BLE001 — re-raised in the consumer, in order
            put((_END, exc))

    feeder = threading.Thread(target=feed, name=f"{name}-feeder", daemon=True)
    feeder.start()
    try:
        while True:
            item, payload = pending.get()
            if item is _END:
                if payload is not None:
                    raise payload
                return
            yield item, Outcome.of_future(payload)
    finally:
        stop.set()
        while True:  # unblock the feeder and cancel what was not started
            try:
                item, payload = pending.get_nowait()
            except queue.Empty:
                break
            if item is not _END:
                payload.cancel()
        feeder.join()
        pool.shutdown(wait=True, cancel_futures=True)


class Behind:
    """Post-processing behind a loop: ``submit(key, fn, *args)`` runs ``fn(*args)`` in a background pool and hands
    ``(key, Outcome)`` to ``deliver`` in the CALLER's thread, in submission order — as soon as the oldest pending
    result is ready (``poll``, called by every submit), or by waiting when more than ``depth`` are pending, and for
    everything left on ``drain`` / leaving the ``with`` block normally. ``deliver`` is where order-dependent effects
    belong (appending rows, writing a tar member): ``fn`` must not have any. depth = 0: ``fn`` runs inline and is
    delivered at once. Leaving the block on an exception drops the pending work undelivered."""

    def __init__(self, deliver: Callable[[Any, Outcome], None], *, depth: int, threads: int = 1,
                 name: str = "behind") -> None:
        self.deliver, self.depth = deliver, max(0, depth)
        self.pending: deque[tuple[Any, Future]] = deque()
        self.pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix=name) if self.depth else None

    def submit(self, key: Any, fn: Callable[..., Any], *args: Any) -> None:
        if self.pool is None:
            self.deliver(key, Outcome.of(fn, *args))
            return
        self.pending.append((key, self.pool.submit(fn, *args)))
        self.poll()
        while len(self.pending) > self.depth:
            self._deliver_oldest()

    def poll(self) -> None:
        """Deliver the results that are ready at the front of the queue, without waiting."""
        while self.pending and self.pending[0][1].done():
            self._deliver_oldest()

    def drain(self) -> None:
        """Wait for and deliver everything pending."""
        while self.pending:
            self._deliver_oldest()

    def _deliver_oldest(self) -> None:
        key, future = self.pending.popleft()
        self.deliver(key, Outcome.of_future(future))

    def __enter__(self) -> Behind:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        try:
            if exc_type is None:
                self.drain()
        finally:
            if self.pool is not None:
                for _, future in self.pending:
                    future.cancel()
                self.pending.clear()
                self.pool.shutdown(wait=True, cancel_futures=True)


class HostCopy:
    """A tensor's copy to the host, started without waiting: on CUDA into pinned memory with ``non_blocking`` and an
    event recorded behind it, so the loop that made the tensor goes on queueing work; ``numpy()`` (e.g. in a
    ``Behind`` thread) waits for that copy only. A CPU tensor or a numpy array is simply wrapped."""

    def __init__(self, data: Any) -> None:
        self._event = None
        torch = sys.modules.get("torch")
        if torch is not None and isinstance(data, torch.Tensor):
            data = data.detach()
            if data.device.type == "cuda":
                host = torch.empty(data.shape, dtype=data.dtype, pin_memory=True)
                host.copy_(data, non_blocking=True)
                self._event = torch.cuda.Event()
                self._event.record()
                data = host
            self._data = data
        else:
            self._data = np.asarray(data)

    def numpy(self) -> np.ndarray:
        if self._event is not None:
            self._event.synchronize()
        return self._data if isinstance(self._data, np.ndarray) else self._data.numpy()


@dataclass
class _Packed:
    key: Any
    units: np.ndarray
    done: int = 0  # rows encoded
    outputs: list = None  # type: ignore[assignment]

    def result(self) -> Outcome:
        return Outcome(value=tuple(np.concatenate(p) for p in zip(*self.outputs, strict=True)) if self.outputs else ())


def packed_batches(items: Iterable[tuple[Any, np.ndarray]], encode: Callable[[np.ndarray], tuple[np.ndarray, ...]],
                   batch_size: int, *, retry: Callable[[BaseException], bool] = lambda exc: True
                   ) -> Iterator[tuple[Any, Outcome]]:
    """Rows of consecutive items packed into full batches: ``items`` are ``(key, units)`` with ``units`` an array of
    N rows (e.g. an image's N crops); ``encode(rows)`` maps a batch of rows to a tuple of arrays with one row per
    input row. Batches of ``batch_size`` rows are cut across item boundaries (the last one holds the rest), and
    ``(key, Outcome)`` is yielded per item, in item order, as soon as all its rows are encoded: the value is the
    tuple of its rows' outputs, concatenated.

    When ``encode`` raises on a batch and ``retry(exc)``, which item is to blame is unknown: every item with rows in
    that batch is encoded again alone (its rows in batches of ``batch_size``) and its Outcome holds that result or
    that error. Otherwise the exception is raised here."""
    entries: deque[_Packed] = deque()
    waiting = 0  # rows queued, not yet encoded

    def ready() -> Iterator[tuple[Any, Outcome]]:
        while entries and entries[0].done == len(entries[0].units):
            entry = entries.popleft()
            yield entry.key, entry.result()

    def alone(entry: _Packed) -> Outcome:
        def run() -> tuple[np.ndarray, ...]:
            parts = [encode(entry.units[i : i + batch_size]) for i in range(0, len(entry.units), batch_size)]
            return tuple(np.concatenate(p) for p in zip(*parts, strict=True))

        return Outcome.of(run)

    def step() -> Iterator[tuple[Any, Outcome]]:
        nonlocal waiting
        pieces, need = [], min(batch_size, waiting)
        for entry in entries:
            if need == 0:
                break
            n = min(len(entry.units) - entry.done, need)
            if n:
                pieces.append((entry, entry.done, n))
                need -= n
        try:
            outputs = encode(np.concatenate([e.units[start : start + n] for e, start, n in pieces]))
        except Exception as exc:
            if not retry(exc):
                raise
            touched = {id(e) for e, _, _ in pieces}
            while entries and id(entries[0]) in touched:  # the batch starts at the first unfinished item
                entry = entries.popleft()
                waiting -= len(entry.units) - entry.done
                yield entry.key, alone(entry)
            yield from ready()
            return
        offset = 0
        for entry, _start, n in pieces:
            entry.outputs.append(tuple(o[offset : offset + n] for o in outputs))
            entry.done += n
            offset += n
        waiting -= offset
        yield from ready()

    for key, units in items:
        entries.append(_Packed(key, np.asarray(units), outputs=[]))
        waiting += len(entries[-1].units)
        while waiting >= batch_size:
            yield from step()
        yield from ready()
    while waiting > 0:
        yield from step()
    yield from ready()
