"""Failures a retry cannot fix: fail at once, say why in one line, at the end of the run.

A missing model (``ModelUnavailableError``), a benchmark folder in the wrong layout (``DatasetError``) or an
artifact that does not match its contract (``SchemaError``) fails the same way on every retry, so retrying it only
repeats the traceback. Such a task:

- explains its failure as ``PERMANENT`` + one line (``explain``, called from the tasks' ``on_failure``);
- is disabled by ``FailFastWorker`` right after its first failure (the scheduler would otherwise re-queue it
  ``[scheduler] retry_count`` times); its dependents stop waiting, the worker finishes the rest of the DAG;
- logs that one line instead of its traceback (``PermanentTracebackFilter``);
- and the command prints each distinct cause once, last (``FailFastWorkers.causes``).

Any other exception keeps Luigi's retries (``[scheduler] retry_count``, ``retry_delay``): it may be transient.
The next run starts the disabled task afresh (the local scheduler is new; luigid accepts a worker's re-add).
"""

from __future__ import annotations

import json
import logging

import luigi.rpc
import luigi.scheduler
import luigi.worker
from luigi.scheduler import DISABLED, DONE, FAILED

from pseudoseg.models.catalog import ModelUnavailableError
from pseudoseg.pipeline.eval.benchmarks import DatasetError
from pseudoseg.pipeline.use.captions import CaptionFileError
from pseudoseg.schemas.contract import SchemaError


class CorruptInput(RuntimeError):
    """An upstream unit failed verification and redoing it did not repair it (a retry would redo it the same way)."""


# CaptionFileError: the GT caption file changed (or broke) during the run; its check passed before the run.
PERMANENT_ERRORS: tuple[type[BaseException], ...] = (ModelUnavailableError, DatasetError, SchemaError, CorruptInput,
                                                     CaptionFileError)
PERMANENT = "[not retried] "  # prefix of a task's failure explanation


def permanent_cause(exc: BaseException | None) -> BaseException | None:
    """The first exception in ``exc``'s chain (itself, then __cause__ / __context__) that no retry can fix."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, PERMANENT_ERRORS):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def one_line(exc: BaseException, where: str = "") -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {where + ': ' if where else ''}{text}"


def explain(exc: BaseException, where: str = "") -> str | None:
    """``on_failure`` explanation of a permanent failure (None: a possibly transient one, keep Luigi's)."""
    cause = permanent_cause(exc)
    return PERMANENT + one_line(cause, where) if cause is not None else None


def cause_of(explanation: object) -> str | None:
    """The one-line cause in a worker's (JSON-encoded) failure explanation, if it is a permanent one."""
    if isinstance(explanation, str):
        try:
            explanation = json.loads(explanation)
        except ValueError:
            pass
    if isinstance(explanation, str) and explanation.startswith(PERMANENT):
        return explanation[len(PERMANENT):]
    return None


class PermanentTracebackFilter(logging.Filter):
    """Luigi logs every task failure with its traceback; a permanent one gets its one line instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        cause = permanent_cause(record.exc_info[1]) if record.exc_info else None
        if cause is not None:
            record.msg = f"{record.msg} (not retried): %s"
            record.args = (*(record.args or ()), one_line(cause))
            record.exc_info, record.exc_text = None, None
        return True


_FILTER = PermanentTracebackFilter()


def task_name(report: dict) -> str:
    """A task as a person names it, from a worker's status report: ``UseBoxMasks shard 3``, ``TrainUse``."""
    family, params = str(report.get("family") or report.get("task_id")), report.get("params") or {}
    stage = family.removesuffix("ShardRange").removesuffix("Shard")
    if "shard" in params:
        return f"{stage} shard {params['shard']}"
    if "first" in params and "stop" in params:
        return f"{stage} shards {params['first']}-{int(params['stop']) - 1}"
    return family


def error_line(explanation: object) -> str:
    """The error of a failure explanation in one line: a permanent cause, or the last line of the traceback."""
    cause = cause_of(explanation)
    if cause is not None:
        return cause
    if isinstance(explanation, str):
        try:
            explanation = json.loads(explanation)
        except ValueError:
            pass
    lines = [line.strip() for line in str(explanation).splitlines() if line.strip()]
    return lines[-1] if lines else "failed"


class FailFastWorker(luigi.worker.Worker):
    """A Luigi worker that disables a task whose failure is permanent instead of letting it be retried."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.permanent_causes: list[str] = []
        self.failed: dict[str, str] = {}  # task id → "<task>: <error line>" of its last attempt, while it failed

    def run(self) -> bool:
        try:
            return super().run()
        except KeyboardInterrupt:
            # Ctrl-C or SIGTERM (Slurm's preemption, scancel) abandoned the task in progress (nothing committed, its
            # lock released): report it as failed, so luigid hands it to another worker at once instead of holding
            # it as running until it prunes this worker (a minute or more).
            for task_id in list(self._running_tasks):
                try:
                    self._scheduler.add_task(worker=self._id, task_id=task_id, status=FAILED, runnable=True,
                                             expl=json.dumps("abandoned: interrupted (SIGTERM or Ctrl-C)"))
                except Exception:  # noqa: BLE001 — luigid gone as well: it prunes this worker by itself
                    pass
            raise

    def _add_task(self, *args, **kwargs):
        # Every status report of this worker passes here (luigi.worker.Worker._handle_next_task reports a
        # finished task with status FAILED and the task's on_failure explanation, JSON-encoded).
        super()._add_task(*args, **kwargs)
        if kwargs.get("status") == FAILED and "expl" in kwargs and cause_of(kwargs["expl"]) is None:
            self.failed[kwargs["task_id"]] = f"{task_name(kwargs)}: {error_line(kwargs['expl'])}"
        elif kwargs.get("status") == DONE:
            self.failed.pop(kwargs["task_id"], None)
        cause = cause_of(kwargs.get("expl")) if kwargs.get("status") == FAILED else None
        if cause is not None:
            if cause not in self.permanent_causes:
                self.permanent_causes.append(cause)
            # FAILED → DISABLED by this worker: not re-queued after retry_delay; a later run re-adds it.
            self._scheduler.add_task(worker=self._id, task_id=kwargs["task_id"], status=DISABLED,
                                     expl=kwargs.get("expl"))


class FailFastWorkers:
    """``worker_scheduler_factory`` for ``luigi.build``: Luigi's schedulers, ``FailFastWorker`` workers."""

    def __init__(self) -> None:
        self.workers: list[FailFastWorker] = []

    def create_local_scheduler(self) -> luigi.scheduler.Scheduler:
        return luigi.scheduler.Scheduler(prune_on_get_work=True, record_task_history=False)

    def create_remote_scheduler(self, url: str) -> luigi.rpc.RemoteScheduler:
        return luigi.rpc.RemoteScheduler(url)

    def create_worker(self, scheduler, worker_processes: int, assistant: bool = False) -> FailFastWorker:
        logger = logging.getLogger("luigi-interface")
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
        worker = FailFastWorker(scheduler=scheduler, worker_processes=worker_processes, assistant=assistant)
        self.workers.append(worker)
        return worker

    @property
    def failures(self) -> list[str]:
        """``<task>: <error line>`` of every task whose last attempt failed with an error a retry might fix (the
        permanent ones are ``causes``)."""
        return list(dict.fromkeys(line for w in self.workers for line in w.failed.values()))

    @property
    def causes(self) -> list[str]:
        """Each distinct permanent cause once, in the order they happened."""
        return list(dict.fromkeys(c for w in self.workers for c in w.permanent_causes))
