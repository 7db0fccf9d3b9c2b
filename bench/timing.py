"""Timing harness shared by every benchmark of ``bench/``: honest numbers on a shared machine and on a GPU.

Rules it enforces (why the old single-sample timings misled: a cold first call, machine load, CUDA work still
queued when the clock was read):

- **warm-up** calls that are not counted (``warmup``), so module loading, allocator growth, cuDNN/cuBLAS
  autotuning and worker start-up stay out of the figures (report them apart with ``time_call`` if they matter);
- **repeats interleaved** between the variants compared (A B A B …, ``compare``), so a load spike from another
  process hits every variant rather than one; **min and median** reported beside every sample;
- ``torch.cuda.synchronize()`` **before every clock read** when CUDA is in use (``cuda=None`` = when torch has
  initialised CUDA), so asynchronous kernels are charged to the code that launched them;
- **CPU time** (``time.process_time``: this process's threads, not DataLoader worker processes) beside wall time;
- ``os.getloadavg()`` before and after, and the machine (``machine_info``), in every result file (``envelope``).

API (all figures in seconds)::

    compare({"a": fn_a, "b": fn_b}, repeats=5, warmup=1)  -> {"a": Stats-dict, "b": ...}
    measure(fn, repeats=5, warmup=1)                       -> Stats-dict     (one variant)
    time_call(fn)                                          -> (result, {"wall_s", "cpu_s"})   (one call, synced)
    ForwardTimer()                                         time inside torch module forwards (synced hooks)
    sync(); cuda_in_use(); load_avg(); machine_info()
    timed_cli(args)                                        -> wall, CPU (command + its workers), peak RSS of one
                                                              `pseudoseg` command in a subprocess
    envelope(name, results, load_before=...)               -> the JSON written to bench/results/<name>.json
    write_result(out_dir, name, payload)                   atomic write, returns the path

A Stats-dict: ``{"wall_s": {"min", "median", "max", "all"}, "cpu_s": {...}, "n": repeats}``.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

__all__ = ["sync", "cuda_in_use", "time_call", "compare", "measure", "stats", "ForwardTimer", "load_avg",
           "machine_info", "envelope", "write_result", "timed_cli", "REPO"]


def _torch():
    try:
        import torch
    except ImportError:  # pragma: no cover - every benchmark machine has torch
        return None
    return torch


def cuda_in_use() -> bool:
    """True when torch has initialised CUDA in this process (then clocks must be read after a synchronize)."""
    torch = _torch()
    return bool(torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized())


def sync(cuda: bool | None = None) -> None:
    """Wait for every queued CUDA kernel (no-op without CUDA). ``cuda=None``: when CUDA is initialised."""
    if cuda is None:
        cuda = cuda_in_use()
    if cuda:
        _torch().cuda.synchronize()


def time_call(fn: Callable[[], Any], *, cuda: bool | None = None) -> tuple[Any, dict[str, float]]:
    """(fn(), {"wall_s", "cpu_s"}) of one call, synchronised before both clock reads."""
    sync(cuda)
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    sync(cuda)
    return out, {"wall_s": time.perf_counter() - w0, "cpu_s": time.process_time() - c0}


def stats(values: list[float], digits: int = 6) -> dict[str, Any]:
    """min / median / max / all of a list of seconds (rounded to ``digits``)."""
    r = lambda v: round(float(v), digits)  # noqa: E731
    return {"min": r(min(values)), "median": r(statistics.median(values)), "max": r(max(values)),
            "all": [r(v) for v in values]}


def compare(variants: Mapping[str, Callable[[], Any]], *, repeats: int = 5, warmup: int = 1,
            cuda: bool | None = None, digits: int = 6) -> dict[str, dict[str, Any]]:
    """Time each variant ``repeats`` times, interleaved: round r runs every variant once (A B C, A B C, …; the
    order rotates each round so no variant always follows the same one), after ``warmup`` uncounted rounds.
    Returns {name: {"wall_s": stats, "cpu_s": stats, "n"}}."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats}, {warmup}")
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            time_call(variants[name], cuda=cuda)
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            _, t = time_call(variants[name], cuda=cuda)
            wall[name].append(t["wall_s"])
            cpu[name].append(t["cpu_s"])
    return {n: {"wall_s": stats(wall[n], digits), "cpu_s": stats(cpu[n], digits), "n": repeats} for n in names}


def measure(fn: Callable[[], Any], *, repeats: int = 5, warmup: int = 1, cuda: bool | None = None,
            digits: int = 6) -> dict[str, Any]:
    """``compare`` of one variant."""
    return compare({"_": fn}, repeats=repeats, warmup=warmup, cuda=cuda, digits=digits)["_"]


class ForwardTimer:
    """Wall time spent inside torch module forwards (outermost module calls only), via global forward hooks.

    With CUDA in use the hooks synchronise at the outermost enter and exit, so GPU time is charged to the forward
    that queued it and not to whatever Python code next waits on the GPU (this costs the overlap of Python with
    kernels: use it to attribute time, and ``compare`` without it for throughput). ``reset()`` zeroes the total::

        with ForwardTimer() as fwd:
            _, t = time_call(stage)
        outside = 1 - fwd.total / t["wall_s"]
    """

    def __init__(self, cuda: bool | None = None) -> None:
        self.cuda, self.total, self._depth, self._start, self._handles = cuda, 0.0, 0, 0.0, []

    def reset(self) -> None:
        self.total = 0.0

    def _pre(self, _module, _args) -> None:
        if self._depth == 0:
            sync(self.cuda)
            self._start = time.perf_counter()
        self._depth += 1

    def _post(self, _module, _args, _out) -> None:
        self._depth -= 1
        if self._depth == 0:
            sync(self.cuda)
            self.total += time.perf_counter() - self._start

    def __enter__(self) -> ForwardTimer:
        import torch

        self._handles = [torch.nn.modules.module.register_module_forward_pre_hook(self._pre),
                         torch.nn.modules.module.register_module_forward_hook(self._post)]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def load_avg() -> dict[str, float]:
    """The 1-, 5- and 15-minute load averages (runnable processes; compare with ``cpus``)."""
    one, five, fifteen = os.getloadavg()
    return {"1m": round(one, 2), "5m": round(five, 2), "15m": round(fifteen, 2)}


def machine_info() -> dict[str, Any]:
    """What the numbers depend on: cores (and this process's affinity), CPU model, memory, Python, torch and its
    threads, the CUDA device (name, capability, memory, driver/runtime), the load average now."""
    info: dict[str, Any] = {"cpus": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)),
                            "machine": platform.machine(), "python": platform.python_version()}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu_model"] = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), None)
        with open("/proc/meminfo") as f:
            info["mem_gib"] = round(int(next(ln for ln in f if ln.startswith("MemTotal")).split()[1]) / 2**20, 1)
    except (OSError, StopIteration):
        pass
    torch = _torch()
    if torch is not None:
        info.update(torch=torch.__version__, torch_threads=torch.get_num_threads(), cuda=None)
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            info["cuda"] = {"name": p.name, "capability": f"{p.major}.{p.minor}", "mem_gib": round(p.total_memory / 2**30, 1),
                            "sms": p.multi_processor_count, "runtime": torch.version.cuda,
                            "cudnn": torch.backends.cudnn.version()}
    info["load_avg"] = load_avg()
    return info


def envelope(name: str, results: Any, *, load_before: dict[str, float] | None = None,
             notes: str | None = None) -> dict[str, Any]:
    """The result file's content: benchmark name, machine (with the load at its start), load before/after, time."""
    out: dict[str, Any] = {"benchmark": name, "machine": machine_info(),
                           "load_before": load_before, "load_after": load_avg(),
                           "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if notes:
        out["notes"] = notes
    out["results"] = results
    return out


def write_result(out_dir: str | Path, name: str, payload: Mapping[str, Any]) -> Path:
    """Write ``<out_dir>/<name>.json`` atomically (temporary name, then rename)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    tmp = path.with_name(f".{name}.json.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def timed_cli(args: list[str], code: Path = REPO, timeout: float | None = None) -> dict:
    """`python -m pseudoseg.tasks.report.cli ARGS` with ``code`` as the ``pseudoseg`` package: wall time, CPU time (user + sys of the
    process and every worker process it waited for: os.wait4) and peak RSS, with the load average before/after."""
    import subprocess
    import sys

    env = os.environ.copy()
    # another checkout's code as the `pseudoseg` namespace: a folder holding one link named pseudoseg
    shim = Path(os.environ.get("TMPDIR", "/tmp")) / f"pseudoseg-shim-{os.getpid()}-{abs(hash(str(code)))}"
    shim.mkdir(exist_ok=True)
    if not (shim / "pseudoseg").exists():
        (shim / "pseudoseg").symlink_to(code.resolve(), target_is_directory=True)
    env.update(PYTHONPATH=os.pathsep.join([str(shim), str(code)]), LUIGI_CONFIG_PATH=str(code / "luigi.cfg"),
               PYTHONHASHSEED="0")
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "pseudoseg.tasks.report.cli", *args], cwd=code, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = None if timeout is None else time.monotonic() + timeout
    output = []
    import threading

    reader = threading.Thread(target=lambda: output.append(proc.stdout.read()), daemon=True)
    reader.start()
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if deadline is not None and time.monotonic() > deadline:
            proc.kill()
        time.sleep(0.05)
    wall = time.perf_counter() - t0
    reader.join(timeout=10)
    proc.returncode = os.waitstatus_to_exitcode(status)
    text = "".join(output)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}):\n{text[-3000:]}")
    return {"wall_s": round(wall, 2), "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
            "user_s": round(usage.ru_utime, 2), "sys_s": round(usage.ru_stime, 2),
            "max_rss_mb": round(usage.ru_maxrss / 1024, 1),
            "load_before": [round(x, 2) for x in load_before],
            "load_after": [round(x, 2) for x in os.getloadavg()]}
