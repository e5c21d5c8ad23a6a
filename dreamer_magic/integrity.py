"""What a step wrote, and that a hit loads only that: the file record, confinement, file formats.

Three checks stand between a folder on disk and a hit (SPEC §3, *Integrity*):

- **the file record**: step.json (trainer.json) lists every file the step wrote with its size
  and xxh3-128 digest (:func:`record_files`); a hit verifies them (:func:`verify_record`),
  sizes always, digests unless ``verify="size"``. A folder saved before records existed is
  still a hit, unverified.
- **confinement**: no path in the metadata (:func:`unsafe_paths`), in a saved dataset's
  ``state.json``/``dataset_dict.json`` (:func:`check_dataset_state`), nor any symlink inside
  the folder (:func:`check_links`) leads outside it. Checked before anything is opened.
- **formats**: what a file *is*, from its first bytes (:func:`sniff`): a pickle, a torch
  archive with a pickle inside, an ``.npy`` (with or without object dtype), Arrow, Parquet,
  safetensors, JSON. ``storage.py`` uses it to refuse pickles by content, not by the word of
  the metadata.

A folder that fails the first two is a :class:`~dreamer_magic.errors.DamagedResultError`:
the lifecycle treats it as a miss and sets the folder aside (it is never deleted).

Examples
--------
>>> unsafe_path("_outputs/x.npy") is None
True
>>> unsafe_path("../secret")
'it goes up out of the folder (`..`)'
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import re
import stat
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

from .errors import DamagedResultError, DreamerError

RECORD = "files"  # the key of step.json / trainer.json that holds the file record
DIGEST = "xxh3_128"
VERIFY_MODES = ("digest", "size")
SKIPPED_FOLDERS = {"_backups", "_checkpoints"}  # nested backups; a trainer's checkpoints (checked on their own)
LIFECYCLE_FILES = {"replay.json", "rng_state.json"}  # read on a hit: one that appears later matters
_DRIVE = re.compile(r"^[A-Za-z]:")


# --------------------------------------------------------------------------- paths


def unsafe_path(rel: Any) -> str | None:
    """Why ``rel`` (a path read from metadata) must not be followed, or ``None`` if it stays inside.

    Examples
    --------
    >>> unsafe_path("/etc/passwd")
    'it is absolute'
    >>> unsafe_path("C:x")
    'it names a drive'
    >>> unsafe_path("a\\\\b")
    'it holds a backslash'
    """
    if not isinstance(rel, str) or not rel:
        return "it is not a path"
    if "\x00" in rel:
        return "it holds a NUL byte"
    if "\\" in rel:
        return "it holds a backslash"
    if rel.startswith("/") or rel.startswith("~"):
        return "it is absolute"
    if _DRIVE.match(rel):
        return "it names a drive"
    if ".." in rel.split("/"):
        return "it goes up out of the folder (`..`)"
    if not posixpath.normpath(rel).strip("./"):
        return "it names the folder itself"
    return None


def _entry_paths(entry: Any) -> Iterable[tuple[str, Any]]:
    if isinstance(entry, dict):
        yield "path", entry.get("path")
        if "exact_columns" in entry:
            yield "exact_columns", entry.get("exact_columns")


def unsafe_paths(meta: Mapping[str, Any]) -> str | None:
    """The first path in step.json/trainer.json (outputs, the file record) that leads outside, as a sentence.

    Examples
    --------
    >>> unsafe_paths({"outputs": {"x": {"path": "../../x.npy"}}})
    "output 'x' points outside the step folder (`../../x.npy`: it goes up out of the folder (`..`))"
    """
    outputs = meta.get("outputs")
    if isinstance(outputs, dict):
        for name, entry in outputs.items():
            for key, rel in _entry_paths(entry):
                if rel is None:
                    continue  # an entry without a path is reported by whoever loads it
                why = unsafe_path(rel)
                if why:
                    return f"output {name!r} points outside the step folder (`{rel}`: {why})"
    record = meta.get(RECORD)
    if isinstance(record, dict):
        for rel in record:
            why = unsafe_path(rel)
            if why:
                return f"the file record names a path outside the step folder (`{rel}`: {why})"
    return None


def check_links(folder: Path) -> None:
    """Refuse a folder holding a symlink (at any depth) that leads outside it.

    A link is judged by its text (never followed): absolute, or climbing out with ``..``.

    Raises
    ------
    DamagedResultError
        Naming the link and where it points.
    """
    root = os.path.abspath(folder)
    real = os.path.realpath(folder)
    pending = [root]
    while pending:  # os.scandir: the entry types come with the listing, no lstat per entry
        dirpath = pending.pop()
        try:
            entries = list(os.scandir(dirpath))
        except OSError:
            continue  # not a folder (or gone): nothing under it to follow
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                pending.append(entry.path)
            if not entry.is_symlink():
                continue
            target = os.readlink(entry.path)
            where = os.path.normpath(os.path.join(dirpath, target))  # an absolute target stays itself
            inside = any(where == base or where.startswith(base + os.sep) for base in (root, real))
            if not inside:
                rel = os.path.relpath(entry.path, root).replace(os.sep, "/")
                raise DamagedResultError(f"`{rel}` is a symlink to `{target}`, outside the step folder: refused")


def check_dataset_state(path: Path, rel: str) -> None:
    """Refuse a saved dataset (``save_to_disk`` folder) whose ``state.json`` or
    ``dataset_dict.json`` names files outside it. Reads only those JSON files.

    Raises
    ------
    DamagedResultError
        Naming the file and the path it holds.
    """
    import json

    def load(file: Path) -> Any:
        try:
            return json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise DamagedResultError(f"`{rel}/{file.relative_to(path).as_posix()}` cannot be read ({e})") from None

    folders = [(path, rel)]
    if (path / "dataset_dict.json").is_file():
        splits = load(path / "dataset_dict.json")
        splits = splits.get("splits") if isinstance(splits, dict) else None
        if not isinstance(splits, list):
            raise DamagedResultError(f"`{rel}/dataset_dict.json` lists no splits")
        folders = []
        for split in splits:
            why = unsafe_path(split) or ("it is not one folder name" if "/" in str(split) else None)
            if why:
                raise DamagedResultError(f"`{rel}/dataset_dict.json` names a split outside the dataset (`{split}`: {why}): refused")
            folders.append((path / split, f"{rel}/{split}"))
    for folder, shown in folders:
        state_file = folder / "state.json"
        if not state_file.is_file():
            continue  # load_from_disk says what is missing
        state = load(state_file)
        files = state.get("_data_files") if isinstance(state, dict) else None
        if not isinstance(files, list):
            raise DamagedResultError(f"`{shown}/state.json` lists no data files")
        for item in files:
            name = item.get("filename") if isinstance(item, dict) else None
            why = unsafe_path(name)
            if why:
                raise DamagedResultError(f"`{shown}/state.json` names a data file outside the dataset (`{name}`: {why}): refused")


# --------------------------------------------------------------------------- the file record

# Digests this process computed, by file identity: ``(st_dev, st_ino) -> (size, mtime_ns,
# ctime_ns, digest)``. The kernel moves a file's ctime on every write (and on utime, so a reset
# mtime does not hide one), so a file whose identity, size, mtime and ctime are all unchanged has
# the content it was hashed with: a second hit in one kernel does not hash it again. A new
# process starts empty, so the first hit after a restart hashes everything. As with git's
# "racily clean" index entries, a file changed in the last seconds is not remembered: file
# times tick at the kernel's clock granularity, and a same-size rewrite within one tick would
# keep its stamp.
_RACY_NS = 2_000_000_000
_KNOWN: dict[tuple[int, int], tuple[int, int, int, str]] = {}
_KNOWN_LIMIT = 200_000


def _stamp(info: os.stat_result) -> tuple[int, int, int]:
    return info.st_size, info.st_mtime_ns, info.st_ctime_ns


def settled(info: os.stat_result) -> bool:
    """Whether the file or folder ``info`` describes last changed long enough ago for its stamp
    to be trusted (the racy rule every memo keyed by stamps follows)."""
    return time.time_ns() - max(info.st_mtime_ns, info.st_ctime_ns) >= _RACY_NS


def known_digest(info: os.stat_result) -> str | None:
    """The digest this process computed for the file ``info`` describes, if it has not changed since."""
    found = _KNOWN.get((info.st_dev, info.st_ino))
    return found[3] if found is not None and found[:3] == _stamp(info) else None


def _remember(path: str | os.PathLike, before: os.stat_result, digest: str) -> None:
    if not settled(before):
        return
    with contextlib.suppress(OSError):
        if _stamp(os.stat(path)) != _stamp(before):  # written to while it was hashed
            return
        if len(_KNOWN) >= _KNOWN_LIMIT:
            _KNOWN.clear()
        _KNOWN[(before.st_dev, before.st_ino)] = (*_stamp(before), digest)


def forget_digests() -> None:
    """Hash (and sniff) every file again at the next hit, as a fresh process would (benchmarks, tests)."""
    _KNOWN.clear()
    _SNIFFED.clear()
    _CHECKED.clear()


# Step folders whose hit checks (symlinks, the file record, the formats of the outputs' files)
# passed in this process: ``str(folder) -> (what, record, outputs, stamps)``. Kept by the rule of
# the digest memo: every folder in the step folder (an entry added, removed or replaced moves
# its folder's mtime and ctime) and every file of the record has the stamp it had when checked,
# none of them changed within the last seconds; then the same checks would find the same. A
# second hit in one kernel costs a stat per file and folder instead of reading them.
_CHECKED: dict[str, tuple[Any, Any, Any, tuple]] = {}


def _folder_stamps(
    folder: Path, record: Mapping[str, Any], dirs: Iterable[str] | None, expected: tuple | None = None
) -> tuple[list[str], tuple] | None:
    """``(folders, stamps)`` of ``folder``'s folders (listed now when ``dirs`` is ``None``)
    and its record's files; ``None`` when one is missing or changed within the racy window, or
    differs from ``expected`` (the folders come first, so a folder replaced by a symlink is
    seen before anything under it is looked at)."""
    root = os.fspath(folder)
    if dirs is None:
        dirs, pending = [], [root]
        while pending:
            current = pending.pop()
            dirs.append(os.path.relpath(current, root))
            try:
                with os.scandir(current) as it:
                    pending += [e.path for e in it if e.is_dir(follow_symlinks=False)]
            except OSError:
                return None
    stamps = []
    try:
        for rel in list(dirs) + [r.replace("/", os.sep) for r in record]:
            info = os.lstat(os.path.join(root, rel))
            if not settled(info):
                return None
            stamps.append((info.st_dev, info.st_ino, info.st_mode, *_stamp(info)))
            if expected is not None and (len(stamps) > len(expected) or stamps[-1] != expected[len(stamps) - 1]):
                return None
    except (OSError, AttributeError):
        return None
    return list(dirs), tuple(stamps)


def checked_before(folder: Path, meta: Mapping[str, Any], mode: str, allow_pickle: bool) -> bool:
    """Whether this process checked ``folder`` with this metadata and passed, with checks at
    least as strict (digests cover sizes; pickles refused covers pickles allowed), and nothing
    in it has changed since (see ``_CHECKED``)."""
    found = _CHECKED.get(os.fspath(folder))
    if found is None:
        return False
    (was_mode, was_pickle), record, outputs, (dirs, stamps) = found
    if (was_mode != mode and was_mode != "digest") or (was_pickle and not allow_pickle):
        return False
    if meta.get(RECORD) != record or meta.get("outputs") != outputs:
        return False
    now = _folder_stamps(folder, record, dirs, stamps)
    return now is not None and now[1] == stamps


def remember_checked(folder: Path, meta: Mapping[str, Any], mode: str, allow_pickle: bool) -> None:
    """Note that ``folder`` passed the hit checks (``mode``, ``allow_pickle``) with ``meta``."""
    record = meta.get(RECORD)
    if not isinstance(record, dict):
        return
    found = _folder_stamps(folder, record, None)
    if found is None:
        return
    if len(_CHECKED) >= 10_000:
        _CHECKED.clear()
    import copy

    _CHECKED[os.fspath(folder)] = ((mode, allow_pickle), copy.deepcopy(record), copy.deepcopy(meta.get("outputs")), found)


def digest_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """xxh3-128 of a file's content, read in 1 MB chunks into one reused buffer.

    (A fresh 8 MB ``bytes`` per read, or a memory map touched for the first time in a process,
    pays a page fault per 4 KB: on a cold hit that is five times the hash itself.)
    """
    import xxhash

    h = xxhash.xxh3_128()
    buffer = bytearray(chunk)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            h.update(view[:n])
    return h.hexdigest()


def _in_scope(folder: Path, skip: Iterable[str]) -> Iterable[tuple[str, str]]:
    """``(relative path, full path)`` of every file the record covers: the top-level files
    (not hidden, not ``skip``) and everything under the top-level ``_`` folders (not the
    nested backups or checkpoints). Nested steps' folders have their own record."""
    skipped = set(skip)
    with os.scandir(folder) as it:
        tops = sorted(it, key=lambda e: e.name)
    for top in tops:
        if top.name.startswith(".") or top.name in skipped:
            continue
        if top.is_dir(follow_symlinks=False):
            if not top.name.startswith("_") or top.name in SKIPPED_FOLDERS:
                continue
            for dirpath, dirnames, filenames in os.walk(top.path):
                dirnames.sort()
                for name in sorted(filenames):
                    full = os.path.join(dirpath, name)
                    yield os.path.relpath(full, folder).replace(os.sep, "/"), full
        else:
            yield top.name, top.path


def record_files(folder: Path, skip: Iterable[str] = ()) -> dict[str, dict[str, Any]]:
    """The file record of a folder about to be committed: ``{relative path: {"size", "xxh3_128"}}``.

    Examples
    --------
    >>> record_files(tmp)  # doctest: +SKIP
    {'_outputs/xs.npy': {'size': 152, 'xxh3_128': '9f0c...'}, 'replay.json': {...}}

    ``skip`` names top-level entries left out (the metadata file itself).
    """
    out: dict[str, dict[str, Any]] = {}
    for rel, full in _in_scope(folder, skip):
        info = os.lstat(full)
        if stat.S_ISLNK(info.st_mode):
            out[rel] = {"link": os.readlink(full)}
        else:
            digest = digest_file(full)
            _remember(full, info, digest)
            out[rel] = {"size": info.st_size, DIGEST: digest}
    return out


def tree_digest_of(record: Mapping[str, Mapping[str, Any]], rel: str) -> str | None:
    """``folders.tree_digest`` of the file or folder ``rel``, computed from the record (no reading).

    ``None`` if the record does not cover ``rel``.
    """
    import xxhash

    rel = rel.strip("/")
    if rel in record:
        return record[rel].get(DIGEST)
    prefix = rel + "/"
    inside = sorted((k[len(prefix):], v) for k, v in record.items() if k.startswith(prefix))
    if not inside:
        return None
    h = xxhash.xxh3_128()
    for sub, item in inside:
        h.update(sub.encode("utf-8", "surrogatepass") + b"\x00")
        if "link" in item:
            h.update(b"link:" + str(item["link"]).encode("utf-8", "surrogatepass"))
        else:
            h.update(str(item["size"]).encode() + b":" + str(item[DIGEST]).encode())
    return h.hexdigest()


def check_mode(mode: str) -> str:
    """``mode`` if it is a verify mode, else a :class:`DreamerError` naming the choices."""
    if mode not in VERIFY_MODES:
        raise DreamerError(f"verify must be one of {', '.join(map(repr, VERIFY_MODES))}, not {mode!r}")
    return mode


def _size(n: int) -> str:
    from .render import human_size

    return human_size(n)


def verify_record(
    folder: Path, meta: Mapping[str, Any], *, mode: str = "digest", listed: Iterable[str] = (), skip: Iterable[str] = ()
) -> str | None:
    """Check the files against the record. Returns ``mode`` when verified, ``None`` when the
    metadata has no record (a folder saved before records existed: loaded unverified).

    ``listed``: folders whose loaders read every file in them (a ``from_pretrained`` folder),
    where a file added after the save matters. A top-level ``replay.json``/``rng_state.json``
    that is not in the record matters too.

    Raises
    ------
    DamagedResultError
        ``"`_dataset/data-00000-of-00001.arrow` changed on disk (size 1.2 MB → 600 KB)"``, the
        first problem found (and how many more files differ).
    """
    check_mode(mode)
    record = meta.get(RECORD)
    if record is None:
        return None
    if not isinstance(record, dict):
        raise DamagedResultError("the file record in the metadata is not a mapping")
    problems: list[str] = []
    to_hash: list[tuple[str, str, str, os.stat_result]] = []
    for rel, item in record.items():
        full = folder.joinpath(*rel.split("/"))
        try:
            info = os.lstat(full)
        except OSError:
            problems.append(f"`{rel}` is missing")
            continue
        if not isinstance(item, dict):
            problems.append(f"the record of `{rel}` is not readable")
        elif "link" in item:
            if not stat.S_ISLNK(info.st_mode) or os.readlink(full) != item["link"]:
                problems.append(f"`{rel}` changed on disk (it was a symlink)")
        elif not stat.S_ISREG(info.st_mode):
            problems.append(f"`{rel}` is no longer a plain file")
        elif info.st_size != item.get("size"):
            was = item.get("size")
            shown = f"{_size(was)} → {_size(info.st_size)}" if isinstance(was, int) else f"now {_size(info.st_size)}"
            problems.append(f"`{rel}` changed on disk (size {shown})")
        elif mode == "digest":
            to_hash.append((rel, str(full), str(item.get(DIGEST)), info))
    problems += _added_files(folder, record, listed, skip)
    if not problems:
        for rel, full, expected, info in to_hash:
            digest = known_digest(info)
            if digest is None:
                digest = digest_file(full)
                _remember(full, info, digest)
            if digest != expected:
                problems.append(f"`{rel}` changed on disk (same size, different content)")
                break
    if problems:
        more = f", and {len(problems) - 1} more file{'s' if len(problems) > 2 else ''}" if len(problems) > 1 else ""
        raise DamagedResultError(problems[0] + more)
    return mode


def _added_files(folder: Path, record: Mapping[str, Any], listed: Iterable[str], skip: Iterable[str]) -> list[str]:
    """Files that loaders would read but the step did not write."""
    out = [f"`{name}` was added after the save" for name in sorted(LIFECYCLE_FILES) if name not in record and name not in skip and os.path.lexists(folder / name)]
    for rel in listed:
        base = folder.joinpath(*rel.split("/"))
        if not base.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for name in filenames:
                if name.startswith("."):
                    continue
                sub = os.path.relpath(os.path.join(dirpath, name), folder).replace(os.sep, "/")
                if sub not in record:
                    out.append(f"`{sub}` was added after the save")
    return out


# --------------------------------------------------------------------------- formats


PICKLE_FORMATS = {"pickle", "torch", "npy-object"}  # loading runs (or may run) pickled code


def sniff(path: str | os.PathLike) -> str:
    """What a file is, from its content: ``pickle``, ``torch`` (a zip with a pickle inside),
    ``npy``, ``npy-object`` (needs pickle), ``arrow-file``, ``arrow-stream``, ``parquet``,
    ``safetensors``, ``zip``, ``json``, ``empty`` or ``unknown``.

    Examples
    --------
    >>> import io, pickle, tempfile, os
    >>> with tempfile.NamedTemporaryFile(delete=False) as f:
    ...     _ = f.write(pickle.dumps([1, 2]))
    >>> sniff(f.name)
    'pickle'
    >>> os.unlink(f.name)
    """
    info = os.stat(path)
    found = _SNIFFED.get((info.st_dev, info.st_ino))
    if found is not None and found[:3] == _stamp(info):
        return found[3]
    with open(path, "rb") as f:
        info = os.fstat(f.fileno())  # the file read (not one renamed into place since the stat)
        kind = _sniff_open(path, f, info.st_size)
    if settled(info):
        if len(_SNIFFED) >= _KNOWN_LIMIT:
            _SNIFFED.clear()
        _SNIFFED[(info.st_dev, info.st_ino)] = (*_stamp(info), kind)
    return kind


# Formats this process found, by file identity, kept by the rule of the digest memo (_KNOWN):
# a second hit in one kernel does not open every file again to see what it is.
_SNIFFED: dict[tuple[int, int], tuple[int, int, int, str]] = {}


def _sniff_open(path: str | os.PathLike, f: Any, size: int) -> str:
    """What the open file ``f`` (of ``size`` bytes) is; :func:`sniff` without the memo."""
    head = f.read(64)
    if not head:
        return "empty"
    if head.startswith(b"\x93NUMPY"):
        f.seek(0)
        return _sniff_npy(f)
    if head.startswith(b"ARROW1"):
        return "arrow-file"
    if head.startswith(b"PAR1"):
        return "parquet"
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return _sniff_zip(path)
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
        return "pickle"
    if head.startswith(b"\xff\xff\xff\xff"):
        return "arrow-stream"
    if len(head) >= 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") <= size - 8:
        return "safetensors"
    # JSON before the pickle opcodes: "0.5" parses as POP, STOP. No pickle that starts with
    # a character JSON can start with can run (a digit or `t` first underflows the stack).
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if text[:1] in (b"{", b"[", b'"', b"-") or text[:1].isdigit() or text.startswith((b"true", b"false", b"null")):
        return "json"
    if _is_pickle(f):
        return "pickle"
    return "unknown"


def _sniff_npy(f: Any) -> str:
    import numpy as np

    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            _, _, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            _, _, dtype = np.lib.format.read_array_header_2_0(f)
    except Exception:  # noqa: BLE001 - a broken header: not an npy file we can load
        return "unknown"
    return "npy-object" if dtype.hasobject else "npy"


def _sniff_zip(path: str | os.PathLike) -> str:
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return "unknown"
    return "torch" if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names) else "zip"


def _is_pickle(f: Any, window: int = 1 << 16) -> bool:
    """Whether the file parses as pickle opcodes (any protocol, 0 and 1 included) up to STOP
    or to the end of the first ``window`` bytes. Nothing is executed."""
    import io
    import pickletools

    f.seek(0)
    data = f.read(window)
    ops = 0
    try:
        for opcode, _, pos in pickletools.genops(io.BytesIO(data)):
            ops += 1
            if opcode.name == "STOP":
                return ops > 1
    except Exception:  # noqa: BLE001 - not opcodes, or cut off by the window
        return ops > 8 and len(data) == window
    return False


def describe(fmt: str) -> str:
    """A format as a user would name it (for messages)."""
    return {
        "pickle": "a pickle",
        "torch": "a torch archive (a pickle inside)",
        "npy-object": "an .npy array of Python objects (a pickle inside)",
        "npy": "an .npy array",
        "arrow-file": "an Arrow file",
        "arrow-stream": "an Arrow stream",
        "parquet": "a Parquet file",
        "safetensors": "a safetensors file",
        "zip": "a zip archive",
        "json": "JSON",
        "empty": "an empty file",
    }.get(fmt, "a file of unknown format")


def files_under(path: Path) -> list[Path]:
    """Every file under ``path`` (itself if it is a file), links not followed."""
    if not path.is_dir():
        return [path]
    out = []
    for dirpath, _, filenames in os.walk(path):
        out.extend(Path(dirpath, n) for n in sorted(filenames))
    return out
