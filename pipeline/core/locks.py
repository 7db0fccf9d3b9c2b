"""Per-unit lock files, so two runs on one output root never work on (or clear) the same shard at once.

A lock is a hidden file ``<stage>/<hash>/.lock-shard-NNNNNN`` created with ``O_CREAT | O_EXCL`` (atomic on local
file systems and on NFSv3+), holding JSON: pid, host, the process start time (``/proc/<pid>/stat``), a random
token and the time taken. The holder refreshes its mtime every ``stale_after / 4`` seconds from one daemon thread
per process shared by all its locks (a thread per lock cost ~4 ms per shard to start and join).

A lock is **stale** (and taken over) when
- its holder ran on this host and that process is gone (no such pid, a zombie, or a pid reused by a process
  that started at another time), or
- its holder ran on another host and its mtime is older than ``stale_after`` seconds (no heartbeat), or
- its content cannot be read and it is older than ``UNREADABLE_GRACE`` seconds (a writer killed between create
  and write).
Take-over renames the stale file to a unique name, checks it still holds what was judged stale, deletes it and
creates a fresh lock with ``O_EXCL``; two processes taking over at once cannot both win.

A holder that was judged stale may still be alive (a paused VM, a process stopped for longer than ``stale_after``)
and resume later. It must then touch nothing of the new holder's: this process remembers the token of every lock
it took (``owner_token``, until it releases it) and ``holds`` says whether the lock still carries it.
``pipeline.core.artifacts`` names a unit's temporaries by that token, clears only its own once the lock is lost,
and refuses the late commit.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

UNREADABLE_GRACE = 30.0
_HELD: set[str] = set()  # tokens of the locks this process holds now
_TAKEN: dict[str, str] = {}  # lock path → token of the lock this process took there (held, or lost since)


def owner_token(path: Path) -> str | None:
    """The token of the lock this process took at ``path`` and has not released (it may have lost it since);
    None when it took none there."""
    return _TAKEN.get(str(path))


def holds(path: Path) -> bool:
    """Whether the lock at ``path`` still carries the token this process took it with."""
    token = owner_token(path)
    if token is None:
        return False
    try:
        holder = UnitLock.read(Path(path))
    except FileNotFoundError:
        return False
    return bool(holder) and holder.get("token") == token


_OWN_START: dict[int, str | None] = {}  # this process's start time, by pid (a forked child has another pid)


def own_start() -> str | None:
    pid = os.getpid()
    if pid not in _OWN_START:
        _OWN_START[pid] = process_start(pid)
    return _OWN_START[pid]


def process_start(pid: int) -> str | None:
    """Start time of ``pid`` in clock ticks since boot (Linux /proc), None where unknown or gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state is field 3, starttime field 22
    return fields[19] if len(fields) > 19 else None


def process_alive(pid: int, start: str | None) -> bool:
    """Whether ``pid`` on this host is the same live process that took the lock."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat[stat.rindex(")") + 2:].split()[0] in ("Z", "X"):  # killed but not reaped
            return False
    except OSError:
        return True  # no /proc: trust kill(0)
    return start is None or process_start(pid) in (None, start)


class LockBusy(RuntimeError):
    """Raised by ``acquire(wait=False)`` when a live process holds the lock."""


class UnitLock:
    """``with UnitLock(path): ...`` — exclusive across processes and hosts sharing the file system.

    ``on_wait(holder)`` is called once when the lock is found held by a live process (for a status line);
    acquisition then polls every ``poll`` seconds until the holder releases it or turns stale.
    """

    def __init__(self, path: Path, *, stale_after: float = 600.0, poll: float = 0.5,
                 on_wait: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.path = Path(path)
        self.stale_after = float(stale_after)
        self.poll = poll
        self.on_wait = on_wait
        self.token: str | None = None

    # -- holder identity --------------------------------------------------------------------------------
    def _content(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "host": socket.gethostname(), "start": own_start(),
                "token": self.token, "since": time.time()}

    @staticmethod
    def read(path: Path) -> dict[str, Any] | None:
        """The holder's record, None where the file is empty or unreadable; raises FileNotFoundError."""
        try:
            data = json.loads(Path(path).read_bytes() or b"null")
        except (ValueError, UnicodeDecodeError):
            return None
        return data if isinstance(data, dict) else None

    def is_stale(self, holder: dict[str, Any] | None, mtime: float) -> bool:
        age = time.time() - mtime
        if holder is None:
            return age > UNREADABLE_GRACE
        if holder.get("host") == socket.gethostname():
            pid = holder.get("pid")
            if not isinstance(pid, int):
                return True
            if pid == os.getpid():
                return holder.get("token") not in _HELD  # not ours: a dead earlier process with our pid
            return not process_alive(pid, holder.get("start"))
        return age > self.stale_after

    # -- acquire / release ------------------------------------------------------------------------------
    def acquire(self, wait: bool = True) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.token = secrets.token_hex(8)
        announced = False
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                pass
            else:
                with os.fdopen(fd, "w") as fh:
                    json.dump(self._content(), fh)
                _HELD.add(self.token)
                _TAKEN[str(self.path)] = self.token
                self._start_heartbeat()
                return
            try:
                holder, mtime = self.read(self.path), self.path.stat().st_mtime
            except FileNotFoundError:
                continue  # released meanwhile: try again at once
            if self.is_stale(holder, mtime):
                self._take_over(holder)
                continue
            if not wait:
                raise LockBusy(f"{self.path} is held by {describe(holder)}")
            if not announced and self.on_wait is not None:
                self.on_wait(holder or {})
            announced = True
            time.sleep(self.poll)

    def _take_over(self, stale: dict[str, Any] | None) -> None:
        """Move the stale lock aside; if what was moved is not what was judged stale (another process replaced
        it meanwhile), put it back unless someone holds the name again."""
        aside = self.path.with_name(f"{self.path.name}.stale-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            os.replace(self.path, aside)
        except FileNotFoundError:
            return
        try:
            moved = self.read(aside)
        except FileNotFoundError:
            return
        if moved != stale:
            try:
                os.link(aside, self.path)  # fails if the name is taken again: then that holder wins
            except OSError:
                pass
        aside.unlink(missing_ok=True)

    def held(self) -> bool:
        """Whether the lock file still carries this holder's token."""
        try:
            holder = self.read(self.path)
        except FileNotFoundError:
            return False
        return bool(holder) and holder.get("token") == self.token

    def release(self) -> None:
        _HEARTBEAT.remove(self)
        if self.held():
            self.path.unlink(missing_ok=True)
        _HELD.discard(self.token)
        if _TAKEN.get(str(self.path)) == self.token:
            del _TAKEN[str(self.path)]
        self.token = None

    def _start_heartbeat(self) -> None:
        _HEARTBEAT.add(self, interval=max(0.05, self.stale_after / 4))

    def beat(self) -> None:
        """Refresh the lock's mtime if this holder still holds it."""
        try:
            if self.held():
                os.utime(self.path)
        except OSError:
            pass

    def __enter__(self) -> UnitLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class Heartbeat:
    """One daemon thread per process refreshing every held lock when its interval is due."""

    def __init__(self) -> None:
        self._due: dict[UnitLock, tuple[float, float]] = {}  # lock -> (interval, next refresh at)
        self._cond = threading.Condition()
        self._owner: int | None = None  # pid that started the thread (a forked child must start its own)

    def add(self, lock: UnitLock, interval: float) -> None:
        with self._cond:
            self._due[lock] = (interval, time.monotonic() + interval)
            if self._owner != os.getpid():
                self._owner = os.getpid()
                threading.Thread(target=self._run, name="lock-heartbeat", daemon=True).start()
            self._cond.notify()

    def remove(self, lock: UnitLock) -> None:
        with self._cond:
            self._due.pop(lock, None)

    def _run(self) -> None:
        owner = os.getpid()
        while True:
            with self._cond:
                if self._owner != owner:
                    return
                now = time.monotonic()
                due = [lock for lock, (_, at) in self._due.items() if at <= now]
                for lock in due:
                    interval = self._due[lock][0]
                    self._due[lock] = (interval, now + interval)
                wait = min((at for _, at in self._due.values()), default=now + 60.0) - now
            for lock in due:
                lock.beat()
            with self._cond:
                self._cond.wait(timeout=max(wait, 0.0))


_HEARTBEAT = Heartbeat()


def _fresh_heartbeat_in_child() -> None:
    # A forked child holds none of its parent's locks, and the parent's thread may hold the condition's lock
    # at the fork: the child starts clean.
    global _HEARTBEAT
    _HEARTBEAT = Heartbeat()
    _TAKEN.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_fresh_heartbeat_in_child)


def describe(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "an unreadable lock"
    since = holder.get("since")
    when = time.strftime("%H:%M:%S", time.localtime(since)) if isinstance(since, (int, float)) else "?"
    return f"pid {holder.get('pid')} on {holder.get('host')} since {when}"
