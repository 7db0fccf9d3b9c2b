"""`pseudoseg` command line: run a stage (or the full DAG) locally or against luigid, start luigid, start
workers, and the offline demo. Thin: it builds Luigi tasks and prints the end-of-run summary."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import luigi
import luigi.cmdline
from luigi.execution_summary import LuigiStatusCode

from tasks.base import build_tasks, frozen_settings
from tasks.failures import FailFastWorkers
from tasks.params import name_problem
from tasks.settings import SettingsError, closest, configure
from tasks.summary import format_table, quarantine_notes, summarise


def stage_classes() -> dict[str, type[luigi.Task]]:
    """Every task `run STAGE` accepts, in DAG order (tasks.dag.STAGES)."""
    from tasks.dag import stage_classes

    return stage_classes()


def cmd_stages(args: argparse.Namespace) -> int:
    from tasks.dag import STAGES

    width = max(len(name) for name, _ in STAGES)
    for name, what in STAGES:
        print(f"{name:<{width}}  {what}")
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


def build(stage: str, images: str, dataset: str, out: str, *, workers: int = 1, central: bool = False,
          scheduler_host: str | None = None, scheduler_port: int | None = None,
          summary: bool = True) -> tuple[bool, list[str]]:
    """Run ``stage`` (and what it needs); (success, the one-line causes of failures no retry could fix)."""
    task = make_task(stage, images, dataset, out)
    factory = FailFastWorkers()
    kwargs: dict = {"workers": workers, "local_scheduler": not central, "worker_scheduler_factory": factory}
    if central:
        kwargs.update({k: v for k, v in (("scheduler_host", scheduler_host),
                                         ("scheduler_port", scheduler_port)) if v is not None})
    started = time.time()
    result = build_tasks([task], **kwargs)
    ok = result.status not in FAILED_STATUSES and (central or task.complete())
    if summary:
        print()
        print(format_table(summarise([task])))
        notes = quarantine_notes([task], since=started)
        if notes:
            print(f"\n{len(notes)} unit(s) failed verification or had an invalid done.json and were redone:")
            print("\n".join(f"  {note}" for note in notes))
    if not ok:
        sys.stdout.flush()
        print(f"\n{result.summary_text}", file=sys.stderr)
    return ok, factory.causes


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
    from pipeline.sample_set import write_sample_set

    out = Path(args.out).resolve()
    samples = write_sample_set(out / "demo" / "samples")
    ok, causes = build("FullDAG", str(samples.root), "demo", str(out), workers=1)
    print(f"\nDemo output under {out}/demo/<stage>/<params-hash>/: shard-NNNNNN.parquet (manifest), "
          f".rejects.parquet, .tar (WebDataset), .done.json; sample photos in {samples.root}, VOC ground truth in {samples.dest}/gt")
    print_causes(causes)
    return 0 if ok else 1


def cmd_luigid(args: argparse.Namespace) -> int:
    state = Path(args.out).resolve() / ".luigid"
    (state / "logs").mkdir(parents=True, exist_ok=True)
    print(f"luigid on port {args.port}; state {state}/state.pickle; UI http://localhost:{args.port}/")
    luigi.cmdline.luigid(["--port", str(args.port), "--state-path", str(state / "state.pickle"),
                          "--logdir", str(state / "logs")])
    return 0


def cmd_workers(args: argparse.Namespace) -> int:
    """N worker processes against a running luigid (on this host or ``--scheduler-host``): the scheduler hands
    each task (a shard, or a range of shards) to exactly one of them."""
    base = [sys.executable, "-m", "tasks.cli", "run", args.stage, "--images", args.images, "--out", args.out,
            "--central", "--scheduler-port", str(args.scheduler_port), "--no-summary"]
    if args.scheduler_host:
        base += ["--scheduler-host", args.scheduler_host]
    if args.dataset:
        base += ["--dataset", args.dataset]
    if args.config:
        base += ["--config", args.config]
    for item in args.set or []:
        base += ["--set", item]
    procs = [subprocess.Popen(base, env=os.environ.copy()) for _ in range(args.n)]
    codes = [p.wait() for p in procs]
    task = make_task(args.stage, args.images, args.dataset, args.out)
    print("\nall workers finished:")
    print(format_table(summarise([task])))
    return 0 if all(c == 0 for c in codes) and task.complete() else 1


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
    lg.set_defaults(func=cmd_luigid)

    wk = sub.add_parser("workers", help="start N worker processes against luigid")
    wk.add_argument("stage")
    wk.add_argument("--n", type=integer(1), default=2)
    wk.add_argument("--images", required=True)
    wk.add_argument("--dataset")
    wk.add_argument("--scheduler-host", help="luigid's host (default: [core] scheduler_host, localhost)")
    wk.add_argument("--scheduler-port", type=integer(1, 65535), default=8082)
    common(wk)
    wk.set_defaults(func=cmd_workers)
    return p


def check(args: argparse.Namespace) -> None:
    """Arguments and every setting, before anything runs or is written; SettingsError lists the problems."""
    lines: list[str] = []
    if hasattr(args, "stage"):
        classes = stage_classes()
        if args.stage not in classes:
            lines.append(f"pseudoseg: unknown stage {args.stage!r}; did you mean {closest(args.stage, classes)}?")
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
    args = parser().parse_args(argv)
    try:
        check(args)
    except SettingsError as e:
        print("\n".join(e.lines), file=sys.stderr)
        return 2
    with frozen_settings():  # nothing changes the settings from here on
        return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
