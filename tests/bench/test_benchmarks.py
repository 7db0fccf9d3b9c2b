"""Smoke test of every benchmark of ``bench/`` (``bench.run.BENCHMARKS``) at tiny sizes: the function runs end to end
and its result has the shape ``make bench`` writes (keys present, counts equal to what was asked, timings positive
and finite, rates and ratios consistent with the counts and seconds beside them). No speed is asserted: the
numbers of a tiny run on a shared machine mean nothing. Every benchmark's temporary files go under ``tmp_path``."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any

import luigi.configuration
import pytest

from bench import run, verify_cost
from bench.run import BENCHMARKS


@pytest.fixture(autouse=True)
def _scratch_in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Temporary folders the benchmarks make (tempfile, and TMPDIR for the CLI shims) land in ``tmp_path``."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    monkeypatch.setenv("TMPDIR", str(scratch))


@pytest.fixture
def _luigi_config_restored():
    """bench_stage_overhead sets luigi.cfg values in this process (as a benchmark run may): put them back."""
    cfg = luigi.configuration.get_config()
    saved = {s: {k: cfg.get(s, k, raw=True) for k in cfg.options(s)} for s in cfg.sections()}
    yield
    for section in cfg.sections():
        if section not in saved:
            cfg.remove_section(section)
            continue
        for key in cfg.options(section):
            if key not in saved[section]:
                cfg.remove_option(section, key)
        for key, value in saved[section].items():
            cfg.set(section, key, value)


def positive(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def non_negative(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) and x >= 0


def check_stats(t: dict, n: int) -> None:
    """A ``bench.timing`` Stats-dict of ``n`` repeats."""
    assert t["n"] == n
    wall, cpu = t["wall_s"], t["cpu_s"]
    assert len(wall["all"]) == len(cpu["all"]) == n
    assert all(positive(v) for v in wall["all"]) and all(non_negative(v) for v in cpu["all"])
    assert wall["min"] <= wall["median"] <= wall["max"] and wall["min"] == min(wall["all"])


# ------------------------------------------------------------------------------------------ one check per benchmark
def check_ingest(r: dict, kw: dict) -> None:
    n = kw["n_images"]
    assert (r["images"], r["repeats"]) == (n, kw["repeats"])
    for name in ("plan", "ingest"):
        check_stats(r["timings"][name], kw["repeats"])
    assert r["plan_images_per_s"] == round(n / r["timings"]["plan"]["wall_s"]["median"], 1)
    assert r["ingest_images_per_s"] == round(n / r["timings"]["ingest"]["wall_s"]["median"], 1)
    assert non_negative(r["ingest_cpu_s_per_image"])


def check_sam_boxes(r: dict, kw: dict) -> None:
    assert (r["boxes"], r["repeats"], r["image_hw"]) == (kw["n_boxes"], kw["repeats"], [480, 640])
    assert r["arch"].startswith(kw["arch"])
    t = r["timings"]
    assert set(t) == {"embed", "predictor_set_image", "batched", "per_box", "chunks_of_1", "chunks_of_4",
                      "masks_for_boxes"}
    for stats in t.values():
        check_stats(stats, kw["repeats"])
    assert r["embed_s"] == t["embed"]["wall_s"]["median"] and r["batched_decoder_s"] == t["batched"]["wall_s"]["median"]
    assert r["per_box_over_batched"] == round(r["per_box_decoder_s"] / r["batched_decoder_s"], 3)
    assert set(r["batched_decoder_s_by_max_boxes_per_call"]) == {"1", "4"}
    assert all(positive(r[k]) for k in ("embed_s", "predictor_set_image_s", "masks_for_boxes_s", "build_s"))


def check_fmbseg_stages(r: dict, kw: dict) -> None:
    timed = {"dense", "text_embeddings_per_shard", "detect", "sam_embed", "stage11", "stage12_generator",
             "stage12_labelling", "merge", "stage12_labelling_100_masks", "merge_105_masks"}
    assert set(r["stages"]) == timed | {"stage12"}
    for name in timed:
        row = r["stages"][name]
        assert positive(row["seconds"]) and row["min_s"] <= row["seconds"] and non_negative(row["cpu_s"])
        assert -0.05 <= row["outside_model_share"] <= 1 and non_negative(row["model_forward_s"])
    assert r["stages"]["stage12"]["seconds"] == round(r["stages"]["stage12_generator"]["seconds"]
                                                      + r["stages"]["stage12_labelling"]["seconds"], 4)
    per_image = ("dense", "detect", "sam_embed", "stage11", "stage12", "merge")
    assert r["per_image_total_s"] == round(sum(r["stages"][k]["seconds"] for k in per_image), 3)
    assert r["saved_by_shared_sam_embedding_s"] == r["stages"]["sam_embed"]["seconds"]
    assert (r["stage11_classes"], r["repeats"]) == (kw["classes_11"], kw["repeats"])
    assert r["vocabulary"] == "coco_stuff171 (171 classes)" and r["working_hw"][0] == 112  # size=tiny: short side
    assert r["crops"] >= 1 and 0 <= r["auto_masks_labelled"] and 0 <= r["detected_classes"] <= 171


def check_trainer_loader(r: dict, kw: dict) -> None:
    assert (r["workers"], r["repeats"], r["device"]) == (kw["workers"], kw["repeats"], "cpu")
    # DataLoader worker processes (loader_process_workers, loader_legacy) are left out here: forked from a test
    # process that runs threads (pytest-xdist's, the lock heartbeat's) a worker can hang; `make bench` measures them
    variants = ("raw_cold", "raw_warm", "loader", "loader_cold", "loader_first")
    for name, n, batch in (("use", kw["n_use"], 32), ("alignment", kw["n_align"], 5)):
        row = r[name]
        assert (row["images"], row["batch_size"]) == (n, batch) and positive(row["tar_mb"])
        for v in variants:
            assert row[v]["images_per_s_median"] == round(n / row[v]["wall_s"]["median"], 1)
            # tar_mb is rounded to 0.1 MB, the rate is of the unrounded size
            assert row[v]["mb_per_s_median"] == pytest.approx(row["tar_mb"] / row[v]["wall_s"]["median"], rel=0.01)
            assert len(row[v]["wall_s"]["all"]) == kw["repeats"] and positive(row[v]["wall_s"]["median"])
        assert row["loader_cold_over_raw_cold_median"] == round(row["loader_cold"]["images_per_s_median"]
                                                                / row["raw_cold"]["images_per_s_median"], 3)
        assert "loader_process_workers" not in row and "loader_legacy" not in row


def check_sam_embedding_share(r: dict, kw: dict) -> None:
    assert r["repeats"] == kw["repeats"] and r["model"].startswith(f"SAM {kw['arch']}")
    assert positive(r["encode_s"]) and positive(r["read_stored_s"]) and positive(r["bytes_per_image"])
    check_stats(r["timings"]["encode"], kw["repeats"])
    assert r["encode_s"] == r["timings"]["encode"]["wall_s"]["median"]
    assert r["seconds_saved_per_image_both_branches"] == round(2 * r["encode_s"] - 3 * r["read_stored_s"], 4)
    assert 0 <= r["float16_max_abs_error"] < 0.05  # stored as float16: rounding only


def check_tsupcon_temperature(r: dict, kw: dict) -> None:
    assert r["seeds"] == list(kw["seeds"])
    for name, epochs in (("synthetic", kw["synthetic_epochs"]), ("oracle_voc", kw["oracle_epochs"])):
        rows = r[name]
        assert set(rows) == {"tau_1.0", "tau_0.1", "tau_1.0_lr_x10", "tau_1.0_epochs_x10"}
        for label, row in rows.items():
            assert row["epochs"] == epochs * (10 if label.endswith("epochs_x10") else 1)
            assert row["temperature"] == (0.1 if label == "tau_0.1" else 1.0)
            assert len(row["accuracy"]) == len(row["loss_drop"]) == len(kw["seeds"])
            assert all(0 <= a <= 1 for a in row["accuracy"]) and positive(row["seconds_mean"])
            assert all(math.isfinite(d) for d in row["loss_drop"])
        assert rows["tau_1.0_lr_x10"]["lr"] == pytest.approx(10 * rows["tau_1.0"]["lr"])


def check_verify_cost(r: dict, kw: dict) -> None:
    assert r["stages"] == {"Ingest": {"tasks": 1}} and r["stages_measured"]["utc"] == "2000-01-01T00:00:00Z"
    trainers = r["trainers"]
    assert trainers["images"] == {"use": kw["n_use"], "alignment": kw["n_align"]} and trainers["repeats"] == kw["repeats"]
    for kind in ("use", "alignment"):
        row = trainers[kind]
        assert positive(row["cache_mb"]) and positive(row["sha256_alone_hot_s"]) and non_negative(row["size_check_s"])
        for state in ("hot", "cold"):
            s = row[state]
            assert positive(s["first_epoch_s_median"]) and positive(s["verified_first_epoch_s_median"])
            assert s["extra_s_median"] == round(s["verified_first_epoch_s_median"] - s["first_epoch_s_median"], 3)
            assert s["share_of_training_median"] == pytest.approx(
                s["first_epoch_overhead_median"] / row["default_epochs"], abs=2e-4)


def check_stages(r: dict, kw: dict) -> None:
    batch = f"use_features_batch{kw['use_batch']}"
    assert set(r["stages"]) == {"clip_dense", "sam_embed", "sam_boxes_20", "stage11_5_classes", "stage12_automatic",
                                "dino_fmbseg", batch, "grounding", "car_gradcam_f", "car_classifier_g_10"}
    assert (r["size"], r["repeats"], r["warmup"]) == (kw["size"], kw["repeats"], kw["warmup"])
    for row in r["stages"].values():
        assert len(row["wall_s"]) == kw["repeats"] and all(positive(v) for v in row["wall_s"])
        assert row["min_s"] <= row["median_s"] and non_negative(row["cpu_median_s"])
    assert r["stages"][batch]["per_image_median_s"] == round(r["stages"][batch]["median_s"] / kw["use_batch"], 6)
    assert positive(r["build_and_load_s"]) and positive(r["text_embeddings_171_classes_s"])


def check_scheduling(r: dict, kw: dict) -> None:
    (n,) = kw["sizes"]
    assert (r["workers"], r["repeats"], r["images_per_shard"]) == (kw["workers"], kw["repeats"], 1)
    assert len(r["runs"]) == 2 * kw["repeats"] and {row["phase"] for row in r["runs"]} == {"first", "rerun"}
    for row in r["runs"]:
        assert row["shards"] == n and positive(row["wall_s"]) and positive(row["max_rss_mb"])
    for phase in ("first", "rerun"):
        entry = r["by_shards"][phase][str(n)]
        assert entry["wall_s"]["min"] == min(row["wall_s"] for row in r["runs"] if row["phase"] == phase)
    assert set(r["luigi_tasks"]) == {str(n)} and r["luigi_tasks"][str(n)] >= 3
    assert set(r["fits_of_minima"]) == {"first", "rerun"}  # one size: no line to fit, but the entries are there


def check_memory(r: dict, kw: dict) -> None:
    counts = kw["shard_counts"]
    assert r["repeats"] == kw["repeats"] and len(r["runs"]) == 2 * len(counts) * kw["repeats"]
    for stage in ("Ingest", "SamEmbeddings"):
        entry = r["summary"][stage]
        assert set(entry) == {str(n) for n in counts} | {"growth_median"}
        for n in counts:
            assert positive(entry[str(n)]["max_rss_mb_min"]) and len(entry[str(n)]["load_1m"]) == kw["repeats"]
        low, high = (entry[str(n)]["max_rss_mb_median"] for n in (min(counts), max(counts)))
        assert entry["growth_median"] == round(high / low - 1, 4)


def check_stage_overhead(r: dict, kw: dict) -> None:
    assert set(r["stages"]) == set(kw["stages"].split(","))
    assert r["repeats"] == kw["repeats"] and r["models"].startswith("tiny")
    for row in r["stages"].values():
        assert positive(row["wall_s"]) and non_negative(row["model_s"]) and non_negative(row["load_s"])
        assert len(row["rounds"]) == kw["repeats"]
        if row["model_s"]:
            assert row["ratio"] == pytest.approx(row["wall_s"] / row["model_s"], rel=0.01)  # of unrounded medians
        assert row["counts"]["in_count"] == row["counts"]["ok_count"] == kw["n_images"]


def check_grounder_batching(r: dict, kw: dict) -> None:
    assert (r["captions"], r["repeats"]) == (kw["captions"], kw["repeats"]) and r["model"].startswith("tiny")
    for key in ("per_caption_s", "batched_image_repeated_s", "batched_backbone_once_s"):
        assert positive(r[key])
    # the speedup is of the unrounded seconds, each reported to 3 decimals (± 0.0005)
    per_caption, once, e = r["per_caption_s"], r["batched_backbone_once_s"], 0.0005
    assert (per_caption - e) / (once + e) - 1e-3 <= r["speedup_backbone_once_vs_per_caption"] \
        <= (per_caption + e) / (once - e) + 1e-3
    assert 0 < r["backbone_share"] <= 1 and len(r["input_hw"]) == 2
    for key in ("image_repeated_vs_per_caption", "backbone_once_vs_per_caption"):
        d = r[key]
        assert non_negative(d["max_abs_box_px"]) and non_negative(d["max_abs_token_prob"])
        assert isinstance(d["bitwise_equal"], bool)


def check_cli_latency(r: dict, kw: dict) -> None:
    assert set(r) == {"stages", "key_typo", "section_typo", "missing_images", "unknown_stage"}
    for row in r.values():
        assert row["runs"] == kw["repeats"] and positive(row["min_s"]) and row["min_s"] <= row["median_s"]


# name: (tiny arguments, check, slow?)
SMOKE: dict[str, tuple[dict, Any, bool]] = {
    "ingest": (dict(n_images=3, repeats=1), check_ingest, False),
    "sam_boxes": (dict(n_boxes=2, repeats=1, arch="tiny"), check_sam_boxes, True),
    "fmbseg_stages": (dict(classes_11=2, repeats=1, arch="tiny", size="tiny"), check_fmbseg_stages, True),
    "trainer_loader": (dict(n_use=2, n_align=2, shards=1, workers=1, repeats=1, legacy=False, process_workers=False),
                       check_trainer_loader, True),
    "sam_embedding_share": (dict(repeats=1, arch="tiny"), check_sam_embedding_share, False),
    "tsupcon_temperature": (dict(seeds=(0,), train_images=5, held_out=5, synthetic_epochs=1, crops=5,
                                 oracle_epochs=1), check_tsupcon_temperature, False),
    "verify_cost": (dict(stages=False, n_use=2, n_align=2, repeats=1), check_verify_cost, True),
    "stages": (dict(size="tiny", repeats=1, warmup=0, use_batch=2), check_stages, True),
    "scheduling": (dict(sizes=(1,), repeats=1, workers=1), check_scheduling, True),
    "memory": (dict(shard_counts=(1,), repeats=1), check_memory, True),
    "stage_overhead": (dict(size="tiny", n_images=1, repeats=1, stages="SamEmbeddings"), check_stage_overhead, True),
    "grounder_batching": (dict(size="tiny", captions=2, repeats=1), check_grounder_batching, False),
    "cli_latency": (dict(repeats=1), check_cli_latency, True),
}


def test_every_benchmark_module_is_registered_and_smoke_tested() -> None:
    modules = {p.stem for p in Path(run.__file__).parent.glob("*.py")} - {"__init__", "run", "timing", "fixtures"}
    assert set(BENCHMARKS) == modules == set(SMOKE)
    for name, fn in BENCHMARKS.items():
        assert fn.__module__ == f"bench.{name}"


@pytest.mark.parametrize("name", [pytest.param(name, marks=[pytest.mark.slow] if slow else [])
                                  for name, (_, _, slow) in SMOKE.items()])
def test_benchmark_smoke(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request) -> None:
    kw, check, _ = SMOKE[name]
    if name == "stage_overhead":
        request.getfixturevalue("_luigi_config_restored")
    if name == "verify_cost":  # stages=False keeps the stage numbers of the result file there: a made-up one
        previous = tmp_path / "verify_cost.json"
        previous.write_text(json.dumps({"utc": "2000-01-01T00:00:00Z", "machine": {}, "load_before": None,
                                        "load_after": None, "results": {"stages": {"Ingest": {"tasks": 1}},
                                                                        "trainers": "old"}}))
        monkeypatch.setattr(verify_cost, "PREVIOUS", previous)
    result = BENCHMARKS[name](**kw)
    json.dumps(result)  # what bench.run writes
    check(result, kw)


def test_run_writes_one_envelope_per_benchmark_with_the_arguments_it_took(tmp_path: Path, capsys) -> None:
    run.main(["--out", str(tmp_path / "results"), "--prefix", "t-", "--kw", "n_images=2", "--kw", "repeats=1",
              "--kw", "arch=vit_h", "ingest"])
    (path,) = (tmp_path / "results").iterdir()
    payload = json.loads(path.read_text())
    assert path.name == "t-ingest.json" and str(path) in capsys.readouterr().out
    assert payload["benchmark"] == "ingest" and payload["arguments"] == {"n_images": 2, "repeats": 1}  # arch: not its
    assert payload["results"]["images"] == 2 and non_negative(payload["seconds"])
    assert set(payload) >= {"machine", "load_before", "load_after", "utc", "results"}
