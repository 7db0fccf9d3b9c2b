"""bench/timing.py: the harness every benchmark uses (interleaving, statistics, result envelope)."""

from __future__ import annotations

import json

from bench.timing import compare, envelope, measure, time_call, write_result


def test_compare_interleaves_rotates_and_reports_min_and_median() -> None:
    calls: list[str] = []
    variants = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    out = compare(variants, repeats=3, warmup=1)
    assert calls == list("abc" "abc" "bca" "cab")  # warm-up round, then rounds rotated by one
    for stats in out.values():
        assert stats["n"] == 3 and len(stats["wall_s"]["all"]) == 3
        assert stats["wall_s"]["min"] <= stats["wall_s"]["median"] <= stats["wall_s"]["max"]
        assert stats["cpu_s"]["min"] >= 0
    assert measure(lambda: None, repeats=2, warmup=0)["n"] == 2
    result, t = time_call(lambda: 42)
    assert result == 42 and set(t) == {"wall_s", "cpu_s"}


def test_envelope_records_machine_and_load(tmp_path) -> None:
    payload = envelope("x", {"v": 1}, load_before={"1m": 0.5, "5m": 0.5, "15m": 0.5})
    assert payload["machine"]["cpus"] >= 1 and "load_avg" in payload["machine"]
    assert set(payload["load_after"]) == {"1m", "5m", "15m"} and payload["results"] == {"v": 1}
    path = write_result(tmp_path, "x", payload)
    assert json.loads(path.read_text())["benchmark"] == "x" and not list(tmp_path.glob(".*tmp*"))
