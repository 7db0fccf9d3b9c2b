"""``python -m tests.fidelity [--list] [--keep] [NAME ...]``: apply every mutant of ``tests/fidelity/mutants.py`` (or
the named ones) to a scratch copy of the repository, run only the tests that must catch it, and print one line per
mutant: ``killed`` (a named test failed), ``survived`` (they all passed), ``error`` (pytest could not run them: a
node id that is not collected, a usage error), ``broken`` (the mutant itself does not run: a NameError, SyntaxError
or ImportError — a test failing on it proves nothing) or ``stale`` (the original text is not in its file exactly
once). Exit status 1 unless every mutant is killed.

The copy is made once (git's tracked and untracked-not-ignored files; no ``.venv``, no ``__pycache__``) and each
mutant changes one file there and puts it back afterwards; the tests run with the interpreter running this module,
from the copy's root (so the copy's modules are imported, checked once before the first mutant), without bytecode
files (an edit keeping a file's size within one second would otherwise reuse a stale one), one interpreter per
mutant: ``python -m pytest -x -q -p no:cacheprovider <node ids>``."""

from __future__ import annotations

import argparse
import os
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.fidelity.mutants import MUTANTS, Mutant

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 600  # one mutant's tests; a mutant that hangs them counts as killed (the tests did not pass)
# A failure naming one of these is the mutant's own fault (broken code), not a test catching a changed behaviour.
BROKEN = re.compile(r"\b(NameError|SyntaxError|IndentationError|ImportError|ModuleNotFoundError)\b")


def repo_files(root: Path) -> list[str]:
    """The repository's files: git's tracked + untracked-not-ignored ones (a plain walk without .git, .venv and
    caches when git is not available)."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                             check=True, capture_output=True).stdout
        return [f for f in out.decode().split("\0") if f and (root / f).is_file()]
    except (OSError, subprocess.CalledProcessError):
        skip = {".git", ".venv", "__pycache__", ".pytest_cache", "out"}
        return [p.relative_to(root).as_posix() for p in root.rglob("*")
                if p.is_file() and not skip & set(p.relative_to(root).parts)]


def scratch_copy(dest: Path) -> None:
    for rel in repo_files(REPO):
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, target)


def stale(m: Mutant, root: Path) -> str | None:
    """Why the mutant cannot be applied to ``root`` (None: its original text occurs exactly once)."""
    path = root / m.file
    if not path.is_file():
        return f"{m.file} does not exist"
    n = path.read_text(encoding="utf-8").count(m.original)
    return None if n == 1 else f"its original text occurs {n} times in {m.file}"


def shim(root: Path) -> Path:
    """A folder beside the copy ``root`` holding one link, ``pseudoseg`` → ``root``: first on PYTHONPATH, it makes
    the copy the ``pseudoseg`` package (setup.cfg maps the namespace onto the repository root; the editable
    install's finder would otherwise import this repository's modules)."""
    folder = root.with_name(root.name + "-shim")
    folder.mkdir(exist_ok=True)
    if not (folder / "pseudoseg").exists():
        (folder / "pseudoseg").symlink_to(root, target_is_directory=True)
    return folder


def environment(root: Path) -> dict[str, str]:
    """This process's environment for a run in the copy ``root``: no bytecode files, the copy as the ``pseudoseg``
    package (``shim``), and a LUIGI_CONFIG_PATH naming a file of this repository moved into the copy, so a mutant
    of luigi.cfg is what the tests read (the shipped luigi.cfg is found beside the package: the copy's)."""
    env = dict(os.environ)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env["PYTHONPATH"] = str(shim(root))
    config = env.get("LUIGI_CONFIG_PATH")
    if config and Path(config).resolve().is_relative_to(REPO):
        env["LUIGI_CONFIG_PATH"] = str(root / Path(config).resolve().relative_to(REPO))
    return env


def check_imports_from(root: Path) -> None:
    """The tests run in ``root`` must import the copy's modules, not the editable install's."""
    code = ("import pseudoseg.tasks.engine.settings as s, tests; print(s.__file__); print(tests.__file__); "
            "print(s.SHIPPED_CONFIG)")
    out = subprocess.run([sys.executable, "-c", code], cwd=root, env=environment(root), capture_output=True, text=True,
                         check=True).stdout.split()
    if not all(Path(p).resolve().is_relative_to(root.resolve()) for p in out):
        raise SystemExit(f"fidelity: the scratch copy imports {out}, not its own modules")


def plugins_off(m: Mutant, root: Path) -> list[str]:
    """pytest plugins the mutant's tests do without: the cache (nothing is written to the copy) and, unless one of
    their files uses it, hypothesis (its import is a third of the start-up)."""
    files = {node.split("::")[0] for node in m.tests}
    uses_hypothesis = any("hypothesis" in (root / f).read_text(encoding="utf-8") for f in files)
    return ["-p", "no:cacheprovider", *([] if uses_hypothesis else ["-p", "no:hypothesispytest"])]


def run_mutant(m: Mutant, root: Path) -> tuple[str, float, str]:
    """(status, seconds, pytest's last lines) of one mutant applied to ``root`` (restored afterwards)."""
    path = root / m.file
    original = path.read_text(encoding="utf-8")
    path.write_text(original.replace(m.original, m.replacement), encoding="utf-8")
    start = time.monotonic()
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", *plugins_off(m, root), *m.tests],
                              cwd=root, env=environment(root), capture_output=True, text=True, timeout=TIMEOUT_S)
        code, output = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired:
        code, output = 1, f"timed out after {TIMEOUT_S} s"
    finally:
        path.write_text(original, encoding="utf-8")
    # pytest: 0 passed, 1 tests failed, 2 interrupted (an import / collection error the mutant caused);
    # 3 internal error, 4 usage error (an unknown node id), 5 nothing collected: the table is wrong, not the tests
    status = {0: "survived", 1: "killed", 2: "killed"}.get(code, "error")
    broken = BROKEN.search(output)
    if status == "killed" and broken:
        status = "broken"
        output += f"\n(the output names {broken.group(1)})"
    tail = "\n".join(output.strip().splitlines()[-3:])
    return status, time.monotonic() - start, tail


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fidelity", description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="run only these mutants")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--keep", action="store_true", help="keep the scratch copies (their paths are printed)")
    parser.add_argument("--jobs", type=int, default=1, help="mutants run at once, each in its own scratch copy")
    args = parser.parse_args(argv)
    unknown = set(args.names) - {m.name for m in MUTANTS}
    if unknown:
        parser.error(f"unknown mutants {sorted(unknown)}")
    chosen = [m for m in MUTANTS if not args.names or m.name in args.names]
    if args.list:
        for m in chosen:
            print(f"{m.name:40s} {m.row}  ->  {' '.join(m.tests)}")
        return 0
    # grouped by the tests they run (the same files stay in the page cache)
    chosen.sort(key=lambda m: (m.tests[0].split("::")[0], m.tests))
    started = time.monotonic()
    copies: queue.Queue[Path] = queue.Queue()
    made = [Path(tempfile.mkdtemp(prefix="pseudoseg-fidelity-")) for _ in range(max(1, min(args.jobs, len(chosen))))]
    lock = threading.Lock()
    statuses: list[str] = []

    def one(m: Mutant) -> None:
        scratch = copies.get()
        try:
            problem = stale(m, scratch)
            status, seconds, tail = ("stale", 0.0, problem) if problem else run_mutant(m, scratch)
        finally:
            copies.put(scratch)
        with lock:
            statuses.append(status)
            print(f"{status:8s} {seconds:6.1f}s  {m.name}  [{m.row}]", flush=True)
            if status != "killed":
                print("         " + tail.replace("\n", "\n         "), flush=True)

    try:
        for scratch in made:
            scratch_copy(scratch)
            check_imports_from(scratch)
            copies.put(scratch)
        with ThreadPoolExecutor(len(made)) as pool:
            list(pool.map(one, chosen))
    finally:
        for scratch in made:
            if args.keep:
                print(f"scratch copy kept: {scratch}")
            else:
                shutil.rmtree(scratch, ignore_errors=True)
                shutil.rmtree(scratch.with_name(scratch.name + "-shim"), ignore_errors=True)
    failures = sum(s != "killed" for s in statuses)
    killed = len(chosen) - failures
    print(f"fidelity: {killed} of {len(chosen)} mutants killed in {time.monotonic() - started:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
