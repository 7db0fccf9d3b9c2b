"""What a run shows while it works, on stderr: the stages it works on, so a long run is seen moving.

On a terminal (one local worker process): one tqdm line per running stage, advanced as its shards commit, the
current shard's images as the line's postfix. Anywhere else (a pipe, a log file, CI, luigid workers, forked
workers): plain lines — a stage's start, its finish, and in between at most one line per ``[pseudoseg]
progress_seconds`` (shards done of the stage, the current shard's images, time elapsed and an estimate of what is
left). Tasks that are not shards (trainers, exports, evaluation) get a line when they start, when they report
what they do (throttled the same way) and when they end.

The engine hands this object the display name of a stage folder (``name_of``): it knows no stage or report.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import luigi
from tqdm import tqdm


def duration(seconds: float) -> str:
    """``42 s``, ``3 min 5 s``, ``2 h 07 min``: how long, for a person."""
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {secs} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def done_shards(meta: Path) -> int:
    """Shards of a stage folder with a done record (one listing of ``_meta/``; validity is not checked here)."""
    try:
        with os.scandir(meta) as entries:
            return sum(1 for e in entries if e.name.startswith("shard-") and e.name.endswith(".done.json"))
    except OSError:
        return 0


def task_name(task: luigi.Task) -> str:
    """How a line names a task that is not a shard: its own description (``ingest plan``) or its family."""
    describe = getattr(task, "describe", None)
    return describe() if callable(describe) else task.task_family


@dataclass
class StageLine:
    """One stage's progress in this process."""

    name: str
    total: int
    before: int  # shards already done when this process first touched the stage
    started: float = field(default_factory=time.monotonic)
    committed: int = 0  # shards this process committed
    fraction: float = 0.0  # of the shard in progress
    shard_text: str = ""
    last_line: float = 0.0
    bar: Any = None

    @property
    def done(self) -> int:
        return min(self.total, self.before + self.committed)

    def text(self, now: float) -> str:
        elapsed = now - self.started
        parts = [f"{self.done}/{self.total} shards"]
        if self.shard_text:
            parts.append(self.shard_text)
        parts.append(f"{duration(elapsed)} elapsed")
        progress = self.committed + self.fraction
        left = self.total - self.before - progress
        if progress > 0 and left > 0 and elapsed >= 1:
            parts.append(f"about {duration(elapsed * left / progress)} left")
        return ", ".join(parts)


class StageProgress:
    """See the module docstring. ``activate`` turns it on for one build; ``close`` ends it."""

    def __init__(self) -> None:
        self.active = False
        self.bars = False
        self.stream: Any = sys.stderr
        self.every = 60.0
        self.name_of: Callable[[str], str] = str
        self.stages: dict[str, StageLine] = {}
        self.tasks: dict[str, tuple[float, float]] = {}  # task id → (started, last line)
        self.durations: dict[str, float] = {}  # task id → seconds, of the tasks that are not shards (until activate)
        self._last_draw = 0.0
        self.ncols: int | None = None

    def activate(self, stream: Any = None, *, bars: bool, every: float,
                 name_of: Callable[[str], str] = str) -> None:
        """``bars``: tqdm lines (a terminal, one worker process) instead of plain lines."""
        self.active, self.stream, self.every, self.name_of = True, stream or sys.stderr, every, name_of
        self.bars = bars and bool(getattr(self.stream, "isatty", lambda: False)())
        try:  # a terminal that reports no width (a bare pty) gets 100 columns instead of empty bars
            self.ncols = None if os.get_terminal_size(self.stream.fileno()).columns > 0 else 100
        except (AttributeError, OSError, ValueError):
            self.ncols = 100
        self.stages, self.tasks, self.durations = {}, {}, {}
        for event, handler in self._handlers():
            luigi.Task.event_handler(event)(handler)

    def close(self) -> None:
        for line in self.stages.values():
            if line.bar is not None:
                line.bar.close()
        callbacks = luigi.Task._event_callbacks.get(luigi.Task, {})
        for event, handler in self._handlers():
            callbacks.get(event, set()).discard(handler)
        self.active, self.stages, self.tasks = False, {}, {}

    def _handlers(self) -> tuple[tuple[str, Callable[..., None]], ...]:
        return ((luigi.Event.START, self._task_started), (luigi.Event.SUCCESS, self._task_done),
                (luigi.Event.FAILURE, self._task_failed))

    def say(self, text: str) -> None:
        if self.bars:
            tqdm.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def note(self, text: str) -> None:
        """One line of the run's progress (nothing when no run is showing progress)."""
        if self.active:
            self.say(text)

    # ---------------------------------------------------------------------------------------------- shards
    def line(self, stage: str, total: int, meta: Path) -> StageLine:
        """The stage's line, made (and its start said) on first use in this process."""
        line = self.stages.get(stage)
        if line is None:
            name = self.name_of(stage)
            before = done_shards(meta)
            line = self.stages[stage] = StageLine(name=name, total=total, before=before)
            if self.bars:
                line.bar = tqdm(total=total, initial=before, desc=f"{name:<19}", unit="shard",
                                position=len(self.stages) - 1, leave=True, file=self.stream,
                                dynamic_ncols=self.ncols is None, ncols=self.ncols)
            else:
                already = f" ({before} already done)" if before else ""
                self.say(f"{name}: started, {total} shard{'s' if total != 1 else ''}{already}")
                line.last_line = time.monotonic()
        return line

    def shard_step(self, line: StageLine, shard: int, index: int, total: int, items: str) -> None:
        line.fraction = index / total if total else 0.0
        line.shard_text = f"shard {shard}: {index}/{total} {items}"
        now = time.monotonic()
        if self.bars:
            if now - self._last_draw >= 0.5:
                self._last_draw = now
                line.bar.set_postfix_str(line.shard_text)
        elif now - line.last_line >= self.every:
            line.last_line = now
            self.say(f"{line.name}: {line.text(now)}")

    def shard_committed(self, line: StageLine, shard: int) -> None:
        line.committed += 1
        line.fraction, line.shard_text = 0.0, ""
        now = time.monotonic()
        if self.bars:
            line.bar.set_postfix_str(f"shard {shard} done", refresh=False)
            line.bar.update(1)
        elif line.done >= line.total:
            self.say(f"{line.name}: finished, {line.total}/{line.total} shards in {duration(now - line.started)}")
            line.last_line = now
        elif now - line.last_line >= self.every:
            line.last_line = now
            self.say(f"{line.name}: {line.text(now)}")

    # ------------------------------------------------------------------------------ tasks that are not shards
    def _plain_task(self, task: luigi.Task) -> bool:
        # Shards and ranges have their stage's line; wrappers do no work of their own.
        return not (hasattr(task, "stage_dir") and hasattr(task, "shard")) and not hasattr(task, "shard_class") \
            and not isinstance(task, luigi.WrapperTask) and not getattr(task, "progress_silent", False)

    def _task_started(self, task: luigi.Task) -> None:
        if not self.active or not self._plain_task(task):
            return
        now = time.monotonic()
        self.tasks[task.task_id] = (now, now)
        self.say(f"{task_name(task)}: started")

    def task_status(self, task: luigi.Task, message: str) -> None:
        """What a task that is not a shard says it does (``report_status``), throttled like a stage's line."""
        if not self.active or task.task_id not in self.tasks:
            return
        started, last = self.tasks[task.task_id]
        now = time.monotonic()
        if self.bars or last == started or now - last >= self.every:
            self.tasks[task.task_id] = (started, now)
            self.say(f"{task_name(task)}: {message} ({duration(now - started)} elapsed)")

    def _task_done(self, task: luigi.Task) -> None:
        if task.task_id in self.tasks:
            started, _ = self.tasks.pop(task.task_id)
            self.durations[task.task_id] = time.monotonic() - started
            self.say(f"{task_name(task)}: finished in {duration(time.monotonic() - started)}")

    def _task_failed(self, task: luigi.Task, exception: BaseException) -> None:
        if task.task_id in self.tasks:
            started, _ = self.tasks.pop(task.task_id)
            self.say(f"{task_name(task)}: failed after {duration(time.monotonic() - started)}")


STAGE_PROGRESS = StageProgress()


def report_status(task: luigi.Task, message: str) -> None:
    """What a task that is not a shard is doing: luigid's status message, and a line of the run's progress."""
    if callable(task.set_status_message):  # None outside a Luigi worker
        task.set_status_message(message)
    STAGE_PROGRESS.task_status(task, message)
