"""`pseudoseg` command line: run a stage (or the full DAG) locally or against luigid, start luigid, start
workers, and the offline demo. Thin: it builds Luigi tasks and prints the end-of-run summary."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import luigi
import luigi.cmdline
import luigi.configuration
import luigi.setup_logging
from luigi.execution_summary import LuigiStatusCode

from pseudoseg.pipeline.core.artifacts import params_hash
from pseudoseg.tasks.base import STAGE_BARS, build_tasks, frozen_settings
from pseudoseg.tasks.card import write_card
from pseudoseg.tasks.failures import FailFastWorkers
from pseudoseg.tasks.params import name_problem
from pseudoseg.tasks.settings import SettingsError, closest, configure
from pseudoseg.tasks.status import clean_stale, mark_latest, record_shard_counts, status_report
from pseudoseg.tasks.summary import RunInfo, footer, format_table, quarantine_notes, summarise, write_run_json

# Stage names before every stage was named after its folder (pseudoseg 2026-12): `run OLD` says the new name.
RENAMED = {
    "Captions": "UseCaptions", "Expressions": "UseExpressions", "Boxes": "UseBoxes", "BoxMasks": "UseBoxMasks",
    "PreviewShards": "UsePreviewShards", "Preview": "UsePreview", "ClipDense": "FmbsegDense", "Detections": "FmbsegDetect",
    "QueryPointMasks": "FmbsegQueryMasks", "AutoMaskLabels": "FmbsegAutoMasks", "PseudoLabels": "FmbsegLabels",
    "CaRLabels": "CarLabels", "UseFeatures": "FeaturesUse", "FmbsegFeatures": "FeaturesFmbseg",
    "UseTextEmbeddings": "UseText", "ClassTextEmbeddings": "TextClasses", "TrainUSEHead": "TrainUse",
}


def stage_classes() -> dict[str, type[luigi.Task]]:
    """Every task `run STAGE` accepts, in DAG order (tasks.dag.STAGES)."""
    from pseudoseg.tasks.dag import stage_classes

    return stage_classes()


def cmd_stages(args: argparse.Namespace) -> int:
    from pseudoseg.tasks.dag import STAGES

    width = max(len(stage.name) for stage in STAGES)
    for stage in STAGES:
        print(f"{stage.name:<{width}}  {stage.makes}")
    return 0


def make_task(stage: str, images: str, dataset: str, out: str) -> luigi.Task:
    classes = stage_classes()
    images = str(Path(images).resolve()) if Path(images).exists() else images
    return classes[stage](images=images, dataset=dataset, out=str(Path(out).resolve()))


# Under luigid, a worker that exits while another worker still runs (or was granted) some shards reports
# them as pending/not run: that is sharing, not failure. Only these outcomes are failures.
FAILED_STATUSES = {
    LuigiStatusCode.FAILED,
    LuigiStatusCode.FAILED_AND_SCHEDULING_FAILED,
    LuigiStatusCode.SCHEDULING_FAILED,
    LuigiStatusCode.MISSING_EXT,
}


LOGGERS = ("luigi-interface", "luigi")  # Luigi's worker/interface and scheduler loggers


@contextlib.contextmanager
def run_logging(log: Path, *, terminal_level: int) -> Iterator[None]:
    """For one build: Luigi's logging (INFO and up) goes to ``log``; the terminal (stderr) gets only
    ``terminal_level`` and up (WARNING for a local run: redone units, failures; INFO under luigid, as before).
    Luigi's own logging setup is skipped; what this adds is removed afterwards."""
    log.parent.mkdir(parents=True, exist_ok=True)
    to_file = logging.FileHandler(log, encoding="utf-8")
    to_file.setLevel(logging.INFO)
    to_file.setFormatter(logging.Formatter("%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"))
    to_terminal = logging.StreamHandler(sys.stderr)
    to_terminal.setLevel(terminal_level)
    to_terminal.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    # Luigi configures its logging once per process unless told it is done: it is (here).
    interface, configured = luigi.setup_logging.InterfaceLogging, luigi.setup_logging.InterfaceLogging._configured
    interface._configured = True
    saved = []
    for name in LOGGERS:
        logger = logging.getLogger(name)
        saved.append((logger, logger.level, logger.propagate, list(logger.handlers)))
        for handler in list(logger.handlers):  # a stream handler from an earlier luigi.build in this process
            logger.removeHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
        logger.addHandler(to_file)
        logger.addHandler(to_terminal)
    try:
        yield
    finally:
        interface._configured = configured
        for logger, level, propagate, handlers in saved:
            logger.removeHandler(to_file)
            logger.removeHandler(to_terminal)
            logger.setLevel(level)
            logger.propagate = propagate
            for handler in handlers:
                logger.addHandler(handler)
        to_file.close()


def settings_hash() -> str:
    """A short hash of every setting in effect (luigi.cfg + --config + --set): two runs with the same hash ran
    with the same configuration."""
    cfg = luigi.configuration.get_config()
    return params_hash({section: dict(cfg.items(section)) for section in sorted(cfg.sections())})


def build(stage: str, images: str, dataset: str, out: str, *, workers: int = 1, central: bool = False,
          scheduler_host: str | None = None, scheduler_port: int | None = None,
          summary: bool = True) -> tuple[bool, list[str]]:
    """Run ``stage`` (and what it needs); (success, the one-line causes of failures no retry could fix).
    Luigi logs to ``<out>/<dataset>/logs/run-<time>-<pid>.log``; the terminal shows one progress line per running
    stage (on a terminal, one local worker process) and, once at the end, the summary table, which is also
    written as ``run.json`` beside the dataset card (``README.md``)."""
    task = make_task(stage, images, dataset, out)
    factory = FailFastWorkers()
    kwargs: dict = {"workers": workers, "local_scheduler": not central, "worker_scheduler_factory": factory}
    if central:
        kwargs.update({k: v for k, v in (("scheduler_host", scheduler_host),
                                         ("scheduler_port", scheduler_port)) if v is not None})
    started = time.time()
    root = Path(out).resolve() / dataset
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(started))
    log = root / "logs" / f"run-{stamp}-{os.getpid()}.log"
    record_shard_counts([task])
    if summary and workers == 1 and not central:
        STAGE_BARS.activate(sys.stderr)
    try:
        with run_logging(log, terminal_level=logging.INFO if central else logging.WARNING):
            result = build_tasks([task], **kwargs)
    finally:
        STAGE_BARS.close()
    ok = result.status not in FAILED_STATUSES and (central or task.complete())
    mark_latest([task])  # every stage whose shards are all done: <stage>/latest -> this run's hash folder
    if summary:
        report(task, stage, images, dataset, out, started=started, ok=ok, log=log, causes=factory.causes)
    if not ok:
        sys.stdout.flush()
        print(f"\n{result.summary_text}", file=sys.stderr)
    return ok, factory.causes


def report(task: luigi.Task, stage: str, images: str, dataset: str, out: str, *, started: float, ok: bool,
           log: Path | None, causes: list[str]) -> None:
    """The end of a run, once: run.json and the dataset card written, then the table (DAG order) and its footer
    (outputs, ran/skipped, where the record, card and log are) printed."""
    rows = summarise([task], since=started)
    info = RunInfo(command=stage, dataset=dataset, root=Path(out).resolve() / dataset, images=images,
                   started=started, ended=time.time(), ok=ok, log=log, settings_hash=settings_hash(),
                   causes=list(causes))
    write_run_json(rows, info)
    write_card(rows, info)
    print()
    print(format_table(rows))
    print(footer(rows, info))
    notes = quarantine_notes([task], since=started)
    if notes:
        print(f"\n{len(notes)} unit(s) failed verification or had an invalid done.json and were redone:")
        print("\n".join(f"  {note}" for note in notes))


def print_causes(causes: list[str]) -> None:
    """The last lines of a run: each failure no retry can fix, once (tasks.failures)."""
    sys.stdout.flush()
    for cause in causes:
        print(f"pseudoseg: failed, not retried: {cause}", file=sys.stderr, flush=True)


def cmd_run(args: argparse.Namespace) -> int:
    ok, causes = build(args.stage, args.images, args.dataset, args.out, workers=args.workers,
                       central=args.central, scheduler_host=args.scheduler_host,
                       scheduler_port=args.scheduler_port, summary=not args.no_summary)
    print_causes(causes)
    return 0 if ok else 1


# The demo's settings (thresholds random tiny models can reach, and why): read after luigi.cfg, before --config.
DEMO_CONFIG = Path(__file__).resolve().parent.parent / "demo.cfg"  # the repository root, beside luigi.cfg


def cmd_demo(args: argparse.Namespace) -> int:
    from pseudoseg.pipeline.core.sample_set import write_sample_set

    out = Path(args.out).resolve()
    samples = write_sample_set(out / "demo" / "samples")
    ok, causes = build("FullDAG", str(samples.root), "demo", str(out), workers=1)
    print(f"\nDemo output under {out}/demo/<stage>/latest/ (-> <params-hash>/): shard-NNNNNN.parquet (rows), "
          f".tar (WebDataset), _rejects/, _meta/ (done.json records, params.json); what each folder holds, its "
          f"schema and how to read it: {out}/demo/README.md; sample photos in {samples.root}, VOC ground truth in "
          f"{samples.dest}/gt; `pseudoseg status {out}`")
    print_causes(causes)
    return 0 if ok else 1


def cmd_luigid(args: argparse.Namespace) -> int:
    state = Path(args.out).resolve() / ".luigid"
    (state / "logs").mkdir(parents=True, exist_ok=True)
    # luigid counts [resources] over every worker of every host: its gpu pool is cluster-wide, not per host.
    luigi.configuration.get_config().set("resources", "gpu", str(args.gpu_slots))
    print(f"luigid on port {args.port}; state {state}/state.pickle; UI http://localhost:{args.port}/; "
          f"GPU tasks at once, cluster-wide: {args.gpu_slots}")
    luigi.cmdline.luigid(["--port", str(args.port), "--state-path", str(state / "state.pickle"),
                          "--logdir", str(state / "logs")])
    return 0


def cmd_workers(args: argparse.Namespace) -> int:
    """N worker processes against a running luigid (on this host or ``--scheduler-host``): the scheduler hands
    each task (a shard, or a range of shards) to exactly one of them."""
    base = [sys.executable, "-m", "pseudoseg.tasks.cli", "run", args.stage, "--images", args.images, "--out", args.out,
            "--central", "--scheduler-port", str(args.scheduler_port), "--no-summary"]
    if args.scheduler_host:
        base += ["--scheduler-host", args.scheduler_host]
    if args.dataset:
        base += ["--dataset", args.dataset]
    if args.config:
        base += ["--config", args.config]
    for item in args.set or []:
        base += ["--set", item]
    started = time.time()
    procs = [subprocess.Popen(base, env=worker_env(i, args.gpus)) for i in range(args.n)]
    codes = [p.wait() for p in procs]
    task = make_task(args.stage, args.images, args.dataset, args.out)
    ok = all(c == 0 for c in codes) and task.complete()
    mark_latest([task])
    print("\nall workers finished (each logs to <out>/<dataset>/logs/run-<time>-<pid>.log):")
    report(task, args.stage, args.images, args.dataset, args.out, started=started, ok=ok, log=None, causes=[])
    return 0 if ok else 1


def worker_env(index: int, gpus: list[str] | None) -> dict[str, str]:
    """Worker ``index``'s environment: pinned to one of ``gpus`` (round robin) through CUDA_VISIBLE_DEVICES."""
    env = os.environ.copy()
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = gpus[index % len(gpus)]
    return env


def gpu_list(text: str) -> list[str]:
    """argparse type: comma-separated CUDA device indices or UUIDs, e.g. 0,1,2,3."""
    items = [item.strip() for item in text.split(",")]
    if not all(items):
        raise argparse.ArgumentTypeError(f"must be comma-separated GPU indices, e.g. 0,1,2,3; got {text!r}")
    return items


def cmd_status(args: argparse.Namespace) -> int:
    text, failed = status_report(Path(args.out).resolve(), args.dataset)
    print(text)
    return 1 if failed else 0


def cmd_clean(args: argparse.Namespace) -> int:
    if not args.stale:
        print("pseudoseg: clean: say what to remove: --stale (hash folders that are not their stage's latest)",
              file=sys.stderr)
        return 2
    return clean_stale(Path(args.out).resolve(), args.dataset, yes=args.yes, interactive=sys.stdin.isatty())


class OneLineParser(argparse.ArgumentParser):
    """A usage error is one line (and exit status 2), like a bad setting."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def integer(low: int, high: int | None = None) -> Callable[[str], int]:
    """argparse type: an integer in [low, high]."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(
                f"must be an integer {f'in [{low}, {high}]' if high is not None else f'≥ {low}'}, got {text!r}")
        return value

    return parse


def parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="pseudoseg", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--out", default="out", help="output root (default: out)")
        sp.add_argument("--config", help="extra luigi.cfg to read after the default one")
        sp.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                        help="override a config value, e.g. --set ingest.shard_size=500")

    stages = sub.add_parser("stages", help="every task `run` accepts, in DAG order, with what it makes")
    stages.set_defaults(func=cmd_stages)

    run = sub.add_parser("run", help="run one stage (and what it needs) over a dataset; see `pseudoseg stages`")
    run.add_argument("stage")
    run.add_argument("--images", required=True, help="folder, .txt/.parquet list, or WebDataset tars")
    run.add_argument("--dataset", help="dataset name, the folder under --out (default: the images folder's name)")
    run.add_argument("--workers", type=integer(1), default=1, help="worker processes (≥ 1)")
    run.add_argument("--central", action="store_true", help="use the luigid scheduler instead of a local one")
    run.add_argument("--scheduler-host")
    run.add_argument("--scheduler-port", type=integer(1, 65535))
    run.add_argument("--no-summary", action="store_true", help="skip the end-of-run table (workers print one)")
    common(run)
    run.set_defaults(func=cmd_run)

    demo = sub.add_parser("demo", help="full DAG on the embedded sample set with the tiny preset, offline")
    common(demo)
    demo.set_defaults(func=cmd_demo)

    lg = sub.add_parser("luigid", help="start the central scheduler (state under <out>/.luigid)")
    lg.add_argument("--out", default="out")
    lg.add_argument("--port", type=integer(1, 65535), default=8082)
    lg.add_argument("--gpu-slots", type=integer(1), default=1024,
                    help="model tasks running at once in the whole cluster (luigid's [resources] gpu; default: "
                         "no cap, each worker process has its own GPU: workers --gpus)")
    lg.set_defaults(func=cmd_luigid)

    wk = sub.add_parser("workers", help="start N worker processes against luigid")
    wk.add_argument("stage")
    wk.add_argument("--n", type=integer(1), default=2)
    wk.add_argument("--images", required=True)
    wk.add_argument("--dataset")
    wk.add_argument("--scheduler-host", help="luigid's host (default: [core] scheduler_host, localhost)")
    wk.add_argument("--scheduler-port", type=integer(1, 65535), default=8082)
    wk.add_argument("--gpus", type=gpu_list, help="pin worker i to GPU gpus[i %% len] (CUDA_VISIBLE_DEVICES), "
                                                   "e.g. --n 4 --gpus 0,1,2,3 on a 4-GPU host")
    common(wk)
    wk.set_defaults(func=cmd_workers)

    st = sub.add_parser("status", help="per stage and hash folder: shards done/pending/failed, rows, rejects by "
                                       "reason, which is latest; exit 1 if a shard failed")
    st.add_argument("out", nargs="?", default="out", help="output root (default: out)")
    st.add_argument("--dataset", help="only this dataset (default: every dataset under OUT)")
    st.set_defaults(func=cmd_status)

    cl = sub.add_parser("clean", help="--stale: remove hash folders that are not their stage's latest")
    cl.add_argument("out", nargs="?", default="out", help="output root (default: out)")
    cl.add_argument("--dataset", help="only this dataset (default: every dataset under OUT)")
    cl.add_argument("--stale", action="store_true", help="remove every hash folder its stage's latest does not name")
    cl.add_argument("--yes", action="store_true", help="do not ask (needed without a terminal)")
    cl.set_defaults(func=cmd_clean)
    return p


def check(args: argparse.Namespace) -> None:
    """Arguments and every setting, before anything runs or is written; SettingsError lists the problems."""
    lines: list[str] = []
    if hasattr(args, "stage"):
        classes = stage_classes()
        if args.stage in RENAMED:
            lines.append(f"pseudoseg: stage {args.stage!r} is now called {RENAMED[args.stage]!r} (every stage is "
                         "named after its output folder: `pseudoseg stages` lists them)")
        elif args.stage not in classes:
            lines.append(f"pseudoseg: unknown stage {args.stage!r}; did you mean {closest(args.stage, classes)}?")
    if args.command in ("status", "clean"):  # read the tree only: no settings involved
        if args.dataset and name_problem(args.dataset):
            raise SettingsError([f"pseudoseg: --dataset {args.dataset!r} must be a plain name, the folder under "
                                 f"OUT: {name_problem(args.dataset)}"])
        return
    if hasattr(args, "images"):
        args.dataset = args.dataset or Path(args.images).name
        problem = name_problem(args.dataset)
        if problem:
            lines.append(f"pseudoseg: --dataset {args.dataset!r} must be a plain name, the folder under --out "
                         f"(no '/', '\\' or '..'): {problem}")
    presets = [str(DEMO_CONFIG)] if args.command == "demo" else []
    try:
        configure(getattr(args, "config", None), getattr(args, "set", None) or [], presets=presets)
    except SettingsError as e:
        lines += e.lines
    if lines:
        raise SettingsError(lines)


def main(argv: list[str] | None = None) -> int:
    # The terminal shows our progress lines, not one bar per model file loaded (Hugging Face reads this once,
    # at import: the model stages import it later).
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    args = parser().parse_args(argv)
    try:
        check(args)
    except SettingsError as e:
        print("\n".join(e.lines), file=sys.stderr)
        return 2
    with frozen_settings():  # nothing changes the settings from here on
        try:
            return args.func(args)
        except BrokenPipeError:  # `pseudoseg stages | head`: the reader left; not an error of ours
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
            return 0


if __name__ == "__main__":
    sys.exit(main())
