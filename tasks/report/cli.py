"""`pseudoseg` command line: run a stage (or the full DAG) locally or against luigid, start luigid, start
workers, and the offline demo. Thin: it builds Luigi tasks and prints the end-of-run summary."""

from __future__ import annotations

import argparse
import configparser
import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import luigi
import luigi.cmdline
import luigi.configuration
import luigi.execution_summary
import luigi.setup_logging
from luigi.execution_summary import LuigiStatusCode

from pseudoseg.models.registry import random_models_notice
from pseudoseg.pipeline.core.artifacts import atomic_write_bytes, params_hash
from pseudoseg.pipeline.core.sources import SourceError, source_problem
from pseudoseg.tasks.engine.base import (
    build_tasks,
    cached_listing,
    current,
    frozen_settings,
    model_settings,
    pseudoseg,
)
from pseudoseg.tasks.engine.failures import FailFastWorkers
from pseudoseg.tasks.engine.params import name_problem
from pseudoseg.tasks.engine.progress import STAGE_PROGRESS
from pseudoseg.tasks.engine.settings import (
    DATASET_SETTINGS,
    DEMO_CONFIG,
    SettingsError,
    closest,
    configure,
    content_settings,
    effective_settings,
    load_config_files,
    write_dataset_settings,
)
from pseudoseg.tasks.report.card import write_card
from pseudoseg.tasks.report.status import (
    clean_stale,
    mark_latest,
    record_shard_counts,
    run_lease,
    settings_changes,
    status_report,
)
from pseudoseg.tasks.report.summary import (
    RunInfo,
    footer,
    format_table,
    output_of,
    quarantine_notes,
    summarise,
    write_run_json,
)

# Stage names before every stage was named after its folder (pseudoseg 2026-12): `run OLD` says the new name.
RENAMED = {
    "Captions": "UseCaptions", "Expressions": "UseExpressions", "Boxes": "UseBoxes", "BoxMasks": "UseBoxMasks",
    "PreviewShards": "UsePreviewShards", "Preview": "UsePreview", "ClipDense": "FmbsegDense", "Detections": "FmbsegDetect",
    "QueryPointMasks": "FmbsegQueryMasks", "AutoMaskLabels": "FmbsegAutoMasks", "PseudoLabels": "FmbsegLabels",
    "CaRLabels": "CarLabels", "UseFeatures": "FeaturesUse", "FmbsegFeatures": "FeaturesFmbseg",
    "UseTextEmbeddings": "UseText", "ClassTextEmbeddings": "TextClasses", "TrainUSEHead": "TrainUse",
}


def stage_classes() -> dict[str, type[luigi.Task]]:
    """Every task `run STAGE` accepts, in DAG order (tasks.stages.catalog)."""
    from pseudoseg.tasks.stages.dag import stage_classes

    return stage_classes()


def cmd_stages(args: argparse.Namespace) -> int:
    from pseudoseg.tasks.stages.catalog import stage_index

    width = max(len(stage.name) for stage in stage_index())
    for stage in stage_index():
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
          summary: bool = True, recorded: Path | None = None) -> tuple[bool, list[str]]:
    """Run ``stage`` (and what it needs); (success, one line per failure: the causes no retry could fix, then the
    tasks that failed after their retries, each with its error and the log).
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
    settings = content_settings()
    count = recorded_count(recorded) if recorded is not None and summary else 0
    if count:
        print(f"pseudoseg: using the settings {root} was made with ({recorded}: {count} value(s) other than "
              "luigi.cfg's); --set or --config change them, --fresh-settings starts from luigi.cfg", file=sys.stderr)
    write_dataset_settings(root / DATASET_SETTINGS, settings)  # the next run on this dataset starts from them
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(started))
    log = root / "logs" / f"run-{stamp}-{os.getpid()}.log"
    # tqdm lines on a terminal when this process runs every task; plain progress lines otherwise
    STAGE_PROGRESS.activate(sys.stderr, bars=workers == 1 and not central, every=current(pseudoseg).progress_seconds,
                            name_of=lambda folder: output_of(folder).name)
    try:
        with run_lease(root, current(pseudoseg).lock_stale_seconds) as lease:  # clean --stale keeps our folders
            lease(record_shard_counts([task]))  # every stage's folder: the ingest plan is made here if not done
            if summary:
                say_settings_changes(task)
            with run_logging(log, terminal_level=logging.INFO if central else logging.WARNING):
                result = build_tasks([task], **kwargs)
            mark_latest([task])  # every stage whose shards are all done: <stage>/latest -> this run's hash folder
    finally:
        STAGE_PROGRESS.close()
    ok = result.status not in FAILED_STATUSES and (central or task.complete())
    failures = [f"failed, not retried: {cause}" for cause in factory.causes]
    failures += [f"failed: {line} (log: {log})" for line in factory.failures]
    failures += not_run_lines(result, central)
    with open(log, "a", encoding="utf-8") as file:  # Luigi's own account of the run, for whoever reads the log
        file.write(f"\n{result.summary_text}\n")
    if summary:
        report(task, stage, images, dataset, out, started=started, ok=ok, log=log, causes=failures)
    if not ok and not failures:
        sys.stdout.flush()
        print(f"\n{result.summary_text}", file=sys.stderr)
    if not summary:  # a worker of `pseudoseg workers`: its parent reports what failed here
        atomic_write_bytes(log.with_suffix(".failures.json"), json.dumps({"ok": ok, "failures": failures}).encode())
    return ok, failures


def not_run_lines(result: luigi.execution_summary.LuigiRunResult, central: bool) -> list[str]:
    """Under luigid: tasks it did not hand to this worker although nothing upstream failed — it disabled them
    after repeated failures (``[scheduler] retry_count``), and keeps them disabled across runs."""
    if not central:
        return []
    not_run = luigi.execution_summary._summary_dict(result.worker).get("not_run", set())
    not_run = {t for t in not_run if not any(dep in not_run for dep in t._requires())}  # not the ones waiting on them
    if not not_run:
        return []
    names = sorted({t.task_family.removesuffix("ShardRange").removesuffix("Shard") for t in not_run})
    return [f"luigid did not hand out {len(not_run)} task(s) of {', '.join(names)}: it disables a task that failed "
            f"[scheduler] retry_count times and keeps it disabled across runs; re-enable it in luigid's web page "
            f"(http://<scheduler-host>:<port>/, the task's 'Re-enable' button) or restart luigid, then rerun"]


def recorded_count(path: Path) -> int:
    """How many values a dataset's settings.cfg holds."""
    parser = configparser.RawConfigParser()
    try:
        parser.read(path)
    except configparser.Error:
        return 0
    return sum(len(parser.options(section)) for section in parser.sections())


def say_settings_changes(task: luigi.Task) -> None:
    """One line before a run whose settings make new folders for stages that have a ``latest``: which, and what
    differs (their ``latest`` moves to the new folders when the run completes them)."""
    changes = settings_changes([task])
    if not changes:
        return
    own = [f"{output_of(stage).name} ({', '.join(diffs[:3])}{', …' if len(diffs) > 3 else ''})"
           for stage, diffs in changes if diffs]
    print(f"pseudoseg: {len(changes)} stage(s) run with settings other than their latest results'"
          + (f": {'; '.join(own[:4])}{'; …' if len(own) > 4 else ''}" if own else " (an upstream stage changed)")
          + f"{' and their downstream stages' if len(changes) > len(own) and own else ''}; new folders, and `latest` "
          "moves to them when this run completes them", file=sys.stderr)


def report(task: luigi.Task, stage: str, images: str, dataset: str, out: str, *, started: float, ok: bool,
           log: Path | None, causes: list[str]) -> None:
    """The end of a run, once: run.json and the dataset card written, then the table (DAG order) and its footer
    (outputs, ran/skipped, where the record, card and log are) printed."""
    rows = summarise([task], since=started, durations=STAGE_PROGRESS.durations)
    ok = ok and all(r.done == r.shards for r in rows)  # a stage with a failed or missing shard: the run failed
    info = RunInfo(command=stage, dataset=dataset, root=Path(out).resolve() / dataset, images=images,
                   started=started, ended=time.time(), ok=ok, log=log, settings_hash=settings_hash(),
                   causes=list(causes), notice=random_models_notice(model_settings()))
    write_run_json(rows, info)
    write_card(rows, info)
    print()
    print(format_table(rows))
    print(footer(rows, info))
    notes = quarantine_notes([task], since=started)
    if notes:
        print(f"\n{len(notes)} unit(s) failed verification or had an invalid done.json and were redone:")
        print("\n".join(f"  {note}" for note in notes))


def print_causes(failures: list[str]) -> None:
    """The last lines of a run: each failure once (``build``)."""
    sys.stdout.flush()
    for line in failures:
        print(f"pseudoseg: {line}", file=sys.stderr, flush=True)


def listing_problem(images: str) -> tuple[int, str] | None:
    """(exit status, one line) when ``images`` lists no entry or cannot be listed; None when it has entries."""
    try:
        listing = cached_listing(images)  # with the [storage] and [ingest] allow_urls settings in effect
    except SourceError as exc:
        return 2, f"pseudoseg: --images {exc}"
    if not listing.entries:
        return 1, (f"pseudoseg: no images found in {images} (folders are searched recursively for files with an "
                   "image extension or none; hidden files are skipped)")
    return None


def cmd_run(args: argparse.Namespace) -> int:
    stop_on_sigterm()
    problem = listing_problem(args.images)
    if problem:
        print(problem[1], file=sys.stderr)
        return problem[0]
    ok, causes = build(args.stage, args.images, args.dataset, args.out, workers=args.workers,
                       central=args.central, scheduler_host=args.scheduler_host,
                       scheduler_port=args.scheduler_port, summary=not args.no_summary, recorded=args.recorded)
    print_causes(causes)
    return 0 if ok else 1


def cmd_demo(args: argparse.Namespace) -> int:
    from pseudoseg.pipeline.core.sample_set import write_sample_set

    out = Path(args.out).resolve()
    samples = write_sample_set(out / "demo" / "samples")
    ok, causes = build("FullDAG", str(samples.root), "demo", str(out), workers=1, recorded=args.recorded)
    print(f"\nDemo output under {out}/demo/<stage>/latest/ (-> <params-hash>/): shard-NNNNNN.parquet (rows), "
          f".tar (WebDataset), _rejects/, _meta/ (done.json records, params.json); what each folder holds, its "
          f"schema and how to read it: {out}/demo/README.md; sample photos in {samples.root}, VOC ground truth in "
          f"{samples.dest}/gt; `{command_name()} status {out}`")
    print_causes(causes)
    return 0 if ok else 1


def command_name() -> str:
    """How the user can type this command again: ``pseudoseg`` when that is on PATH, else its full path."""
    script = Path(sys.argv[0]).resolve() if sys.argv and sys.argv[0] else None
    on_path = shutil.which("pseudoseg")
    if on_path and script is not None and Path(on_path).resolve() == script:
        return "pseudoseg"
    installed = Path(sys.executable).with_name("pseudoseg")
    return str(installed) if installed.exists() else "pseudoseg"


def cmd_luigid(args: argparse.Namespace) -> int:
    from pseudoseg.tasks.report.luigid import (
        LEGACY_STATE,
        LOOPBACK,
        STATE_FILE,
        make_private_folder,
        state_folder,
        state_problem,
    )

    out = Path(args.out).resolve()
    if args.state_path:
        state = Path(args.state_path).expanduser().absolute()
    else:
        make_private_folder(state_folder())
        state = state_folder() / STATE_FILE
    problem = state_problem(state, out)
    if problem:
        print(f"pseudoseg: luigid: refusing the state file {state}: {problem}; give --state-path a file in a folder "
              f"only you can write to, outside --out", file=sys.stderr)
        return 2
    if (out / LEGACY_STATE).exists():
        print(f"pseudoseg: luigid: {out / LEGACY_STATE} (kept there by an older pseudoseg) is not loaded; "
              f"delete it", file=sys.stderr)
    (state.parent / "logs").mkdir(parents=True, exist_ok=True)
    address = args.address or LOOPBACK
    port = args.port or free_port(address)
    if args.announce:  # `pseudoseg slurm`: the workers read luigid's host and port from this file once it listens
        announce_when_listening(Path(args.announce), address, port)
    # luigid counts [resources] over every worker of every host: its gpu pool is cluster-wide, not per host.
    luigi.configuration.get_config().set("resources", "gpu", str(args.gpu_slots))
    exposed = "" if address in (LOOPBACK, "localhost", "::1") else (
        f" (WARNING: luigid has no authentication; anyone who reaches {address}:{port} can read and schedule "
        f"tasks)")
    print(f"luigid on {address}:{port}{exposed}; state {state}; UI http://{address}:{port}/; "
          f"GPU tasks at once, cluster-wide: {args.gpu_slots}", flush=True)
    luigi.cmdline.luigid(["--port", str(port), "--address", address, "--state-path", str(state),
                          "--logdir", str(state.parent / "logs")])
    return 0


def free_port(address: str) -> int:
    """A port nobody listens on at ``address`` now (``luigid --port 0``)."""
    import socket

    with socket.socket() as sock:
        sock.bind((address, 0))
        return sock.getsockname()[1]


def announce_when_listening(path: Path, address: str, port: int) -> None:
    """Write ``{"host", "port", "pid", "job"}`` to ``path`` (atomically) once ``address:port`` accepts connections:
    the file a Slurm array's workers wait for. A thread, as luigid blocks this one."""
    import socket
    import threading

    def announce() -> None:
        while True:
            try:
                socket.create_connection((address, port), timeout=2).close()
                break
            except OSError:
                time.sleep(0.2)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, json.dumps({"host": address, "port": port, "pid": os.getpid(),
                                             "job": os.environ.get("SLURM_JOB_ID")}).encode())

    threading.Thread(target=announce, daemon=True, name="announce-luigid").start()


def forward_signals(procs: list[subprocess.Popen]) -> None:
    """SIGTERM and SIGUSR1 sent to this process (a Slurm batch script's ``kill``, ``--signal=B:USR1@...``) go on to
    each worker process: SIGUSR1 lets each finish the task it runs and stop, SIGTERM abandons it (``stop_on``)."""
    import signal

    def forward(signum: int, _frame: object) -> None:
        for proc in procs:
            if proc.poll() is None:
                with contextlib.suppress(OSError):
                    proc.send_signal(signum)

    for signum in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(signum, forward)


def stop_on_sigterm() -> None:
    """SIGTERM (Slurm's preemption, scancel, a time limit) as Ctrl-C: the shard in progress is abandoned — its
    temporaries and lock removed, nothing committed — and the command ends (status 130); a rerun or a requeued
    array task redoes exactly that shard. A second SIGTERM while that happens is ignored."""
    import signal

    def interrupt(signum: int, _frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def cmd_workers(args: argparse.Namespace) -> int:
    """N worker processes against a running luigid (on this host or ``--scheduler-host``): the scheduler hands
    each task (a shard, or a range of shards) to exactly one of them."""
    problem = listing_problem(args.images)
    if problem:
        print(problem[1], file=sys.stderr)
        return problem[0]
    base = [sys.executable, "-m", "pseudoseg.tasks.report.cli", "run", args.stage, "--images", args.images, "--out", args.out,
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
    with run_lease(Path(args.out).resolve() / args.dataset, current(pseudoseg).lock_stale_seconds):
        procs: list[subprocess.Popen] = []
        forward_signals(procs)
        procs += [subprocess.Popen(base, env=worker_env(i, args.gpus)) for i in range(args.n)]
        codes = [p.wait() for p in procs]
        task = make_task(args.stage, args.images, args.dataset, args.out)
        # one task of a Slurm array: the others may still be running what is left
        ok = all(c == 0 for c in codes) and (args.array_task or task.complete())
        mark_latest([task])
    logs = Path(args.out).resolve() / args.dataset / "logs"
    failures: list[str] = []
    log = None
    for proc in procs:  # what each worker recorded beside its log (build, summary off)
        for path in sorted(logs.glob(f"run-*-{proc.pid}.failures.json")):
            found = json.loads(path.read_text()).get("failures", [])
            failures += [line for line in found if line not in failures]
            log = log or (path.with_name(path.name.removesuffix(".failures.json") + ".log") if found else None)
    if codes and not any(logs.glob(f"run-*-{procs[0].pid}.failures.json")) and not ok:
        failures.append(f"failed: worker processes exited with status {', '.join(map(str, codes))} "
                        "(their output is above)")
    print("\nall workers finished (each logs to <out>/<dataset>/logs/run-<time>-<pid>.log):")
    report(task, args.stage, args.images, args.dataset, args.out, started=started, ok=ok, log=log, causes=failures)
    print_causes(failures)
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


def cmd_slurm(args: argparse.Namespace) -> int:
    """Submit (or with --dry-run print) the luigid job and the workers' array (``tasks.report.slurm``)."""
    from pseudoseg.tasks.report.slurm import (
        SlurmJob,
        SubmitError,
        luigid_script,
        previous_submissions,
        submit,
    )

    out = Path(args.out).resolve()
    images = str(Path(args.images).resolve()) if Path(args.images).exists() else args.images
    settings: list[str] = []
    if args.config:
        settings += ["--config", str(Path(args.config).resolve())]
    for item in args.set or []:
        settings += ["--set", item]
    if args.fresh_settings:
        settings.append("--fresh-settings")
    job = SlurmJob(stage=args.stage, images=images, dataset=args.dataset, out=out, nodes=args.nodes,
                   gpus_per_node=args.gpus_per_node, workers_per_node=args.workers_per_node,
                   cpus_per_worker=args.cpus_per_worker, partition=args.partition, time=args.time,
                   account=args.account, signal_seconds=args.signal_seconds, sbatch_args=tuple(args.sbatch_arg),
                   settings=tuple(settings))
    if args.dry_run:
        from pseudoseg.tasks.report.slurm import workers_script

        print(f"# {job.folder}/luigid.sbatch\n{luigid_script(job)}\n# {job.folder}/workers.sbatch\n"
              f"{workers_script(job)}", end="")
        return 0
    earlier = previous_submissions(out, args.dataset)
    if earlier and not args.resume:
        last = earlier[-1]
        print(f"pseudoseg: slurm: {args.dataset} was submitted before ({last['submitted']}: luigid job "
              f"{last['luigid_job']}, workers {last['workers_job']}); --resume submits again and runs only what is "
              "missing", file=sys.stderr)
        return 2
    problem = listing_problem(args.images)
    if problem:
        print(problem[1], file=sys.stderr)
        return problem[0]
    try:
        record = submit(job)
    except SubmitError as exc:
        print(f"pseudoseg: slurm: {exc}", file=sys.stderr)
        return 1
    logs = out / args.dataset / "logs"
    print(f"submitted {args.stage} on {args.dataset}: luigid job {record['luigid_job']}, workers array "
          f"{record['workers_job']} ({job.nodes} task(s) x {job.workers} worker(s)); scripts in {job.folder}; logs "
          f"{logs}/slurm-*.log; progress: {command_name()} status {out} --dataset {args.dataset}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    """Every setting in effect and where it came from (as ``git config --list --show-origin``)."""
    for origin, section, key, value in effective_settings(args.origins, defaults_only=args.defaults):
        print(f"{origin}\t{section}.{key}={value}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    text, failed = status_report(Path(args.out).resolve(), args.dataset)
    print(text)
    return 1 if failed else 0


def cmd_clean(args: argparse.Namespace) -> int:
    if not args.stale:
        print("pseudoseg: clean: say what to remove: --stale (hash folders that are not their stage's latest)",
              file=sys.stderr)
        return 2
    return clean_stale(Path(args.out).resolve(), args.dataset, yes=args.yes, interactive=sys.stdin.isatty(),
                       force=args.force, stale_after=current(pseudoseg).lock_stale_seconds)


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
        sp.add_argument("--fresh-settings", action="store_true",
                        help="ignore the settings the dataset was made with (<out>/<dataset>/settings.cfg): start "
                             "from luigi.cfg")

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

    lg = sub.add_parser("luigid", help="start the central scheduler (on 127.0.0.1; state in a per-user folder)")
    lg.add_argument("--out", default="out", help="the output root the workers write to (luigid's state is never "
                                                 "kept there)")
    lg.add_argument("--port", type=integer(0, 65535), default=8082, help="0: a free port (see --announce)")
    lg.add_argument("--announce", metavar="FILE", help="once listening, write {host, port} to FILE as JSON (how "
                    "`pseudoseg slurm`'s workers find luigid)")
    lg.add_argument("--address", help="interface to listen on (default 127.0.0.1; luigid has no authentication: "
                                      "see the README's Security section before exposing it)")
    lg.add_argument("--state-path", help="luigid's pickled state (default $XDG_STATE_HOME/pseudoseg/luigid/"
                                         "state.pickle or ~/.local/state/...); refused inside --out or in a folder "
                                         "others can write to")
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
    wk.add_argument("--array-task", action="store_true", help=argparse.SUPPRESS)  # one task of `pseudoseg slurm`
    wk.add_argument("--gpus", type=gpu_list, help="pin worker i to GPU gpus[i %% len] (CUDA_VISIBLE_DEVICES), "
                                                   "e.g. --n 4 --gpus 0,1,2,3 on a 4-GPU host")
    common(wk)
    wk.set_defaults(func=cmd_workers)

    sl = sub.add_parser("slurm", help="submit STAGE to Slurm: luigid as one job, the workers as a job array (one "
                                      "task per node, one worker per GPU); --dry-run prints the sbatch scripts")
    sl.add_argument("stage")
    sl.add_argument("--images", required=True, help="folder, list, tars, or s3://... (on storage every node reads)")
    sl.add_argument("--dataset", help="dataset name, the folder under --out (default: the images folder's name)")
    sl.add_argument("--nodes", type=integer(1), default=1, help="array tasks, one per node (default 1)")
    sl.add_argument("--gpus-per-node", type=integer(0), default=0,
                    help="GPUs per array task (--gres=gpu:G), one worker process each; 0: CPU workers")
    sl.add_argument("--workers-per-node", type=integer(1),
                    help="worker processes per array task (default: --gpus-per-node, or 1 without GPUs)")
    sl.add_argument("--cpus-per-worker", type=integer(1), default=1, help="CPUs per worker process (default 1)")
    sl.add_argument("--partition")
    sl.add_argument("--time", help="time limit of each job, as sbatch --time takes it (e.g. 4:00:00)")
    sl.add_argument("--account")
    sl.add_argument("--signal-seconds", type=integer(1), default=120,
                    help="SIGUSR1 this long before a time limit: each worker finishes its task, the array task "
                         "requeues itself (default 120)")
    sl.add_argument("--sbatch-arg", action="append", default=[], metavar="ARG",
                    help="one more #SBATCH line for both jobs, e.g. --sbatch-arg=--qos=high (repeatable)")
    sl.add_argument("--dry-run", action="store_true", help="print the two sbatch scripts; submit nothing")
    sl.add_argument("--resume", action="store_true",
                    help="submit again for a dataset submitted before (what is done is kept; the rest is run)")
    common(sl)
    sl.set_defaults(func=cmd_slurm)

    cf = sub.add_parser("config", help="every setting in effect and where it came from (file:line, --set, default)")
    cf.add_argument("--out", default="out", help="output root (with --dataset: that dataset's recorded settings too)")
    cf.add_argument("--dataset", help="include the settings this dataset was made with (<out>/<dataset>/settings.cfg)")
    cf.add_argument("--defaults", action="store_true", help="the code's defaults, whatever the files say")
    cf.add_argument("--config", help="extra luigi.cfg to read after the default one")
    cf.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a config value")
    cf.set_defaults(func=cmd_config)

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
    cl.add_argument("--force", action="store_true",
                    help="clean while a run works on the dataset (the folders that run uses are kept)")
    cl.set_defaults(func=cmd_clean)
    return p


def unwritable(out: str) -> str | None:
    """Why nothing can be written under the output root (None: it can): a temporary file is created and removed
    in it, or in the nearest folder above it that exists (nothing is left behind)."""
    folder = Path(out).resolve()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        return f"cannot write there ({folder} is not a folder)"
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        return f"cannot write there ({e.strerror or e})"
    return None


def overlap_problem(images: str, out: str) -> str | None:
    """Inputs and outputs kept apart: an output root inside the images folder (every rerun would ingest the previous
    run's galleries and label maps as new images), or an images folder that is an output root or a dataset folder of
    one (where stage folders are written)."""
    source, root = Path(images).resolve(), Path(out).resolve()
    if not source.is_dir():
        return None
    if root == source or source in root.parents:
        return f"{images}: the output root --out {out} is inside it; put the outputs elsewhere"
    if source == root or source.parent == root:
        return f"{images}: it is the output root --out {out} or a dataset folder of it; point --images elsewhere"
    return None


def check(args: argparse.Namespace) -> None:
    """Arguments and every setting, before anything runs or is written; SettingsError lists the problems."""
    lines: list[str] = []
    if hasattr(args, "stage"):
        from pseudoseg.tasks.stages.catalog import stage_index

        classes = [stage.name for stage in stage_index()]  # the names, without importing the stages (and their models)
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
    if args.command == "slurm" and not args.dry_run:
        from pseudoseg.tasks.report.slurm import missing_sbatch

        if problem := missing_sbatch():
            lines.append(f"pseudoseg: slurm: {problem}")
    if args.command in ("run", "demo", "workers", "luigid", "slurm"):
        problem = unwritable(args.out)
        if problem:
            lines.append(f"pseudoseg: --out {args.out}: {problem}")
    if hasattr(args, "images"):
        problem = source_problem(args.images) or overlap_problem(args.images, args.out)
        if problem:
            lines.append(f"pseudoseg: --images {problem}")
        # default dataset name: the folder's (or list's, tar's) name; a single image's without its extension
        args.dataset = args.dataset or (Path(args.images).stem if Path(args.images).is_file()
                                        and Path(args.images).suffix.lower() not in (".txt", ".lst", ".parquet", ".tar")
                                        else Path(args.images).name)
        problem = name_problem(args.dataset)
        if problem:
            lines.append(f"pseudoseg: --dataset {args.dataset!r} must be a plain name, the folder under --out "
                         f"(no '/', '\\' or '..'): {problem}")
    presets = [str(DEMO_CONFIG)] if args.command == "demo" else []
    args.recorded = None
    if args.command == "config" and args.dataset and not name_problem(args.dataset):
        recorded = Path(args.out).resolve() / args.dataset / DATASET_SETTINGS
        if recorded.is_file():
            load_config_files(recorded)
    if args.command in ("run", "demo", "workers", "slurm") and not lines:
        # the settings the dataset was made with come right after luigi.cfg (tasks.settings.load_config_files)
        recorded = Path(args.out).resolve() / ("demo" if args.command == "demo" else args.dataset) / DATASET_SETTINGS
        if recorded.is_file() and not args.fresh_settings:
            load_config_files(recorded)
            args.recorded = recorded
    try:
        args.origins = configure(getattr(args, "config", None), getattr(args, "set", None) or [], presets=presets,
                                 load_tasks=stage_classes)
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
        load_config_files()
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
        except KeyboardInterrupt:  # Ctrl-C: every finished shard is committed, the one in progress left no trace
            print("\npseudoseg: interrupted — rerun the same command to resume", file=sys.stderr, flush=True)
            return 130


if __name__ == "__main__":
    sys.exit(main())
