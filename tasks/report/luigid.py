"""Where `pseudoseg luigid` keeps its state, and which state files it refuses to hand to Luigi.

Luigi's scheduler saves its state with ``pickle`` when it stops and unpickles it when it starts: whoever can write
that file runs code as the scheduler's user. So the state lives in a private per-user folder
(``$XDG_STATE_HOME/pseudoseg/luigid/``, by default ``~/.local/state/pseudoseg/luigid/``, created mode 0700), never
in the output root that many hosts write to; a ``--state-path`` elsewhere is accepted only in a folder that no
other user can write to and outside the output root. luigid has no authentication: it listens on 127.0.0.1 unless
``--address`` says otherwise.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

STATE_FILE = "state.pickle"
LOOPBACK = "127.0.0.1"
LEGACY_STATE = Path(".luigid") / STATE_FILE  # under the output root, where pseudoseg kept it before


def state_folder() -> Path:
    """The per-user folder of luigid's state (XDG base directory spec: ``$XDG_STATE_HOME``, else
    ``~/.local/state``)."""
    base = os.environ.get("XDG_STATE_HOME", "").strip()
    root = Path(base) if base and Path(base).is_absolute() else Path.home() / ".local" / "state"
    return root / "pseudoseg" / "luigid"


def make_private_folder(folder: Path) -> None:
    """``folder`` (and missing parents) created; ``folder`` itself mode 0700 when this call creates it."""
    if not folder.exists():
        folder.parent.mkdir(parents=True, exist_ok=True)
        folder.mkdir(mode=0o700, exist_ok=True)


def _writable_by_others(st: os.stat_result) -> bool:
    return bool(st.st_mode & (stat.S_IWGRP | stat.S_IWOTH))


def state_problem(state: Path, out: Path) -> str | None:
    """Why luigid must not load (or later write) ``state``: None when only this user can have written it."""
    state, out = state.absolute(), out.absolute()
    if state.resolve() == out.resolve() or out.resolve() in state.resolve().parents:
        return (f"it is inside the output root {out}, which other hosts and users write to; luigid unpickles "
                f"this file at start, so whoever can write there could run code as this user")
    uid = os.getuid()
    folder = state.parent
    try:
        st = folder.stat()
    except OSError as e:
        return f"its folder {folder} cannot be used: {e.strerror or e}"
    if st.st_uid != uid:
        return f"its folder {folder} belongs to uid {st.st_uid}, not to this user (uid {uid})"
    if _writable_by_others(st):
        return (f"its folder {folder} is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o}); "
                f"luigid unpickles this file at start, so whoever can write there could run code as this user")
    try:
        st = state.lstat()
    except FileNotFoundError:
        return None
    except OSError as e:
        return f"it cannot be read: {e.strerror or e}"
    if not stat.S_ISREG(st.st_mode):
        return "it is not a regular file (a link or something else)"
    if st.st_uid != uid:
        return f"it belongs to uid {st.st_uid}, not to this user (uid {uid})"
    if _writable_by_others(st):
        return f"it is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})"
    return None
