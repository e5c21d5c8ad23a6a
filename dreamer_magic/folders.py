"""The output folder: names, atomic writes, locks, backups and restore, metadata files.

Layout (SPEC §2)::

    output/
      <step>/            _dataset/, _outputs/, step.json (written last = complete)
      <trainer>/         _checkpoints/, _model/, trainer.json (written last)
      .cache/            generation caches
      _backups/<name>/<fingerprint>/
      .locks/            one lock file per step or trainer (fcntl; released when a process dies)

A folder is written under a temporary name (``.<name>.tmp-<pid>-<random>``) and renamed into
place; a folder without a valid metadata file is never treated as complete.

Examples
--------
>>> validate_name("Clean Reviews")
'clean-reviews'
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import DreamerError, InvalidNameError
from .integrity import unsafe_paths

NAME_RULE = (
    "a name must be 1-100 characters of letters, digits, space, '_', '-' or '.', "
    "must not start with '.' or '_', and must not be '..'"
)
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


def file_digest(path: str | os.PathLike, chunk: int = 1 << 23) -> str:
    """xxh3-128 of a file's content, read in 8 MB chunks."""
    import xxhash

    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def tree_digest(path: str | os.PathLike) -> str:
    """xxh3-128 of a file, or of every file under a folder (relative paths, sizes, contents).

    Symlinks are not followed. Examples: ``tree_digest(step / "_dataset")`` changes whenever
    any byte of the saved dataset does.
    """
    import xxhash

    root = Path(path)
    if root.is_file() and not root.is_symlink():
        return file_digest(root)
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
            h.update(str(full.stat().st_size).encode() + b":" + file_digest(full).encode())
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
    """fsync every file under ``path`` (before the metadata that commits them is written)."""
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            with contextlib.suppress(OSError):
                fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)


def fsync_dir(path: Path) -> None:
    """fsync a folder, so that a rename inside it is durable."""
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


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
    try:
        meta = json.loads(text)
    except ValueError:
        return None, f"{meta_file} is corrupt (not valid JSON)"
    if not isinstance(meta, dict) or not isinstance(meta.get("fingerprint"), str):
        return None, f"{meta_file} is corrupt (no fingerprint)"
    outside = unsafe_paths(meta)  # never probe a path that leads outside the folder
    if outside:
        return None, f"{meta_file} is refused: {outside}"
    for name, entry in (meta.get("outputs") or {}).items():
        rel = entry.get("path") if isinstance(entry, dict) else None
        if rel and not (folder / rel).exists():
            return None, f"the saved output {name!r} ({rel}) was deleted"
    return meta, None


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
        OS file lock (``filelock``: ``fcntl`` on POSIX, ``msvcrt`` on Windows).
        """
        from filelock import FileLock, Timeout

        locks = self.root / ".locks"
        locks.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(locks / (name_path.replace("/", "__") + ".lock")), thread_local=False)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            if on_wait is not None:
                on_wait()
            lock.acquire()
        try:
            yield
        finally:
            lock.release()

    # -- temporary folders ------------------------------------------------------------
    def new_temp(self, final: Path) -> Path:
        """A fresh temporary folder beside ``final`` (same file system, so rename is atomic)."""
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        return tmp

    def clean_temps(self, final: Path) -> int:
        """Remove leftovers of interrupted saves of ``final``. Call while holding its lock."""
        removed = 0
        if not final.parent.is_dir():
            return 0
        pattern = re.compile(re.escape(f".{final.name}.tmp-") + r"\d+-[0-9a-f]{8}")
        for leftover in final.parent.iterdir():
            if pattern.fullmatch(leftover.name):  # not the temp folder of a step named "x.tmp-…"
                shutil.rmtree(leftover, ignore_errors=True)
                removed += 1
        return removed

    # -- commit, backup, restore ------------------------------------------------------
    def commit(self, tmp: Path, final: Path, name_path: str, meta_file: str, meta: dict) -> str | None:
        """Write the metadata file last, back up what is at ``final``, rename ``tmp`` into place.

        Returns where the previous folder went (``None`` if there was none).
        """
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
        if dest.exists():  # the same fingerprint backed up before: the newer copy wins
            trash = dest.parent / f".{key}.trash-{uuid.uuid4().hex[:8]}"
            os.rename(dest, trash)
            shutil.rmtree(trash, ignore_errors=True)
        os.rename(final, dest)
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
        out.sort(key=lambda item: item[1].stat().st_mtime, reverse=True)
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

    def gc(self, keep: int = 0) -> tuple[int, int]:
        """Delete all but the ``keep`` newest backups of every step and trainer.

        Returns ``(folders removed, bytes freed)``.
        """
        removed = freed = 0
        for name in self.backed_up_names():
            for _, path, _ in self.backups(name)[keep:]:
                size = folder_size(path)
                shutil.rmtree(path, ignore_errors=True)
                removed += 1
                freed += size
        return removed, freed


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
        if final.exists():
            trash = final.parent / f".{final.name}.trash-{uuid.uuid4().hex[:8]}"
            os.rename(final, trash)
            shutil.rmtree(trash, ignore_errors=True)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(final.parent)
