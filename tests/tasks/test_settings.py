"""Every setting is checked before anything runs: the real `pseudoseg` command with one bad setting each exits
with status 2, prints exactly one line naming the problem, and writes nothing under --out."""

from __future__ import annotations

import configparser
from pathlib import Path

import pytest

from pseudoseg.tasks.engine.params import FloatParameter, IntParameter
from pseudoseg.tasks.engine.settings import closest, problems
from pseudoseg.tasks.stages.evaluate import Evaluate
from tests.helpers import REPO, cli, cli_env, write_good_images

pytestmark = pytest.mark.slow


def _missing(tmp: Path) -> list[str]:
    return ["--config", str(tmp / "missing.cfg")]


def _typo_file(tmp: Path) -> list[str]:
    (tmp / "extra.cfg").write_text("[ingest]\nmin_sidee = 3\n")
    return ["--config", str(tmp / "extra.cfg")]


# id → (extra arguments of `run Ingest`, or a function of the temp folder giving them; the expected line)
CASES = {
    "key_typo": (["--set", "ingest.shard_sizee=3"],
                 "pseudoseg: unknown key shard_sizee in [ingest] (from --set ingest.shard_sizee=3); "
                 "did you mean shard_size?"),
    "section_typo": (["--set", "ingset.shard_size=3"],
                     "pseudoseg: unknown section [ingset] (from --set ingset.shard_size=3); did you mean [ingest]?"),
    "workers_0": (["--workers", "0"],
                  "pseudoseg run: error: argument --workers: must be an integer ≥ 1, got '0' "
                  "(see pseudoseg run --help)"),
    "dataset_path": (["--dataset", "../../x"],
                     "pseudoseg: --dataset '../../x' must be a plain name, the folder under --out "
                     "(no '/', '\\' or '..'): it contains a path separator"),
    "shard_size_0": (["--set", "ingest.shard_size=0"],
                     "pseudoseg: [ingest] shard_size = '0' (from --set ingest.shard_size=0): must be an integer ≥ 1"),
    "shard_size_abc": (["--set", "ingest.shard_size=abc"],
                       "pseudoseg: [ingest] shard_size = 'abc' (from --set ingest.shard_size=abc): "
                       "must be an integer ≥ 1"),
    "shard_size_negative": (["--set", "ingest.shard_size=-2"],
                            "pseudoseg: [ingest] shard_size = '-2' (from --set ingest.shard_size=-2): "
                            "must be an integer ≥ 1"),
    "max_side_0": (["--set", "ingest.max_side=0"],
                   "pseudoseg: [ingest] max_side = '0' (from --set ingest.max_side=0): must be an integer ≥ 1"),
    "bad_bool": (["--set", "use.generate_captions=maybe"],
                 "pseudoseg: [use] generate_captions = 'maybe' (from --set use.generate_captions=maybe): "
                 "must be true or false"),
    "missing_config": (_missing, "pseudoseg: --config {tmp}/missing.cfg: no such file"),
    "config_key_typo": (_typo_file, "pseudoseg: unknown key min_sidee in [ingest] (from {tmp}/extra.cfg); "
                                    "did you mean min_side?"),
}


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """Every case at once (they are independent processes): {case: (tmp, out, exit status, output)}."""
    tmp = tmp_path_factory.mktemp("settings")
    images = tmp / "images"
    write_good_images(images, 2)
    runs = {}
    for name, (extra, _) in CASES.items():
        case = tmp / name
        case.mkdir()
        args = extra(case) if callable(extra) else extra
        out = case / "out"
        runs[name] = (case, out, cli(["run", "Ingest", "--images", str(images), "--out", str(out), *args],
                                     cli_env(case)))
    # luigi.cfg itself (LUIGI_CONFIG_PATH): a typo in Luigi's own [scheduler] section
    case = tmp / "luigi_cfg"
    case.mkdir()
    text = (REPO / "luigi.cfg").read_text()
    assert "\nretry_count = 3\n" in text
    (case / "luigi.cfg").write_text(text.replace("\nretry_count = 3\n", "\nretry_cnt = 3\n"))
    env = cli_env(case)
    env["LUIGI_CONFIG_PATH"] = str(case / "luigi.cfg")
    runs["luigi_cfg"] = (case, case / "out", cli(["run", "Ingest", "--images", str(images), "--out",
                                                  str(case / "out")], env))
    # demo: its sample set is written only after the settings are checked
    case = tmp / "demo"
    case.mkdir()
    runs["demo"] = (case, case / "out", cli(["demo", "--out", str(case / "out"), "--set", "fmbseg.top_k=0"],
                                            cli_env(case)))
    results = {}
    for name, (case, out, proc) in runs.items():
        text, _ = proc.communicate(timeout=180)
        results[name] = (case, out, proc.returncode, text)
    return results


EXPECTED = {name: line for name, (_, line) in CASES.items()}
EXPECTED["luigi_cfg"] = ("pseudoseg: unknown key retry_cnt in [scheduler] (from {tmp}/luigi.cfg); "
                         "did you mean retry_count?")
EXPECTED["demo"] = "pseudoseg: [fmbseg] top_k = '0' (from --set fmbseg.top_k=0): must be an integer ≥ 1"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_a_bad_setting_is_one_line_exit_2_and_nothing_written(outcomes, name):
    case, out, code, text = outcomes[name]
    lines = [line for line in text.splitlines() if line.strip()]
    assert lines == [EXPECTED[name].format(tmp=case)], text
    assert code == 2
    assert "Traceback" not in text
    assert not out.exists()


def _luigi_cfg() -> configparser.ConfigParser:
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "luigi.cfg")
    return cfg


def test_luigi_cfg_is_all_known_and_valid():
    assert problems(_luigi_cfg(), lambda section, key: "luigi.cfg") == []


def test_known_keys_come_from_the_classes():
    # our luigi.Config sections, [models] (ModelSettings), a task-parameter section, Luigi's own, [resources]
    cfg = _luigi_cfg()
    cfg["train_use"]["epochs"] = "0"
    cfg["use"]["box_nms_thresh"] = "1.5"
    cfg["train_alignment"]["tempreature"] = "1"
    cfg["models"]["preset"] = "rael"
    cfg["Evaluate"] = {"limit": "-1", "benchmark": "voc22"}
    cfg["scheduler"]["retry_count"] = "x"
    cfg["resources"]["gpus"] = "1"
    lines = problems(cfg, lambda section, key: "test")
    # the presets other tests registered in this process are known too: only real and tiny are certain
    preset = lines.pop(2)
    assert preset.startswith("pseudoseg: [models] preset = 'rael' (from test): must be one of ")
    assert {"real", "tiny"} <= set(preset.split("one of ")[1].split(" (")[0].split(" | "))
    assert preset.endswith("(others come from [models] plugins)")
    assert lines == [
        "pseudoseg: [scheduler] retry_count = 'x' (from test): must be an integer",
        "pseudoseg: unknown key gpus in [resources] (from test); did you mean gpu?",
        "pseudoseg: [use] box_nms_thresh = '1.5' (from test): must be a number in [0, 1]",
        "pseudoseg: [train_use] epochs = '0' (from test): must be an integer ≥ 1",
        "pseudoseg: unknown key tempreature in [train_alignment] (from test); did you mean temperature?",
        "pseudoseg: [Evaluate] limit = '-1' (from test): must be an integer ≥ 0",
        "pseudoseg: [Evaluate] benchmark = 'voc22' (from test): must be one of " + " | ".join(
            Evaluate.benchmark._choices),
    ]


def test_a_renamed_key_says_its_new_name():
    cfg = _luigi_cfg()
    cfg["use"]["stability_thresh"] = "0.5"
    assert problems(cfg, lambda section, key: "old.cfg") == [
        "pseudoseg: [use] stability_thresh (from old.cfg) is now called stability_score_thresh"]


def test_declared_ranges_are_checked_and_described():
    assert IntParameter(ge=1).allowed() == "an integer ≥ 1"
    assert FloatParameter(ge=0, le=1).allowed() == "a number in [0, 1]"
    assert FloatParameter(gt=0).allowed() == "a number > 0"
    assert FloatParameter(ge=0, lt=1).allowed() == "a number in [0, 1)"
    with pytest.raises(ValueError, match="is not an integer ≥ 1"):
        IntParameter(ge=1).normalize(0)
    assert closest("ingset", ["ingest", "use", "core"]) == "ingest"

