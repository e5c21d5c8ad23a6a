"""The output folder: names, atomic writes, locks, backups and restore, metadata files.

Layout (SPEC §2)::

    output/
      <step>/            _dataset/, _outputs/, step.json (written last = complete)
      <trainer>/         _checkpoints/, _model/, trainer.json (written last)
      .cache/            generation caches
      _backups/<name>/<fingerprint>/
      .locks/            one lock file per step or trainer (fcntl; released when a process dies)

A folder is written under a temporary name (``.<name>.tmp-<pid>-<random>``) and renamed into
place; a folder without a valid metadata file is never treated as complete. A folder is deleted
by renaming it to a trash name (``.<name>.trash-<random>``) first; what a killed operation leaves
under those names is swept by the next run of that step or by ``%dreamer gc`` (docs/ARCHITECTURE.md,
"Crash safety").

Examples
--------
>>> validate_name("Clean Reviews")
'clean-reviews'
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import DreamerError, InvalidNameError
from .integrity import digest_file, settled, unsafe_paths

NAME_RULE = (
    "a name must be 1-100 characters of letters, digits, space, '_', '-' or '.', "
    "must not start with '.' or '_', and must not be '..'"
)
WRITE_REFUSED = frozenset({errno.EROFS, errno.EACCES, errno.EPERM})  # errnos of a folder we may not write

# A folder name is written inside longer file names (``.<name>.tmp-<pid>-<random>``, 22 bytes
# more), and file systems allow 255 bytes per name: 200 bytes of UTF-8 leaves room for them.
NAME_MAX_BYTES = 200
RESERVED = {"_backups", ".cache", ".locks"}
BACKUPS = "_backups"

_output_folder: Path | None = None


def validate_name(name: str) -> str:
    """Check a step or trainer name and return its folder name (lower-case, spaces to ``-``).

    Examples
    --------
    >>> validate_name("SFT small")
    'sft-small'

    Raises
    ------
    InvalidNameError
        Naming the rule, for ``../x``, ``a/b``, ``""``, ``_backups``, ``.cache``, 101 characters...
    """
    if not isinstance(name, str):
        raise InvalidNameError(f"invalid name {name!r}: {NAME_RULE}")
    ok = (
        1 <= len(name) <= 100
        and all(ch.isalnum() or ch in " _-." for ch in name)
        and name.isprintable()
        and not name.startswith((".", "_"))
        and name != ".."
        and name.strip() == name
    )
    if not ok:
        shown = name if len(name) <= 40 else name[:37] + "..."
        raise InvalidNameError(f"invalid name {shown!r}: {NAME_RULE} (and no leading or trailing spaces)")
    folder = name.lower().replace(" ", "-")
    size = len(folder.encode("utf-8", "surrogatepass"))
    if size > NAME_MAX_BYTES:
        raise InvalidNameError(
            f"the name {name[:20] + '...'!r} is too long for a folder: its {len(name)} characters are {size} "
            f"bytes in UTF-8, and a step or trainer name may take at most {NAME_MAX_BYTES} bytes (a letter "
            "outside ASCII takes 2-4); choose a shorter name"
        )
    if folder in RESERVED:
        raise InvalidNameError(f"invalid name {name!r}: it is reserved for the output folder's own use")
    return folder


def get_output_folder() -> Path:
    """The output folder: set by :func:`set_output_folder`, else ``./output`` (absolute).

    Examples
    --------
    >>> get_output_folder().name
    'output'
    """
    if _output_folder is not None:
        return _output_folder
    return Path(os.getcwd(), "output")


def set_output_folder(path: str | os.PathLike | None) -> Path:
    """Set the output folder (``None`` returns to the default ``./output``).

    Raises
    ------
    DreamerError
        If the path exists and is not a folder.
    """
    global _output_folder
    if path is None:
        _output_folder = None
        return get_output_folder()
    resolved = Path(path).expanduser().absolute()
    if resolved.exists() and not resolved.is_dir():
        raise DreamerError(
            f"the output folder {str(resolved)!r} is a file, not a folder; choose another path "
            "with `%dreamer output PATH`"
        )
    _output_folder = resolved
    return resolved


def now_iso() -> str:
    """The one timestamp format of step.json, trainer.json and the generation cache (UTC).

    Examples
    --------
    >>> now_iso().endswith("Z")
    True
    """
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def folder_size(path: Path) -> int:
    """Bytes on disk under ``path`` (0 if it does not exist)."""
    total = 0
    try:
        if path.is_file():
            return path.stat().st_size
        for dirpath, _, filenames in os.walk(path):
            for f in filenames:
                with contextlib.suppress(OSError):
                    total += os.lstat(os.path.join(dirpath, f)).st_size
    except OSError:
        pass
    return total


def tree_digest(path: str | os.PathLike) -> str:
    """xxh3-128 of a file, or of every file under a folder (relative paths, sizes, contents).

    Symlinks are not followed. Examples: ``tree_digest(step / "_dataset")`` changes whenever
    any byte of the saved dataset does.
    """
    import xxhash

    root = Path(path)
    if root.is_file() and not root.is_symlink():
        return digest_file(root)
    h = xxhash.xxh3_128()
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in filenames:
            full = Path(dirpath, name)
            files.append((full.relative_to(root).as_posix(), full))
    for rel, full in sorted(files):
        h.update(rel.encode("utf-8", "surrogatepass") + b"\x00")
        if full.is_symlink():
            h.update(b"link:" + os.readlink(full).encode("utf-8", "surrogatepass"))
        else:
            h.update(str(full.stat().st_size).encode() + b":" + digest_file(full).encode())
    return h.hexdigest()


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON under a temporary name, fsync, rename into place."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, ensure_ascii=False, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


def read_json(path: str | os.PathLike) -> dict | None:
    """A JSON object from ``path``, or ``None`` if it is missing, unreadable or not an object."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def fsync_tree(path: Path) -> None:
    """fsync every file and folder under ``path`` (a file: just it), before the metadata that
    commits them is written: after a power cut, a step.json never names data that is not there."""
    if os.path.isfile(path) and not os.path.islink(path):
        _fsync_file(os.fspath(path))
        return
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            full = os.path.join(dirpath, name)
            if not os.path.islink(full):
                _fsync_file(full)
        _fsync_dir(Path(dirpath))


def _fsync_file(path: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold back Ctrl-C (SIGINT) for the few file-system operations that commit a result.

    Examples
    --------
    >>> with interrupts_deferred():  # doctest: +SKIP
    ...     out.commit(tmp, final, name, "step.json", meta)

    An interrupt that arrives meanwhile is raised as ``KeyboardInterrupt`` right after the
    block, so a commit is whole or not done. Only the main thread can do this (elsewhere, and
    where Python does not own the SIGINT handler, the block runs as it is).
    """
    import signal
    import threading

    received: list[int] = []
    previous = signal.getsignal(signal.SIGINT) if threading.current_thread() is threading.main_thread() else None
    if previous is None:
        yield
        return
    signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


def fsync_dir(path: Path) -> None:
    """fsync a folder, so that a rename inside it is durable."""
    _fsync_dir(path)



@contextlib.contextmanager
def _os_lock(path: str, on_wait: Callable[[], Any] | None, *, wait: bool = True) -> Iterator[bool]:
    """Hold an exclusive OS lock on ``path``, freed when the process dies; yields whether it is held.

    On POSIX this is ``fcntl.flock`` on a file kept open while held (no import of
    ``filelock`` on a hit: it costs more than the rest of a tiny hit's locking; ``filelock``
    takes the same ``flock``); elsewhere ``filelock``. ``on_wait`` is called once, before
    blocking, if another process holds it; with ``wait=False`` it yields False instead.
    """
    try:
        import fcntl
    except ImportError:  # Windows
        from filelock import FileLock, Timeout

        lock = FileLock(path, thread_local=False)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            if not wait:
                yield False
                return
            if on_wait is not None:
                on_wait()
            lock.acquire()
        try:
            yield True
        finally:
            lock.release()
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                yield False
                return
            if on_wait is not None:
                on_wait()
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    _fsync_file(os.fspath(path))  # a folder is opened and fsynced the same way


# Names of what an interrupted operation leaves behind; only these are ever swept.
TEMP_NAME = re.compile(r"\.(?P<of>.+)\.tmp-\d+-[0-9a-f]{8}")
TRASH_NAME = re.compile(r"\.(?P<of>.+)\.trash-[0-9a-f]{8}")
SKIPPED_NAME = re.compile(r"\.skipped-checkpoint-\d+")


def trash_name(path: Path) -> Path:
    """A fresh trash name beside ``path`` (``.<name>.trash-<random>``): hidden, never read as a result."""
    return path.parent / f".{path.name}.trash-{uuid.uuid4().hex[:8]}"


def remove_path(path: Path) -> int:
    """Delete a file, a symlink (the link only) or a folder (symlinks inside are not followed).

    Returns the bytes freed. Errors are ignored: what is left keeps its trash name.
    """
    try:
        if path.is_symlink() or not path.is_dir():
            size = os.lstat(path).st_size
            path.unlink()
            return size
    except OSError:
        return 0
    size = folder_size(path)
    shutil.rmtree(path, ignore_errors=True)
    return size


def discard(path: Path) -> int:
    """Rename ``path`` to a trash name, then delete it; returns the bytes freed.

    A kill in between leaves a ``.…trash-…`` entry that the next run or ``%dreamer gc``
    sweeps, never a half-deleted folder under a name that reads as a result.
    """
    trash = trash_name(path)
    os.rename(path, trash)
    return remove_path(trash)


def is_inside(path: Path, root: Path) -> bool:
    """Whether ``path``, symlinks resolved, lies inside ``root`` (symlinks resolved)."""
    inner, outer = os.path.realpath(path), os.path.realpath(root)
    return inner == outer or inner.startswith(outer.rstrip(os.sep) + os.sep)


def _listing(folder: Path) -> list[Path]:
    """The entries of ``folder`` whose names start with a dot (the only ones leftovers have),
    as paths; empty when it is not a folder. The output folder is listed on every hit: a
    listing is remembered by the folder's stamp (an entry made, removed or renamed moves its
    mtime and ctime; one changed in the last seconds is listed again, as for digests), so a
    hit in a folder of many steps costs one ``stat``."""
    key = os.fspath(folder)
    try:
        info = os.stat(key)
        stamp = (info.st_dev, info.st_ino, info.st_mtime_ns, info.st_ctime_ns)
        known = _LISTED.get(key)
        if known is not None and known[0] == stamp:
            return [folder / name for name in known[1]]
        with os.scandir(key) as it:
            names = [e.name for e in it if e.name.startswith(".")]
    except OSError:
        return []
    if settled(info):
        if len(_LISTED) >= 10_000:
            _LISTED.clear()
        _LISTED[key] = (stamp, names)
    return [folder / name for name in names]


_LISTED: dict[str, tuple[tuple[int, int, int, int], list[str]]] = {}  # see _listing


def leftover_kind(name: str) -> str | None:
    """``"temporary"``, ``"trash"``, ``"skipped checkpoint"`` for the names interrupted operations
    leave, else ``None``.

    Examples
    --------
    >>> leftover_kind(".clean.tmp-123-0badc0de"), leftover_kind("clean")
    ('temporary', None)
    """
    if TEMP_NAME.fullmatch(name):
        return "temporary"
    if TRASH_NAME.fullmatch(name):
        return "trash"
    if SKIPPED_NAME.fullmatch(name):
        return "skipped checkpoint"
    return None


@dataclasses.dataclass
class GcReport:
    """What ``%dreamer gc`` did: backups ``removed`` and leftovers ``swept`` (paths relative to
    the output folder), bytes ``freed``, steps ``busy`` in another kernel (left alone), paths
    ``refused`` because they lead out of the output folder."""

    removed: list[str] = dataclasses.field(default_factory=list)
    swept: list[str] = dataclasses.field(default_factory=list)
    freed: int = 0
    busy: list[str] = dataclasses.field(default_factory=list)
    refused: list[str] = dataclasses.field(default_factory=list)

    def lines(self, human_size: Callable[[int], str] = str) -> list[str]:
        """The report as the user reads it."""
        n = len(self.removed)
        out = [f"removed {n} backup{'s' if n != 1 else ''}, freed {human_size(self.freed)}"]
        if self.swept:
            shown = ", ".join(self.swept[:5]) + (f" and {len(self.swept) - 5} more" if len(self.swept) > 5 else "")
            out.append(f"swept {len(self.swept)} leftover{'s' if len(self.swept) != 1 else ''} of interrupted runs: {shown}")
        for name in self.busy:
            out.append(f"skipped `{name}`: another kernel is running it; run `%dreamer gc` again when it has finished")
        for path in self.refused:
            out.append(f"left {path} alone: it is a symlink (gc never follows one out of the output folder)")
        return out


def read_meta(folder: Path, meta_file: str) -> tuple[dict | None, str | None]:
    """Read a step.json/trainer.json. Returns ``(meta, None)`` when complete, else ``(None, problem)``.

    Complete means: the file parses as a JSON object with a fingerprint, and every output it
    lists is still on disk.
    """
    path = folder / meta_file
    if not folder.is_dir():
        return None, "no saved result"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None, f"{meta_file} is missing (the save never finished)"
    except OSError as e:
        return None, f"{meta_file} cannot be read ({e.strerror})"
    except UnicodeDecodeError:
        return None, f"{meta_file} is damaged: not UTF-8 text"
    try:
        meta = json.loads(text)
    except ValueError:
        return None, f"{meta_file} is corrupt (not valid JSON)"
    if not isinstance(meta, dict) or not isinstance(meta.get("fingerprint"), str):
        return None, f"{meta_file} is corrupt (no fingerprint)"
    shape = meta_shape_problem(meta)
    if shape is not None:
        return None, f"{meta_file} is damaged: {shape}"
    outside = unsafe_paths(meta)  # never probe a path that leads outside the folder
    if outside:
        return None, f"{meta_file} is refused: {outside}"
    for name, entry in (meta.get("outputs") or {}).items():
        rel = entry.get("path") if isinstance(entry, dict) else None
        if rel and not (folder / rel).exists():
            return None, f"the saved output {name!r} ({rel}) was deleted"
    return meta, None


# What each key of step.json / trainer.json must hold when present (None is always allowed).
_META_TYPES: dict[str, tuple[type, ...]] = {
    "name": (str,),
    "kind": (str,),
    "source": (str,),
    "created": (str,),
    "parent": (str,),
    "duration": (int, float),
    "components": (dict,),
    "outputs": (dict,),
    "dependencies": (dict,),
    "input_previews": (dict,),
    "packages": (dict,),
    "inputs": (list,),
    "rebind": (list,),
    "deleted": (list,),
    "losses": (list,),
    "eval_losses": (list,),
    "checkpoints": (list,),
    "not_saved": (dict,),
    "trained": (dict,),
    "final_step": (int, float),
    "max_steps": (int, float),
}
_COMPONENT_TYPES: dict[str, tuple[type, ...]] = {"inputs": (dict,), "libraries": (dict,), "source": (str,)}


def _type_name(types: tuple[type, ...]) -> str:
    return {str: "a string", dict: "an object", list: "a list", int: "a number"}[types[0]]


def meta_shape_problem(meta: dict) -> str | None:
    """What is wrongly shaped in a parsed step.json/trainer.json, or ``None`` if nothing is.

    Examples
    --------
    >>> meta_shape_problem({"fingerprint": "ab", "outputs": []})
    '`outputs` is not an object'
    >>> meta_shape_problem({"fingerprint": "ab", "outputs": {"x": {"path": "_outputs/x.json"}}}) is None
    True

    A folder whose metadata was edited by hand, truncated into valid JSON, or written by
    something else is then a miss (and kept aside when the step runs), never a traceback.
    """
    for key, types in _META_TYPES.items():
        value = meta.get(key)
        if value is not None and (not isinstance(value, types) or isinstance(value, bool)):
            return f"`{key}` is not {_type_name(types)}"
    for key, types in _COMPONENT_TYPES.items():
        value = (meta.get("components") or {}).get(key)
        if value is not None and not isinstance(value, types):
            return f"`components.{key}` is not {_type_name(types)}"
    for name, entry in (meta.get("outputs") or {}).items():
        if not isinstance(entry, dict):
            return f"the output {name!r} is not an object"
        for key in ("path", "type", "storage"):
            if entry.get(key) is not None and not isinstance(entry[key], str):
                return f"the output {name!r} has a `{key}` that is not a string"
    for key in ("losses", "eval_losses"):
        for point in meta.get(key) or []:
            if not (isinstance(point, list) and len(point) == 2 and all(_is_number(v) for v in point)):
                return f"`{key}` holds something other than [step, loss] pairs"
    for key in ("inputs", "rebind", "deleted", "checkpoints"):
        if not all(isinstance(v, str) for v in meta.get(key) or []):
            return f"`{key}` holds something other than strings"
    return None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class OutputFolder:
    """One output folder on disk.

    Examples
    --------
    >>> out = OutputFolder("/tmp/output")  # doctest: +SKIP
    >>> with out.lock("clean-reviews"):     # doctest: +SKIP
    ...     ...
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root).absolute()

    # -- set-up ---------------------------------------------------------------------
    def ensure(self) -> Path:
        """Create the folder (with a ``.gitignore``); a clear error if it is a file."""
        if os.path.isfile(os.path.join(self.root, ".gitignore")):  # made before (every hit): one stat
            return self.root
        if self.root.exists() and not self.root.is_dir():
            raise DreamerError(
                f"the output folder {str(self.root)!r} is a file, not a folder; choose another "
                "path with `%dreamer output PATH`"
            )
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DreamerError(f"cannot create the output folder {str(self.root)!r}: {e.strerror}") from None
        gitignore = self.root / ".gitignore"
        if not gitignore.exists():
            with contextlib.suppress(OSError):
                gitignore.write_text("# written by dreamer_magic: results, not sources\n*\n")
        return self.root

    @property
    def cache_dir(self) -> Path:
        return self.root / ".cache"

    def path(self, name_path: str) -> Path:
        """The folder of a step or trainer; ``name_path`` is ``a`` or ``parent/child``."""
        return self.root.joinpath(*name_path.split("/"))

    def backup_dir(self, name_path: str) -> Path:
        return self.root.joinpath(BACKUPS, *name_path.split("/"))

    # -- locks ----------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, name_path: str, on_wait: Callable[[], Any] | None = None) -> Iterator[None]:
        """Hold the lock of one step or trainer (across processes; freed if a process dies).

        ``on_wait`` is called once if another kernel holds it, before waiting. The lock is an
        OS file lock (``fcntl.flock`` on POSIX, ``filelock`` elsewhere).
        """
        held: Any = None
        for locks in (self.root / ".locks", None):
            locks = locks if locks is not None else _fallback_locks(self.root)  # only when needed
            try:
                if not locks.is_dir():  # (a mkdir that fails with "exists" costs more than a stat)
                    locks.mkdir(parents=True, exist_ok=True)
                held = _os_lock(str(locks / lock_file_name(name_path)), on_wait)
                held.__enter__()
                break
            except OSError as e:
                # a read-only output folder: lock in the temporary folder instead (a hit only
                # reads), and with no writable place at all, go on without a lock
                if e.errno not in WRITE_REFUSED:
                    raise
                held = None
        try:
            yield
        finally:
            if held is not None:
                held.__exit__(None, None, None)

    @contextlib.contextmanager
    def try_lock(self, name_path: str) -> Iterator[bool]:
        """Hold the lock of one step or trainer if it is free now: yields whether it is held.

        ``%dreamer gc`` uses it: a step another kernel is running is left alone, not waited for.
        """
        locks = self.root / ".locks"
        locks.mkdir(parents=True, exist_ok=True)
        with _os_lock(str(locks / lock_file_name(name_path)), None, wait=False) as held:
            yield held

    # -- temporary folders ------------------------------------------------------------
    def new_temp(self, final: Path) -> Path:
        """A fresh temporary folder beside ``final`` (same file system, so rename is atomic)."""
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        return tmp

    def clean_temps(self, final: Path) -> int:
        """Remove leftovers of interrupted operations on ``final``. Call while holding its lock.

        They are its temporary folders and trash beside it (``.<name>.tmp-<pid>-<random>``,
        ``.<name>.trash-<random>``), the trash among its backups, and a trainer's checkpoints
        that were being written or replaced (``_checkpoints/.checkpoint-N.tmp-…``). Returns how many.
        """
        return len(self.sweep(final))

    def sweep(self, final: Path, *, deep: bool = False) -> dict[Path, int]:
        """Delete what interrupted operations on ``final`` left; returns what was deleted (bytes freed).

        Only names this module makes are touched (see :func:`leftover_kind`), and only those of
        this step or trainer: call while holding its lock, so none of them is in use. ``deep``
        (``%dreamer gc``) also looks inside the folder: trash and temporary files of checkpoints and
        metadata, ``.skipped-checkpoint-N`` folders, nested steps' leftovers. Symlinks are not followed.
        """
        found: list[Path] = []
        mine = (f".{final.name}.tmp-", f".{final.name}.trash-")
        found += [p for p in _listing(final.parent) if p.name.startswith(mine) and leftover_kind(p.name)]
        with contextlib.suppress(ValueError):
            backups = self.backup_dir(final.relative_to(self.root).as_posix())
            if backups.is_dir() and not backups.is_symlink() and is_inside(backups, self.root):
                found += [p for p in _listing(backups) if leftover_kind(p.name) in ("temporary", "trash")]
        checkpoints = final / "_checkpoints"  # a trainer's: checkpoints being written or replaced when it was killed
        if checkpoints.is_dir() and not final.is_symlink() and not checkpoints.is_symlink():
            found += [p for p in _listing(checkpoints) if leftover_kind(p.name) in ("temporary", "trash")]
        if deep and final.is_dir() and not final.is_symlink():
            for dirpath, dirnames, filenames in os.walk(final):
                for name in dirnames + filenames:
                    if leftover_kind(name):
                        found.append(Path(dirpath, name))
                dirnames[:] = [d for d in dirnames if not leftover_kind(d)]
        return {path: remove_path(path) for path in dict.fromkeys(found)}

    # -- commit, backup, restore ------------------------------------------------------
    def commit(self, tmp: Path, final: Path, name_path: str, meta_file: str, meta: dict) -> str | None:
        """Write the metadata file last, back up what is at ``final``, rename ``tmp`` into place.

        Returns where the previous folder went (``None`` if there was none).
        """
        fsync_tree(tmp)  # the data is on disk before the metadata that says it is complete
        write_json_atomic(tmp / meta_file, meta)
        moved = self.move_to_backup(final, name_path, meta_file)
        os.rename(tmp, final)
        _fsync_dir(final.parent)
        return moved

    def move_to_backup(self, final: Path, name_path: str, meta_file: str, *, damaged: bool = False) -> str | None:
        """Move the folder at ``final`` (if any) to ``_backups/<name>/<its fingerprint>``.

        An incomplete folder (or one known to be ``damaged``) goes to
        ``_backups/<name>/incomplete-<time>`` instead: it never replaces a good backup, and
        nothing is deleted that a person might still want.
        """
        if not final.exists():
            return None
        old, _ = read_meta(final, meta_file)
        if old and not damaged:
            key = old["fingerprint"]
        else:
            key = f"incomplete-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"
        dest = self.backup_dir(name_path) / key
        dest.parent.mkdir(parents=True, exist_ok=True)
        trash = None
        if dest.exists():  # the same fingerprint backed up before: the newer copy wins
            trash = trash_name(dest)  # renamed first, deleted last: a kill leaves trash the next run sweeps
            os.rename(dest, trash)
        os.rename(final, dest)
        _fsync_dir(dest.parent)
        if trash is not None:
            remove_path(trash)
        return str(dest.relative_to(self.root))

    def find_backup(self, name_path: str, fingerprint: str, meta_file: str) -> tuple[Path, dict] | None:
        """A complete backup of ``name_path`` with ``fingerprint``, if there is one."""
        path = self.backup_dir(name_path) / fingerprint
        meta, _ = read_meta(path, meta_file)
        if meta is not None and meta.get("fingerprint") == fingerprint:
            return path, meta
        return None

    def restore(self, name_path: str, fingerprint: str, meta_file: str) -> dict | None:
        """Put the backup with ``fingerprint`` back in place (backing up the current folder)."""
        found = self.find_backup(name_path, fingerprint, meta_file)
        if found is None:
            return None
        path, meta = found
        final = self.path(name_path)
        current, _ = read_meta(final, meta_file)
        # the folder in place has this very fingerprint only if it failed to load: keep it
        # aside rather than let it replace the good backup
        damaged = current is not None and current.get("fingerprint") == fingerprint
        self.move_to_backup(final, name_path, meta_file, damaged=damaged)
        os.rename(path, final)
        _fsync_dir(final.parent)
        return meta

    def backups(self, name_path: str, meta_file: str | None = None) -> list[tuple[str, Path, dict | None]]:
        """``(key, path, meta)`` for each backup of ``name_path``, newest first."""
        base = self.backup_dir(name_path)
        if not base.is_dir():
            return []
        out = []
        for child in base.iterdir():
            if child.name.startswith(".") or not child.is_dir():
                continue
            meta = None
            for candidate in ([meta_file] if meta_file else ["step.json", "trainer.json"]):
                meta, _ = read_meta(child, candidate)
                if meta:
                    break
            if meta is None and not child.name.startswith("incomplete-") and not any(
                (child / f).exists() for f in ("step.json", "trainer.json")
            ):
                continue  # a parent folder of nested backups, not a backup itself
            out.append((child.name, child, meta))
        out.sort(key=lambda item: (item[2] is not None, _mtime(item[1])), reverse=True)
        return out

    # -- listing ----------------------------------------------------------------------
    @staticmethod
    def kind_of(folder: Path) -> str:
        """``"trainer"`` or ``"step"``, from what the folder holds."""
        return "trainer" if (folder / "trainer.json").exists() or (folder / "_checkpoints").is_dir() else "step"

    def entries(self) -> list[tuple[str, str, Path]]:
        """``(name_path, kind, folder)`` of every step and trainer folder, nested ones included."""
        out: list[tuple[str, str, Path]] = []
        if not self.root.is_dir():
            return out

        def walk(folder: Path, prefix: str) -> None:
            for child in sorted(folder.iterdir()):
                if not child.is_dir() or child.name.startswith((".", "_")):
                    continue
                kind = self.kind_of(child)
                name_path = f"{prefix}{child.name}"
                out.append((name_path, kind, child))
                walk(child, name_path + "/")

        walk(self.root, "")
        return out

    def overview(self) -> list[dict[str, Any]]:
        """One row per step and trainer folder, for ``%dreamer status``: name, kind, state, size,
        backups, fingerprint, created, duration."""
        rows = []
        for name_path, kind, folder in self.entries():
            meta, problem = read_meta(folder, "trainer.json" if kind == "trainer" else "step.json")
            rows.append(
                {
                    "name": name_path,
                    "kind": kind,
                    "state": "complete" if meta else f"incomplete ({problem})",
                    "size": folder_size(folder),
                    "backups": len(self.backups(name_path)),
                    "fingerprint": (meta or {}).get("fingerprint", ""),
                    "created": (meta or {}).get("created", ""),
                    "duration": (meta or {}).get("duration"),
                }
            )
        return rows

    def backed_up_names(self) -> list[str]:
        base = self.root / BACKUPS
        names: list[str] = []
        if not base.is_dir():
            return names
        for dirpath, dirnames, filenames in os.walk(base):
            if "step.json" in filenames or "trainer.json" in filenames or Path(dirpath).name.startswith("incomplete-"):
                rel = Path(dirpath).relative_to(base)
                name = "/".join(rel.parts[:-1])
                if name and name not in names:
                    names.append(name)
                dirnames.clear()
        return names

    def gc(self, keep: int = 0) -> GcReport:
        """Delete all but the ``keep`` best backups of every step and trainer, and sweep leftovers.

        Examples
        --------
        >>> OutputFolder("output").gc(keep=1).lines()  # doctest: +SKIP
        ['removed 3 backups, freed 12.0 MB']

        Best means complete first (a complete backup outranks an incomplete one), then newest.
        Each step is handled under its lock, as a run or restore is (one that another kernel is
        running is skipped and named in ``busy``); each backup is renamed to a trash name before
        it is deleted, so a killed gc leaves nothing that reads as a backup, only trash that the
        next run or gc sweeps. Nothing is followed through a symlink out of the output folder.
        """
        report = GcReport()
        if not self.root.is_dir():
            return report
        prune = not self._leads_out(self.root / BACKUPS, report)
        for name in self._gc_names():
            with self.try_lock(name) as held:
                if not held:
                    report.busy.append(name)
                    continue
                self._gc_one(name, keep if prune else None, report)
        return report

    def _gc_names(self) -> list[str]:
        """Top-level step and trainer names with a folder, backups or leftovers in the output folder."""
        names = {n.split("/")[0] for n in self.backed_up_names()}
        names |= {name_path for name_path, _, _ in self.entries() if "/" not in name_path}
        for child in self.root.iterdir():
            match = TEMP_NAME.fullmatch(child.name) or TRASH_NAME.fullmatch(child.name)
            if match and "/" not in match["of"]:
                names.add(match["of"])
        return sorted(names)

    def _gc_one(self, name: str, keep: int | None, report: GcReport) -> None:
        """Sweep one step's leftovers and prune its backups to ``keep`` (``None``: leave them); its lock is held."""
        final = self.path(name)
        self._leads_out(final, report)  # a symlinked step folder: swept beside, never inside
        for path, size in self.sweep(final, deep=True).items():
            report.swept.append(str(path.relative_to(self.root)))
            report.freed += size
        if keep is None or self._leads_out(self.backup_dir(name), report):
            return
        for backup_name in [n for n in self.backed_up_names() if n == name or n.startswith(name + "/")]:
            for _, path, _ in self.backups(backup_name)[keep:]:
                if not self._leads_out(path, report):
                    report.freed += discard(path)
                    report.removed.append(str(path.relative_to(self.root)))

    def _leads_out(self, path: Path, report: GcReport) -> bool:
        """Whether ``path`` is a symlink or leads out of the output folder (then it is named in the report)."""
        if path.is_symlink() or (path.exists() and not is_inside(path, self.root)):
            report.refused.append(str(path.relative_to(self.root)))
            return True
        return False


def _mtime(path: Path) -> float:
    try:
        return os.lstat(path).st_mtime
    except OSError:
        return 0.0


def _fallback_locks(root: Path) -> Path:
    """Where the locks of a read-only output folder live: one folder per output folder under
    the system's temporary folder (kernels on this machine still exclude each other)."""
    import tempfile

    import xxhash

    return Path(tempfile.gettempdir(), "dreamer_magic-locks", xxhash.xxh3_64_hexdigest(str(root).encode()))


@contextlib.contextmanager
def saving_into(root: Path, what: str) -> Iterator[None]:
    """Turn the file-system errors of starting to save ``what`` into one clear line.

    Examples
    --------
    >>> with saving_into(out.root, "step 'clean'"):  # doctest: +SKIP
    ...     tmp = out.new_temp(final)

    Raises
    ------
    DreamerError
        The output folder is read-only (``EROFS``, ``EACCES``, ``EPERM``), or a file name is
        too long for its file system.
    """
    try:
        yield
    except OSError as e:
        if e.errno in WRITE_REFUSED:
            raise DreamerError(
                f"the output folder {str(root)!r} is read-only ({e.strerror}): {what} must run, and "
                "its result cannot be saved there (saved results still load). Choose a writable "
                "output folder with `%dreamer output PATH`"
            ) from None
        if e.errno == errno.ENAMETOOLONG:
            raise DreamerError(
                f"a file name is too long for the file system of the output folder {str(root)!r} while "
                f"saving {what}: choose a shorter name"
            ) from None
        raise


def lock_file_name(name_path: str) -> str:
    """The lock file of a step or trainer: ``a__b.lock`` for ``a/b``, shortened with a digest
    when a nested name would pass the file system's 255 bytes per name.

    Examples
    --------
    >>> lock_file_name("parent/child")
    'parent__child.lock'
    """
    stem = name_path.replace("/", "__")
    if len(stem.encode("utf-8", "surrogatepass")) > NAME_MAX_BYTES:
        import xxhash

        digest = xxhash.xxh3_64_hexdigest(stem.encode("utf-8", "surrogatepass"))
        stem = stem.encode("utf-8", "surrogatepass")[:100].decode("utf-8", "ignore") + "-" + digest
    return stem + ".lock"


@contextlib.contextmanager
def write_folder(final: Path) -> Iterator[Path]:
    """Build a folder under a temporary name beside ``final``, then put it in place whole.

    Examples
    --------
    >>> with write_folder(ckpts / "checkpoint-300") as tmp:   # doctest: +SKIP
    ...     (tmp / "weights.bin").write_bytes(data)

    When the block ends, every file is fsynced and the folder renamed to ``final`` (a folder
    already there is replaced); if the block raises, the temporary folder is removed and
    ``final`` is untouched. So ``final`` either exists whole or as it was before.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
        trash = None
        if final.exists():  # renamed first, deleted last: a kill leaves trash that gc sweeps
            trash = trash_name(final)
            os.rename(final, trash)
        os.rename(tmp, final)
        if trash is not None:
            remove_path(trash)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(final.parent)
