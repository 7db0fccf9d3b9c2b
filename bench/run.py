"""Benchmarks (never timed tests): `make bench` writes results to bench/results/<name>.json.

One module per benchmark (``bench/<name>.py``, its function exported as ``BENCHMARK``), listed once in ``MODULES``;
shared code in ``bench/timing.py`` (timing, machine, result files, timed commands) and ``bench/fixtures.py``
(synthetic inputs and random-init models).

Every benchmark times through ``bench.timing`` (warm-up, variants interleaved, min and median, CUDA synchronised
before each clock read, CPU time beside wall time) and every result file records the machine and the load
average before and after (``bench.timing.envelope``), so results from a loaded laptop, an idle server and a GPU
host are never compared by accident. ``--prefix gpu-`` and ``--kw key=value`` (passed to the benchmarks that take
that argument) are what ``bench/gpu.sh`` uses.
"""

from __future__ import annotations

import argparse
import inspect
import json
import time

from bench import (
    cli_latency,
    fmbseg_stages,
    grounder_batching,
    ingest,
    memory,
    sam_boxes,
    sam_embedding_share,
    scheduling,
    stage_overhead,
    stages,
    trainer_loader,
    tsupcon_temperature,
    verify_cost,
)
from bench.timing import envelope, load_avg, write_result

MODULES = (ingest, sam_boxes, fmbseg_stages, trainer_loader, sam_embedding_share, tsupcon_temperature, verify_cost,
           stages, scheduling, memory, stage_overhead, grounder_batching, cli_latency)
# {name: function}: the name is the module's (and the result file's, bench/results/<name>.json)
BENCHMARKS = {module.__name__.rsplit(".", 1)[1]: module.BENCHMARK for module in MODULES}


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--prefix", default="", help="result file name prefix, e.g. gpu-")
    ap.add_argument("--kw", action="append", default=[], metavar="KEY=VALUE",
                    help="argument for every benchmark that takes KEY (JSON value or string), e.g. arch=vit_h")
    ap.add_argument("names", nargs="*", default=sorted(BENCHMARKS))
    args = ap.parse_args(argv)
    kw = dict(item.split("=", 1) for item in args.kw)
    for name in args.names:
        fn = BENCHMARKS[name]
        params = inspect.signature(fn).parameters
        call = {k: _value(v) for k, v in kw.items() if k in params}
        before = load_avg()
        t0 = time.perf_counter()
        results = fn(**call)
        payload = envelope(name, results, load_before=before)
        payload["arguments"] = call
        payload["seconds"] = round(time.perf_counter() - t0, 1)
        path = write_result(args.out, f"{args.prefix}{name}", payload)
        print(f"{path}: {payload['seconds']} s, load {before['1m']} -> {payload['load_after']['1m']}", flush=True)


if __name__ == "__main__":
    main()
