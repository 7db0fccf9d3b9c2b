"""Luigi mechanics shared by every stage: common parameters, the per-shard task, shard ranges, the per-stage wrapper.

A stage = one ``ShardTask`` subclass (the unit of work, retry and accounting: one shard, its own ``done.json``) +
one ``StageWrapper`` requiring all shards. Outputs are content-addressed: the folder name hashes the stage's
content-affecting parameters together with its upstream stage hashes, so changing any of them runs into a new
folder instead of reusing a stale one.

The unit of *scheduling* is decoupled from the shard: with ``[pseudoseg] shards_per_task`` K > 1, Luigi sees one
``ShardRange`` task per K consecutive shards of a stage (``IngestShardRange(first=0, stop=K)``), which runs its
shards one by one, each exactly as a lone ShardTask would run (lock, verification, commit, done.json). Every
``requires()`` keeps naming shards; ``DatasetTask._requires`` (what Luigi schedules from) maps each required
shard to the range holding it, so ranges depend on ranges. K = 1 schedules the shards themselves.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import os
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

import luigi
import luigi.configuration
import luigi.execution_summary
from luigi.task import flatten

from pseudoseg.models.registry import ModelSettings, model_identity
from pseudoseg.pipeline.core.artifacts import (
    VERIFY_MODES,
    ShardOutput,
    StageDir,
    TarSpool,
    atomic_write_bytes,
    commit_shard,
    make_dirs,
    record_problems,
    unit_name,
)
from pseudoseg.pipeline.core.locks import UnitLock
from pseudoseg.pipeline.core.locks import describe as describe_holder
from pseudoseg.pipeline.core.params import IngestPlanParams, StageParams, StorageParams
from pseudoseg.pipeline.core.sources import Listing, list_source, num_shards
from pseudoseg.schemas import SchemaError
from pseudoseg.tasks.engine.failures import CorruptInput, explain, one_line, permanent_cause
from pseudoseg.tasks.engine.params import AutoIntParameter, FloatParameter, NameParameter, read_params
from pseudoseg.tasks.engine.progress import STAGE_PROGRESS
from pseudoseg.tasks.engine.sections import section_of

LOG = logging.getLogger("luigi-interface")  # the logger luigi prints to the console


RANGES_PER_STAGE = 250  # `auto`: FullDAG's 17 per-shard stages stay under ~4,300 Luigi tasks at any shard count


class pseudoseg(luigi.Config):  # noqa: N801 — the class name is the luigi.cfg section name
    out = luigi.Parameter(default="out", description="output root shared by all stages")
    verify = luigi.ChoiceParameter(
        default="sha256", choices=VERIFY_MODES, var_type=str,
        description="check every input file against its upstream done.json before a task reads it: sha256 "
                    "(size + content), size, or off. Completeness checks always compare sizes unless off.")
    lock_stale_seconds = FloatParameter(
        default=600.0, gt=0, description="a shard lock held from another host whose heartbeat is older than this is "
                                   "taken over (same host: as soon as its process is gone)")
    shards_per_task = AutoIntParameter(
        default="auto", ge=1,
        description="shards per Luigi task (a range of one stage's shards, each still its own unit with done.json); "
                    f"auto: at most {RANGES_PER_STAGE} tasks per stage; 1: one task per shard. Never changes an "
                    "artifact")
    progress_seconds = FloatParameter(
        default=60.0, ge=0, description="away from a terminal (a pipe, a log, luigid workers), a running stage "
                                        "prints one progress line at most this often (0: every shard and step)")


def shards_per_task(shard_count: int) -> int:
    """K, the shards of one Luigi task, for a dataset of ``shard_count`` shards ([pseudoseg] shards_per_task)."""
    value = current(pseudoseg).shards_per_task
    if value == "auto":
        return max(1, -(-shard_count // RANGES_PER_STAGE))
    return int(value)


@functools.lru_cache(maxsize=32)
def cached_listing(images: str) -> Listing:
    """Listing once per build: Luigi calls requires()/output() many times while scheduling.
    ``build_tasks`` clears it so a new build in the same process sees added or changed files."""
    return list_source(images, storage=stage_params(StorageParams),
                       allow_urls=stage_params(IngestPlanParams).allow_urls)


# Per-process caches of what every task recomputes otherwise (settings objects, stage folders): Luigi calls
# requires()/output()/complete() many times per task, and a stage's folder hash recurses through every upstream.
# Each entry is keyed by the settings in effect (``settings_token``), so a changed luigi.cfg value (tests change
# them in-process) is seen at once; ``new_build`` drops them all, so a new build also sees changed input files
# (listings, side inputs hashed into a stage's parameters).
_BY_SETTINGS: dict[tuple, Any] = {}
_CACHE_LIMIT = 4096  # entries; far above one build's needs (a few per stage), bounds in-process test suites


_FROZEN_TOKEN: tuple | None = None


def settings_token() -> tuple:
    """The luigi configuration in effect, as a hashable value (≈ 10 µs: cheaper than reading one setting; constant
    inside ``frozen_settings``)."""
    if _FROZEN_TOKEN is not None:
        return _FROZEN_TOKEN
    cfg = luigi.configuration.get_config()
    return (id(cfg), tuple(cfg._defaults.items()),
            tuple((section, tuple(values.items())) for section, values in cfg._sections.items()))


@contextlib.contextmanager
def frozen_settings() -> Iterator[None]:
    """For a whole command (``pseudoseg run``): the settings are read and checked once, then nothing changes
    them, so their token is computed once instead of on every cached lookup (a dozen per shard)."""
    global _FROZEN_TOKEN
    before = _FROZEN_TOKEN
    _FROZEN_TOKEN = None
    _FROZEN_TOKEN = settings_token()
    try:
        yield
    finally:
        _FROZEN_TOKEN = before


def by_settings(key: tuple, compute: Callable[[], Any]) -> Any:
    """``compute()`` once per ``key`` and settings state (see _BY_SETTINGS)."""
    full = (key, settings_token())
    try:
        return _BY_SETTINGS[full]
    except KeyError:
        pass
    if len(_BY_SETTINGS) >= _CACHE_LIMIT:
        _BY_SETTINGS.clear()
    value = _BY_SETTINGS[full] = compute()
    return value


def current(section: type[luigi.Config]) -> Any:
    """``section()`` (a luigi.Config), built once per settings state: instantiating one reads every one of its
    parameters from the configuration (≈ 70 µs), and hot paths read settings per shard."""
    return by_settings((section,), section)


def stage_params(params_type: type[StageParams]) -> Any:
    """The ``params_type`` object of the current values of its luigi.cfg section (``tasks.sections``), once per
    settings state (also how a task reads the settings of a stage it schedules or follows, e.g. the shard size or
    the feature cache's blocks)."""
    return by_settings(("params", params_type), lambda: read_params(params_type, current(section_of(params_type))))


def new_build() -> None:
    """Forget everything cached from earlier builds in this process (listings, stage folders, settings)."""
    cached_listing.cache_clear()
    _BY_SETTINGS.clear()


def build_tasks(tasks: list[luigi.Task], **kwargs: Any) -> luigi.execution_summary.LuigiRunResult:
    """luigi.build with fresh caches (``new_build``); always returns the detailed result."""
    new_build()
    return luigi.build(tasks, detailed_summary=True, **kwargs)


def model_settings() -> ModelSettings:
    """The [models] section of luigi.cfg as typed settings (cache_dir relative to the working directory)."""
    def read() -> ModelSettings:
        cfg = luigi.configuration.get_config()
        items = dict(cfg.items("models")) if cfg.has_section("models") else {}
        return ModelSettings.from_mapping(items)

    return by_settings(("models", os.getcwd()), read)


GPU = "gpu"  # the one [resources] pool the tasks request (luigi.cfg caps it per worker host)
RESOURCES = (GPU,)


def uses_gpu(settings: ModelSettings) -> bool:
    """Model tasks then take one unit of the [resources] gpu pool."""
    import torch

    return settings.device != "cpu" and torch.cuda.is_available()


class StageSettings:
    """The settings of one stage's task (a shard, the ingest plan, a trainer, an evaluation): a
    ``pipeline.core.params.StageParams`` dataclass (``params_type``) read from its luigi.cfg section
    (``tasks.sections``), and the model ``roles`` it loads. ``content_params`` hashes all of them (plus the upstream
    stages' hashes) into the folder name; the task reads its settings only through ``self.params``. A task whose
    settings depend on one of its parameters (FeaturesShard's purpose, Evaluate's method) overrides
    ``params_source``."""

    params_type: ClassVar[type[StageParams]]
    roles: ClassVar[tuple[str, ...]] = ()  # model roles whose identity is hashed (see model_roles)

    def params_source(self) -> type[StageParams]:
        """The params type of this task's settings."""
        return self.params_type

    @property
    def params(self) -> Any:
        """This stage's settings, read once per settings state from its section."""
        return stage_params(self.params_source())

    def model_roles(self) -> tuple[str, ...]:
        """The model roles this stage loads with the current settings (their identities are hashed)."""
        return self.roles

    def upstream_params(self) -> dict[str, str]:
        """The hashes of the stages this one reads (none for a first stage)."""
        return {}

    def content_params(self) -> Mapping[str, Any]:
        """Everything that changes this stage's bytes: the upstream stages' hashes, the params object (a side file
        by its content; fields declared ``hashed=False`` left out) and the identity of every model role used."""
        settings = model_settings()
        return {"upstream": self.upstream_params(), "params": hashed_params(self.params),
                "models": {role: model_identity(role, settings) for role in self.model_roles()}}


class DatasetTask(luigi.Task):
    """Parameters every stage of one dataset shares."""

    images = luigi.Parameter(description="folder, .txt/.parquet list, or WebDataset .tar shards")
    dataset = NameParameter(description="dataset name: the folder under the output root")
    out = luigi.Parameter(default=None, significant=True)

    @classmethod
    def get_params(cls) -> list[tuple[str, luigi.Parameter]]:
        # Luigi walks dir(cls) on every instantiation (twice; ≈ 55 µs each); our classes never gain parameters
        # after they are defined, so once per class is enough.
        params = cls.__dict__.get("_params")
        if params is None:
            params = super().get_params()
            cls._params = params
        return list(params)

    def _requires(self) -> list[luigi.Task]:
        # What Luigi schedules from (Task.deps): the required shards grouped into the ranges that hold them.
        return coarsen(flatten(self.requires()))

    def cached_stage_dir(self, compute: Callable[[], StageDir]) -> StageDir:
        """The stage folder once per (class, parameters except ``shard``, settings): every shard of a stage shares
        one folder, and computing it hashes every upstream stage's folder in turn."""
        key = (type(self), tuple(kv for kv in self.param_kwargs.items() if kv[0] != "shard"))
        return by_settings(key, compute)

    def on_failure(self, exception: BaseException) -> str:
        # A missing model or a mismatched artifact: one line, and no retries (tasks.failures).
        record_task_failure(self, exception)
        return explain(exception) or super().on_failure(exception)

    def on_success(self) -> Any:
        clear_task_failure(self)
        return super().on_success()

    @property
    def root(self) -> Path:
        return Path(self.out or current(pseudoseg).out).resolve()

    @property
    def listing(self) -> Listing:
        return cached_listing(self.images)

    @property
    def shard_count(self) -> int:
        return num_shards(len(self.listing.entries), stage_params(IngestPlanParams).shard_size)

    def common(self) -> dict[str, Any]:
        return {"images": self.images, "dataset": self.dataset, "out": self.out}


class CommittedTask(DatasetTask):
    """A unit of work whose output is named files + a ``done.json`` record written last (a shard, or the ingest
    plan). Done = a valid record for exactly this unit whose files exist at their recorded sizes; ``run`` holds
    the unit's lock, so two runs on one output root never work on (or clear) the same unit at once."""

    @property
    def stage_dir(self) -> StageDir:
        raise NotImplementedError

    @property
    def unit(self) -> int | str:
        """Shard number, or a name (``plan``): the stem of the unit's files."""
        raise NotImplementedError

    def describe(self) -> str:
        return f"{self.stage_dir.stage} {unit_name(self.unit)}"

    def produce_unit(self) -> ShardOutput:
        raise NotImplementedError

    def inputs_to_verify(self) -> list[CommittedTask]:
        """Upstream units whose files this task reads (default: its requirements)."""
        return [t for t in flatten(self.requires()) if isinstance(t, CommittedTask)]

    def output(self) -> luigi.LocalTarget:
        return luigi.LocalTarget(str(self.stage_dir.done_path(self.unit)))

    def problems(self, mode: str | None = None) -> dict[str, str]:
        """File name → what is wrong (empty: valid). ``mode`` None = the completeness check (sizes)."""
        if mode is None:
            mode = "off" if current(pseudoseg).verify == "off" else "size"
        return record_problems(self.stage_dir, self.unit, mode)

    def complete(self) -> bool:
        return not self.problems()

    def lock(self) -> UnitLock:
        def waiting(holder: dict[str, Any]) -> None:
            message = f"waiting for {self.describe()}: in progress in {describe_holder(holder)}"
            LOG.info("pseudoseg: %s", message)
            STAGE_PROGRESS.note(f"pseudoseg: {message}")  # the terminal sees why nothing moves
            if callable(self.set_status_message):  # None outside a Luigi worker
                self.set_status_message(message)

        return UnitLock(self.stage_dir.lock_path(self.unit), stale_after=current(pseudoseg).lock_stale_seconds,
                        on_wait=waiting)

    def run(self) -> None:
        with self.lock():
            try:
                self.run_locked()
            except Exception as exc:
                self.record_failure(exc)
                raise

    def record_failure(self, exc: BaseException) -> None:
        """``_meta/<unit>.failed.json``: this unit's last attempt failed, and why (one line). Durable, so
        ``pseudoseg status`` can tell failed from pending after the run; the next commit of the unit removes it."""
        body = {"stage": self.stage_dir.stage, "unit": unit_name(self.unit), "pid": os.getpid(),
                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "error": one_line(exc)}
        try:
            make_dirs(self.stage_dir.meta_path)
            atomic_write_bytes(self.stage_dir.failed_path(self.unit), (json.dumps(body) + "\n").encode())
        except OSError as err:  # never hide the real failure behind this one
            LOG.warning("pseudoseg: could not record the failure of %s: %s", self.describe(), err)

    def run_locked(self) -> None:
        """With the unit's lock held: nothing if another process finished it meanwhile; otherwise move an invalid
        record aside, clear what a killed attempt left, verify the inputs (healing bad ones), produce, commit."""
        stage_dir = self.stage_dir
        problems = self.problems()
        if not problems:
            return
        if stage_dir.done_path(self.unit).exists():
            self.invalidate(problems, why="is invalid")
        stage_dir.clear_unfinished(self.unit)
        verify_inputs(self, self.inputs_to_verify())
        stage_dir.begin(self.unit)  # this attempt's temporaries go to the stage's .tmp/ folder
        started = time.perf_counter()
        try:
            try:
                output = self.produce_unit()
            except SchemaError as exc:
                # An input that matches its record but not its contract (e.g. left by an older schema version
                # under the same hash): that upstream is redone like a corrupt one, then this unit is produced
                # again.
                upstream, name = self.upstream_of(exc)
                if upstream is None:
                    raise
                detail = str(exc).split(f"{upstream.stage_dir.path / name}: ", 1)[-1]
                redo(self, upstream, {name: detail}, why="failed its contract")
                output = self.produce_unit()
            commit_shard(stage_dir, self.unit, output, seconds=time.perf_counter() - started)
            if isinstance(self, ShardTask) and STAGE_PROGRESS.active:
                STAGE_PROGRESS.shard_committed(STAGE_PROGRESS.line(self.stage, self.shard_count, stage_dir.meta_path),
                                               self.shard)
        except BaseException:
            stage_dir.clear_unfinished(self.unit)  # a failed attempt leaves nothing behind (we hold the lock)
            raise

    def upstream_of(self, exc: SchemaError) -> tuple[CommittedTask | None, str]:
        """The input unit (and file name) a contract error names, if any."""
        message = str(exc)
        for upstream in self.inputs_to_verify():
            folder = f"{upstream.stage_dir.path}{os.sep}"
            if folder in message:
                return upstream, message.split(folder, 1)[1].split(":", 1)[0]
        return None, ""

    def invalidate(self, problems: Mapping[str, str], *, why: str, before: str = "") -> None:
        """Quarantine this unit's record (and its bad files) and say so in one line."""
        stage_dir = self.stage_dir
        done = stage_dir.done_path(self.unit).name
        listed = "; ".join(f"{name}: {problem}" for name, problem in sorted(problems.items()))
        where = stage_dir.quarantine(self.unit, f"{self.describe()} {why}{before}: {listed}",
                                     files=[n for n in problems if n != done])
        LOG.warning("pseudoseg: %s %s%s: %s; moved to %s; redoing it", self.describe(), why, before, listed,
                    where.relative_to(self.root))


TASK_UNIT = "task"  # a task with one output folder and no shards (a trainer, an export, an evaluation)


def _single_output_folder(task: luigi.Task) -> StageDir | None:
    """The stage folder of a task that is not a committed unit (shards record their own failures)."""
    if isinstance(task, CommittedTask) or not hasattr(type(task), "stage_dir"):
        return None
    try:
        stage_dir = task.stage_dir
    except Exception:  # noqa: BLE001 — no folder to record in (e.g. a benchmark that is not there)
        return None
    return stage_dir if isinstance(stage_dir, StageDir) else None


def record_task_failure(task: luigi.Task, exc: BaseException) -> None:
    """``_meta/task.failed.json`` of a single-output task's folder: ``pseudoseg status`` shows the failure (and
    exits 1) after the run; the task's next success removes it."""
    stage_dir = _single_output_folder(task)
    if stage_dir is None:
        return
    body = {"stage": stage_dir.stage, "unit": TASK_UNIT, "pid": os.getpid(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "error": one_line(exc)}
    try:
        make_dirs(stage_dir.meta_path)
        atomic_write_bytes(stage_dir.failed_path(TASK_UNIT), (json.dumps(body) + "\n").encode())
    except OSError as err:
        LOG.warning("pseudoseg: could not record the failure of %s: %s", task.task_family, err)


def clear_task_failure(task: luigi.Task) -> None:
    stage_dir = _single_output_folder(task)
    if stage_dir is not None:
        stage_dir.failed_path(TASK_UNIT).unlink(missing_ok=True)


def verify_inputs(reader: luigi.Task, upstreams: Iterable[CommittedTask], mode: str | None = None) -> None:
    """Before ``reader`` reads them: check every file of every upstream unit against its done.json ([pseudoseg]
    verify: size + sha256, size, or off). A unit that fails is invalidated (record moved to .quarantine/, one
    warning line naming the file) and redone here under its lock, then checked again; the reader goes on with
    good inputs, in this same run. A unit that another process is already redoing is waited for."""
    mode = mode or current(pseudoseg).verify
    if mode == "off":
        return
    for upstream in upstreams:
        if upstream.problems(mode):
            redo(reader, upstream, None, why="failed verification", mode=mode)


def redo(reader: luigi.Task, upstream: CommittedTask, problems: Mapping[str, str] | None, *, why: str,
         mode: str = "size") -> None:
    """Under ``upstream``'s lock: quarantine its record (one warning line) and produce it again, here; then check
    it (``mode``). ``problems`` None = find them now (another process may have redone it while we waited)."""
    with upstream.lock():
        found = upstream.problems(mode) if problems is None else problems
        if found:
            if upstream.stage_dir.done_path(upstream.unit).exists():
                name = reader.describe() if isinstance(reader, CommittedTask) else reader.task_family
                upstream.invalidate(found, why=why, before=f" before {name} read it")
            # Its progress shows as the reader's (the worker knows only the reader).
            upstream.set_status_message = reader.set_status_message
            upstream.set_progress_percentage = reader.set_progress_percentage
            try:
                upstream.run_locked()
            finally:
                upstream.set_status_message = upstream.set_progress_percentage = None
    left = upstream.problems(mode)
    if left:
        raise CorruptInput(f"{upstream.describe()} still fails verification after being redone: "
                           + "; ".join(f"{n}: {p}" for n, p in sorted(left.items())))


class ShardTask(StageSettings, CommittedTask):
    """One stage applied to one shard. Subclasses define ``stage``, ``produce`` and their settings (``params_type``,
    ``section``, ``roles``: see StageSettings); ``produce`` reads settings only through ``self.params``, so no
    setting can change the bytes without changing the folder."""

    stage: ClassVar[str]
    shard = luigi.IntParameter()
    # Tasks that use a GPU declare resources = {"gpu": 1}; luigi.cfg [resources] caps them per worker host.
    resources: ClassVar[dict[str, int]] = {}

    def produce(self, progress: ProgressReporter) -> ShardOutput:
        raise NotImplementedError

    @property
    def stage_dir(self) -> StageDir:
        return self.cached_stage_dir(
            lambda: StageDir(self.root, self.dataset, self.stage, dict(self.content_params())))

    @property
    def unit(self) -> int:
        return self.shard

    def describe(self) -> str:
        return f"{self.stage} shard {self.shard}"

    def unit_kwargs(self) -> dict[str, Any]:
        """This task's parameters but ``shard``: what every shard of the stage shares."""
        return {k: v for k, v in self.param_kwargs.items() if k != "shard"}

    def scheduled(self) -> luigi.Task:
        """The Luigi task that runs this shard: itself (K = 1) or the ShardRange of K shards holding it."""
        count = self.shard_count
        k = shards_per_task(count)
        if k <= 1:
            return self
        first = self.shard // k * k
        stop = max(min(first + k, count), self.shard + 1)
        return range_class(type(self))(first=first, stop=stop, **self.unit_kwargs())

    def tar_spool(self, suffix: str = "tar") -> TarSpool:
        """A streaming writer for this shard's ``shard-N.<suffix>`` WebDataset tar (see TarSpool)."""
        return TarSpool(self.stage_dir.shard_path(self.shard, suffix))

    def produce_unit(self) -> ShardOutput:
        with ProgressReporter(self) as progress:
            return self.produce(progress)


def reject(image_id: str, source: str, stage: str, reason: str, detail: str) -> dict[str, str]:
    """One REJECTS row."""
    return {"image_id": image_id, "source": source, "stage": stage, "reason": reason, "detail": detail}


def group_by_image(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    grouped: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        grouped[row["image_id"]].append(row)
    return grouped


def file_digest(path: str) -> str:
    """Content hash of a side input (captions, labels): editing the file must change the stage hash."""
    if not path:
        return ""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def hashed_params(params: StageParams) -> dict[str, Any]:
    """Every hashed field of a params object as it enters the stage hash: a side file (``setting(file=True)``) by
    its content digest, so editing the file renames the folder and moving it does not; a ``setting(digest=fn)`` as
    ``fn(value)`` (e.g. a vocabulary by its name and classes); a field declared ``setting(hashed=False)`` (changes
    no byte) not at all."""

    def hashed(f: dataclasses.Field) -> Any:
        value = getattr(params, f.name)
        if f.metadata.get("file"):
            return file_digest(value)
        if f.metadata.get("digest") is not None:
            return f.metadata["digest"](value)
        return value

    return {f.name: hashed(f) for f in dataclasses.fields(params) if f.metadata.get("hashed", True)}


class ProgressReporter:
    """Progress of one shard, to luigid's UI (percentage + status message) and to the run's progress on stderr
    (``tasks.progress``: its stage's line). At the end of a shard that succeeded: ``N/N <items>`` and 100 %, so
    luigid never shows a finished shard as partly done."""

    def __init__(self, task: ShardTask) -> None:
        self.task = task
        self.total = 0
        self.items = "images"  # what the loop steps over (the stage's counted items)
        self.started = False
        self._last = 0.0
        self.line = STAGE_PROGRESS.line(task.stage, task.shard_count, task.stage_dir.meta_path) \
            if STAGE_PROGRESS.active else None

    def start(self, total: int, items: str = "images") -> None:
        self.total, self.items, self.started = total, items, True

    def step(self, index: int) -> None:
        if self.line is not None:
            STAGE_PROGRESS.shard_step(self.line, self.task.shard, index, self.total, self.items)
        now = time.monotonic()
        if not callable(self.task.set_progress_percentage):  # None outside a Luigi worker
            return
        if self.total and now - self._last > 1.0:  # throttle: each call is an RPC under luigid
            self._last = now
            self.task.set_progress_percentage(round(100.0 * index / self.total, 1))
            self.task.set_status_message(f"{index}/{self.total} {self.items}")

    def finished(self) -> None:
        """The shard's work is done: report it whole (not throttled)."""
        if callable(self.task.set_status_message):
            self.task.set_status_message(f"{self.total}/{self.total} {self.items}" if self.started else "done")
        if callable(self.task.set_progress_percentage):
            self.task.set_progress_percentage(100)

    def __enter__(self) -> ProgressReporter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.finished()


def coarsen(tasks: Iterable[luigi.Task]) -> list[luigi.Task]:
    """``tasks`` with each shard replaced by the Luigi task that runs it (``ShardTask.scheduled``), each once."""
    out: dict[str, luigi.Task] = {}
    for task in tasks:
        if isinstance(task, ShardTask):
            task = task.scheduled()
        out.setdefault(task.task_id, task)
    return list(out.values())


class ShardRange(DatasetTask):
    """Shards [first, stop) of one stage as ONE Luigi task (the unit of scheduling; the shard stays the unit of
    work, retry and accounting). Complete = every shard done. ``run`` skips the shards already done and runs each
    other one as a lone ShardTask would (its lock, input verification, commit and done.json), so the files are
    the same for any range size and a kill loses at most the shard in progress. A shard that fails does not stop
    the others: the range fails after trying them all (Luigi retries it; done shards are skipped), except on a
    failure no retry can fix (tasks.failures), which ends it at once. Progress shows per range in luigid (N/M
    shards) with the current shard's own progress.

    One subclass per stage, made by ``range_class`` (``IngestShardRange``, ...) with the shard task's
    parameters but ``shard``."""

    shard_class: ClassVar[type[ShardTask]]
    first = luigi.IntParameter(description="first shard of the range")
    stop = luigi.IntParameter(description="one past the last shard of the range")

    def shard_tasks(self) -> list[ShardTask]:
        units = self.__dict__.get("_shard_tasks")
        if units is None:
            kwargs = {k: v for k, v in self.param_kwargs.items() if k not in ("first", "stop")}
            units = self._shard_tasks = [self.shard_class(shard=i, **kwargs) for i in range(self.first, self.stop)]
        return units

    def requires(self) -> list[luigi.Task]:
        """The upstream units of every shard of the range, each once (``_requires`` groups them into ranges)."""
        out: dict[str, luigi.Task] = {}
        for unit in self.shard_tasks():
            for task in flatten(unit.requires()):
                out.setdefault(task.task_id, task)
        return list(out.values())

    def output(self) -> list[luigi.LocalTarget]:
        return [unit.output() for unit in self.shard_tasks()]

    def complete(self) -> bool:
        return all(unit.complete() for unit in self.shard_tasks())

    @property
    def resources(self) -> dict[str, int]:  # type: ignore[override]
        return dict(self.shard_tasks()[0].resources) if self.shard_tasks() else {}

    @property
    def stage(self) -> str:
        return self.shard_class.stage

    def describe(self) -> str:
        return f"{self.stage} shards {self.first}-{self.stop - 1}"

    def run(self) -> None:
        units = self.shard_tasks()
        progress = RangeProgress(self, len(units))
        failed: list[tuple[ShardTask, Exception]] = []
        for index, unit in enumerate(units):
            progress.at(index)
            if unit.complete():
                continue
            unit.set_status_message, unit.set_progress_percentage = progress.message, progress.percentage
            try:
                unit.run()
            except Exception as exc:
                if permanent_cause(exc) is not None:
                    raise
                LOG.error("pseudoseg: %s failed (%s: %s); going on with the other shards of %s",
                          unit.describe(), type(exc).__name__, exc, self.describe(), exc_info=True)
                failed.append((unit, exc))
            finally:
                unit.set_status_message = unit.set_progress_percentage = None
        progress.at(len(units), final=True)
        if failed:
            if len(failed) > 1:
                LOG.error("pseudoseg: %d shards of %s failed: %s", len(failed), self.describe(),
                          ", ".join(str(unit.shard) for unit, _ in failed))
            raise failed[0][1]


class RangeProgress:
    """A range's progress to luigid: ``done/total shards`` + the current shard's own message, and a percentage
    that counts the current shard's fraction; at most one report per second (each is an RPC under luigid)."""

    def __init__(self, task: ShardRange, total: int) -> None:
        self.task, self.total = task, total
        self.index, self.shard, self._last = 0, None, 0.0

    def _due(self, final: bool = False) -> bool:
        now = time.monotonic()
        if not final and now - self._last < 1.0:
            return False
        self._last = now
        return True

    def at(self, index: int, final: bool = False) -> None:
        self.index = index
        self.shard = self.task.shard_tasks()[index].shard if index < self.total else None
        if (callable(self.task.set_status_message) and callable(self.task.set_progress_percentage)
                and self._due(final)):
            self.task.set_progress_percentage(round(100.0 * index / max(self.total, 1), 1))
            self.task.set_status_message(f"{index}/{self.total} shards")

    def percentage(self, percent: float) -> None:
        if callable(self.task.set_progress_percentage) and self._due():
            self.task.set_progress_percentage(round((self.index + percent / 100.0) * 100.0 / max(self.total, 1), 1))

    def message(self, text: str) -> None:
        if callable(self.task.set_status_message):  # a shard's own messages (waiting for a lock, ...) always pass
            self.task.set_status_message(f"{self.index}/{self.total} shards; shard {self.shard}: {text}")


_RANGE_CLASSES: dict[type, type[ShardRange]] = {}


def range_class(shard_class: type[ShardTask]) -> type[ShardRange]:
    """The ShardRange task class of one stage (``<ShardTask name>Range``), made once per process; it carries the
    shard task's parameters but ``shard`` and lives in the shard task's module (Luigi can load it by name)."""
    cls = _RANGE_CLASSES.get(shard_class)
    if cls is None:
        name = f"{shard_class.__name__}Range"
        attrs: dict[str, Any] = {n: p for n, p in shard_class.get_params() if n != "shard"}
        attrs.update(shard_class=shard_class, __module__=shard_class.__module__, __qualname__=name,
                     __doc__=f"Shards [first, stop) of {shard_class.__name__} as one Luigi task (see ShardRange).")
        cls = _RANGE_CLASSES[shard_class] = type(name, (ShardRange,), attrs)
        module = sys.modules.get(shard_class.__module__)
        if module is not None and not hasattr(module, name):
            setattr(module, name, cls)
    return cls


class StageWrapper(luigi.WrapperTask, DatasetTask):
    """Requires every shard of one stage (Luigi schedules their ranges: ``DatasetTask._requires``)."""

    shard_task: ClassVar[type[ShardTask]]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "shard_task" in cls.__dict__:
            range_class(cls.shard_task)  # defined at import, beside its stage

    def requires(self) -> list[ShardTask]:
        return [self.shard_task(shard=i, **self.common()) for i in range(self.shard_count)]


def stage_wrapper(shard_task: type[ShardTask], doc: str = "") -> type[StageWrapper]:
    """The ``StageWrapper`` of a shard task (every shard of its stage), named after it without ``Shard``: one name
    per stage (``UseCaptionsShard`` → ``UseCaptions``, what ``pseudoseg run`` takes). Assign it at module level under
    that name."""
    name = shard_task.__name__.removesuffix("Shard")
    attrs = {"shard_task": shard_task, "__module__": shard_task.__module__, "__qualname__": name,
             "__doc__": doc or f"Every shard of the {shard_task.stage} stage."}
    return type(StageWrapper)(name, (StageWrapper,), attrs)
