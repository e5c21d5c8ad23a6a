"""Kill a step operation before each of its file-system operations, then check and recover.

Run by tests/test_crash_points.py as ``python _crash_points.py WORKDIR``; prints one JSON line
per crash point: ``{"op", "k", "ops", "problems"}`` (``problems`` empty when all is well).

One warmed process builds a template output folder per operation (first run, changed run,
``--force``, restore from backup, gc), counts the operation's file-system calls inside the
output folder in a forked child, then for every k forks a child on a fresh copy of the template
that SIGKILLs itself just before its k-th call. After each kill it checks what is on disk (no
folder that reads as complete is corrupt; no complete result that existed is lost), runs the
operation again in another child, as the next run would, and checks that it recovered and left
no leftovers behind. The calls wrapped are those folders.py and storage.py make: ``os.rename``,
``os.replace``, ``os.mkdir``, ``os.unlink``/``os.remove``, ``os.rmdir``, ``shutil.rmtree`` (and
the unlinks inside it), and opening a file for writing (``open``, ``os.open``).
"""

from __future__ import annotations

import builtins
import io
import json
import os
import shutil
import signal
import sys
from pathlib import Path

import dreamer_magic
from dreamer_magic import folders
from dreamer_magic.folders import OutputFolder, leftover_kind, read_meta
from dreamer_magic.storage import load_outputs

WORK = Path(sys.argv[1]).absolute()
NAME = "s"


def make(force: bool = False):
    @dreamer_magic.step(NAME, force=force)
    def s(v):
        return {"v": v, "rows": [v] * 3}

    return s


run, force_run = make(), make(force=True)
EXPECTED: dict[str, dict] = {}  # fingerprint -> the value a correct folder with it holds


# -- building the templates --------------------------------------------------------------------


def call(root: Path, v: int, force: bool = False) -> None:
    folders.set_output_folder(root)
    (force_run if force else run)(v)
    meta, _ = read_meta(root / NAME, "step.json")
    EXPECTED[meta["fingerprint"]] = {"v": v, "rows": [v] * 3}


def fp_of(root: Path) -> str:
    meta, _ = read_meta(root / NAME, "step.json")
    return meta["fingerprint"]


def template(name: str, calls: list[tuple[int, bool]]) -> Path:
    root = WORK / "templates" / name
    root.mkdir(parents=True)
    for v, force in calls:
        call(root, v, force)
    return root


def operations() -> dict[str, tuple[Path, object, set[str], str | None]]:
    """op -> (template, what the operation does, fingerprints that must survive, fingerprint in place after)."""
    first = template("first", [])
    changed = template("changed", [(1, False)])
    forced = template("force", [(1, False), (1, True)])  # a backup with the same fingerprint exists
    restore = template("restore", [(1, False), (2, False)])
    gc = template("gc", [(1, False), (2, False), (3, False), (4, False)])
    fp = {v: next(f for f, value in EXPECTED.items() if value["v"] == v) for v in (1, 2, 3, 4)}
    # gc also meets an incomplete backup, newer than every complete one, and leftovers
    incomplete = gc / "_backups" / NAME / "incomplete-20260101-000000-abcd"
    shutil.copytree(gc / "_backups" / NAME / fp[1], incomplete)
    (incomplete / "step.json").unlink()
    (gc / f".{NAME}.tmp-1-0badc0de").mkdir()
    (gc / f".{NAME}.tmp-1-0badc0de" / "half.json").write_text("{")
    (gc / "_backups" / NAME / f".{fp[2]}.trash-0badc0de").mkdir()
    os.utime(incomplete)
    return {
        "first run": (first, lambda: run(1), set(), fp[1]),
        "changed run": (changed, lambda: run(2), {fp[1]}, fp[2]),
        "--force": (forced, lambda: force_run(1), {fp[1]}, fp[1]),
        "restore": (restore, lambda: run(1), {fp[1], fp[2]}, fp[1]),
        "gc": (gc, lambda: OutputFolder(folders.get_output_folder()).gc(keep=1), {fp[3], fp[4]}, fp[4]),
    }


# -- the instrumented child ----------------------------------------------------------------------

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def arm(root: Path, kill_at: int | None, counter: list[int]) -> None:
    """Wrap the file-system calls; count those inside ``root``; SIGKILL just before call ``kill_at``."""
    prefix = str(root) + os.sep

    def inside(path: object, dir_fd: object = None) -> bool:
        if dir_fd is not None:  # shutil.rmtree's unlinks inside a folder it opened
            return True
        try:
            text = os.fsdecode(os.fspath(path))  # type: ignore[arg-type]
        except TypeError:
            return False
        return os.path.abspath(text).startswith(prefix)

    def tick() -> None:
        counter[0] += 1
        if counter[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    def wrap(module: object, name: str, is_write=lambda args, kwargs: True) -> None:
        real = getattr(module, name)

        def wrapper(*args, **kwargs):
            if args and inside(args[0], kwargs.get("dir_fd")) and is_write(args, kwargs):
                tick()
            return real(*args, **kwargs)

        setattr(module, name, wrapper)

    for name in ("rename", "replace", "mkdir", "unlink", "remove", "rmdir"):
        wrap(os, name)
    wrap(shutil, "rmtree")

    def writes(args: tuple, kwargs: dict) -> bool:
        mode = args[1] if len(args) > 1 else kwargs.get("mode", "r")
        return isinstance(mode, str) and any(c in mode for c in "wax+")

    real_open = builtins.open

    def open_(*args, **kwargs):
        if args and inside(args[0]) and writes(args, kwargs):
            tick()
        return real_open(*args, **kwargs)

    builtins.open = io.open = open_
    wrap(os, "open", lambda args, kwargs: bool((args[1] if len(args) > 1 else kwargs.get("flags", 0)) & _WRITE_FLAGS))


def in_child(root: Path, action, kill_at: int | None = None, count_fd: int | None = None) -> int:
    """Run ``action`` on ``root`` in a forked child; returns its wait status."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            folders.set_output_folder(root)
            counter = [0]
            if kill_at is not None or count_fd is not None:
                arm(root, kill_at, counter)
            action()
            if count_fd is not None:
                os.write(count_fd, str(counter[0]).encode())
        except BaseException as e:  # noqa: BLE001 - reported through the exit status
            sys.stderr.write(f"{type(e).__name__}: {e}\n")
            code = 3
        os._exit(code)
    return os.waitpid(pid, 0)[1]


def count_ops(root: Path, action) -> int:
    read, write = os.pipe()
    status = in_child(root, action, count_fd=write)
    os.close(write)
    text = os.read(read, 100).decode()
    os.close(read)
    assert status == 0 and text, f"the uninstrumented operation failed (status {status})"
    return int(text)


# -- the checks --------------------------------------------------------------------------------------


def complete_results(root: Path, problems: list[str]) -> dict[str, list[str]]:
    """fingerprint -> where a complete, correct copy is ("in place" or a backup); every folder
    that reads as complete must load and hold the value its fingerprint stands for."""
    found: dict[str, list[str]] = {}
    places = [("in place", root / NAME)]
    base = root / "_backups" / NAME
    if base.is_dir():
        places += [(f"backup {p.name}", p) for p in sorted(base.iterdir()) if not p.name.startswith(".")]
    for where, folder in places:
        meta, _ = read_meta(folder, "step.json")
        if meta is None:
            continue
        fp = meta["fingerprint"]
        try:
            value = load_outputs(folder, meta["outputs"])["result"]
        except Exception as e:  # noqa: BLE001
            problems.append(f"{where} reads as complete but does not load: {type(e).__name__}: {e}")
            continue
        if value != EXPECTED.get(fp):
            problems.append(f"{where} reads as complete but holds {value!r}, not the result of {fp[:12]}")
            continue
        found.setdefault(fp, []).append(where)
    return found


def junk(root: Path) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in (".locks", ".cache")]
        for name in dirnames + filenames:
            if leftover_kind(name):
                out.append(str(Path(dirpath, name).relative_to(root)))
    return out


def check_point(op: str, k: int, spec) -> dict:
    source, action, survive, after = spec
    root = WORK / "points" / f"{op.replace(' ', '-').strip('-')}-{k}"
    shutil.copytree(source, root, symlinks=True)
    before_incomplete = {p.name for p in (root / "_backups" / NAME).glob("incomplete-*")}
    problems: list[str] = []
    status = in_child(root, action, kill_at=k)
    if not (os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL):
        problems.append(f"the child was not killed before operation {k} (wait status {status})")
    found = complete_results(root, problems)
    for fp in survive:
        if fp not in found:
            problems.append(f"after the kill, the complete result {fp[:12]} is gone")
    # the next run (the same operation again) recovers and leaves nothing behind
    status = in_child(root, action)
    if status != 0:
        problems.append(f"the next run failed (wait status {status})")
    found = complete_results(root, problems)
    for fp in survive:
        if fp not in found:
            problems.append(f"after the next run, the complete result {fp[:12]} is gone")
    if "in place" not in found.get(after, []):
        problems.append(f"after the next run, {after[:12]} is not in place")
    if op == "gc" and sorted(p.name for p in (root / "_backups" / NAME).iterdir()) != sorted(
        fp for fp in survive if fp != after
    ):
        problems.append(f"after the next gc, the backups are {sorted(p.name for p in (root / '_backups' / NAME).iterdir())}")
    new_incomplete = {p.name for p in (root / "_backups" / NAME).glob("incomplete-*")} - before_incomplete
    if new_incomplete:
        problems.append(f"an incomplete backup appeared: {sorted(new_incomplete)}")
    left = junk(root)
    if left:
        problems.append(f"left behind after the next run: {left}")
    shutil.rmtree(root)
    return {"op": op, "k": k, "problems": problems}


def main() -> None:
    os.chdir(WORK)
    for op, spec in operations().items():
        source, action = spec[0], spec[1]
        probe = WORK / "points" / "probe"
        shutil.copytree(source, probe, symlinks=True)
        n = count_ops(probe, action)
        shutil.rmtree(probe)
        for k in range(1, n + 1):
            print("POINT " + json.dumps({**check_point(op, k, spec), "ops": n}), flush=True)


if __name__ == "__main__":
    main()
