"""The mirror of the output folder on an fsspec filesystem (SPEC §7; optional extra ``remote``).

Examples
--------
>>> set_remote("s3://bucket/project/output")    # doctest: +SKIP
>>> get_remote().pending()                       # doctest: +SKIP
['step clean-reviews']

The local output folder stays the working copy. The remote holds exactly the §2 layout
(``<step>/_dataset``, ``<step>/step.json``, ``<trainer>/_checkpoints/checkpoint-N``,
``_backups/<name>/<fingerprint>/``...), so ``fsspec``/``aws s3 cp`` read it without this package.

How a push keeps the remote committed or absent, never mixed (an object store has no rename,
so ``step.json``, the metadata file, is the commit marker and is written last):

1. the remote copy in place with another fingerprint (or other metadata) is first copied,
   server-side, to ``_backups/<name>/<its fingerprint>/`` (files, then its metadata last);
2. the remote ``<step>/step.json`` is deleted: from now on the remote step is *absent*;
3. the new files are uploaded, files of the old version that the new one lacks are deleted;
4. ``step.json`` is uploaded last: the step is *committed*.

Interrupted anywhere, a reader sees either the old version (before 2), nothing in place but a
complete backup (2-4), or the new version (after 4); a new data file never sits under an old
``step.json``. Nothing is deleted before its copy in ``_backups`` is committed.

A trainer's checkpoints are uploaded as they are saved, each with ``upload_complete.json``
(the files and their sizes) written last: only a checkpoint with that marker is resumed from.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import posixpath
import queue
import re
import shutil
import signal
import socket
import threading
import warnings
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable

from .errors import DreamerError
from .folders import BACKUPS, meta_shape_problem, read_meta, tree_digest
from .integrity import DIGEST, digest_file

INSTALL_HINT = (
    "a remote output folder needs fsspec and the driver of its filesystem: "
    "`pip install dreamer_magic[remote]` (s3fs for s3://; gcsfs for gs://, adlfs for az://)"
)
CHECKPOINT_MARKER = "upload_complete.json"  # written last into a remote checkpoint folder
META_FILES = ("step.json", "trainer.json")
RETRIES = 6  # attempts of one remote operation before a push is given up (and reported)
FLUSH_ON_EXIT = 120.0  # seconds a normal exit (or SIGTERM) waits for pending uploads

_remote: "Remote | None" = None
_lock = threading.Lock()


def get_remote() -> "Remote | None":
    """The remote mirror in use, or ``None`` (the default: local only)."""
    return _remote


def set_remote(url: str | None) -> "Remote | None":
    """Mirror the output folder at ``url`` (``None``, ``""``, ``"off"``: stop mirroring).

    Raises
    ------
    DreamerError
        When fsspec or the filesystem's driver is not installed (naming what to install), or
        the URL cannot be opened.
    """
    global _remote
    with _lock:
        old, _remote = _remote, None
    if old is not None:
        waiting = old.pending()
        if waiting:  # say why the cell pauses, and what is given up if it has to
            warnings.warn(
                f"finishing {len(waiting)} upload(s) to {old.url} before switching (at most {FLUSH_ON_EXIT:.0f} s)",
                RuntimeWarning, stacklevel=2,
            )
        if not old.flush(FLUSH_ON_EXIT):
            warnings.warn(
                f"gave up waiting for uploads to {old.url}: {', '.join(old.pending())} not pushed "
                "(they stay in the local output folder; set that remote again to push them)",
                RuntimeWarning, stacklevel=2,
            )
        old.close()
    if not url or str(url).strip().lower() in ("off", "none"):
        return None
    made = Remote(str(url).strip())
    with _lock:
        _remote = made
    _install_sigterm_flush()
    return made


def _open_filesystem(url: str) -> tuple[Any, str]:
    try:
        import fsspec
    except ImportError:
        raise DreamerError(INSTALL_HINT) from None
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    options: dict[str, Any] = {"skip_instance_cache": True}
    if protocol in ("file", "local"):
        options["auto_mkdir"] = True
    else:
        options["use_listings_cache"] = False  # other machines write here: never trust a cached listing
    try:
        fs, root = fsspec.core.url_to_fs(url, **options)
    except ImportError as e:
        raise DreamerError(f"{INSTALL_HINT} ({e})") from None
    except (ValueError, TypeError) as e:
        raise DreamerError(f"cannot open the remote output folder {url!r}: {e}") from None
    return fs, root.rstrip("/")


def _transient(e: BaseException) -> bool:
    """Whether an error is worth retrying (network, throttling), not a missing or refused object."""
    if isinstance(e, (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    return isinstance(e, Exception)


def retry(fn: Callable[[], Any], attempts: int = RETRIES, first_wait: float = 0.2) -> Any:
    """Call ``fn``, retrying transient errors with exponential backoff (0.2 s, 0.4 s, ... ).

    Every remote operation here is idempotent (a put of the same bytes, a delete of a gone
    object), so retrying never corrupts either copy.
    """
    wait = first_wait
    for attempt in range(attempts):
        try:
            return fn()
        except BaseException as e:
            if attempt == attempts - 1 or not _transient(e):
                raise
            time.sleep(wait)
            wait = min(wait * 2, 5.0)
    return None  # pragma: no cover


def local_files(folder: Path) -> list[str]:
    """Every file under ``folder`` as a relative POSIX path; leftovers of interrupted writes
    (``.x.tmp-…``, ``.x.trash-…``) and lock files are not part of a result."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not _scratch(d))
        for name in sorted(filenames):
            if not _scratch(name):
                out.append(Path(dirpath, name).relative_to(folder).as_posix())
    return out


def _scratch(name: str) -> bool:
    """Leftovers of interrupted writes (folders.leftover_kind), and lock files: never pushed."""
    from . import folders

    kind = getattr(folders, "leftover_kind", None)
    if kind is not None and kind(name) is not None:
        return True
    return bool(re.match(r"^\..+\.(tmp|trash)-", name)) or name.endswith(".lock")


def commit_order(files: Iterable[str]) -> list[str]:
    """Data files first, then nested metadata files (deepest first), the folder's own metadata last.

    Examples
    --------
    >>> commit_order(["step.json", "_dataset/a.arrow", "child/step.json", "child/x.npy"])
    ['_dataset/a.arrow', 'child/x.npy', 'child/step.json', 'step.json']
    """
    files = list(files)
    data = [f for f in files if not is_meta(f)]
    metas = [f for f in files if is_meta(f)]
    metas.sort(key=lambda f: (-f.count("/"), f))
    return data + metas


def is_meta(rel: str) -> bool:
    """Whether ``rel`` is a step's or trainer's own metadata file (``child/step.json``), not a file
    of an output that happens to have that name (``_outputs/step.json``).

    Examples
    --------
    >>> is_meta("child/step.json"), is_meta("_outputs/step.json")
    (True, False)
    """
    parts = rel.split("/")
    return parts[-1] in META_FILES and not any(p.startswith("_") for p in parts[:-1])


def inside(rel: Any) -> bool:
    """Whether ``rel`` (a path a remote listing, marker or metadata file names) stays inside its
    folder: relative, no ``..``, no empty part, no backslash. Someone else's bucket decides these
    names, and a pull must never write (or read) outside the folder it is pulling.

    Examples
    --------
    >>> inside("_dataset/data-00000.arrow"), inside("_outputs/../../x"), inside("/etc/passwd")
    (True, False, False)
    """
    if not isinstance(rel, str) or not rel or "\\" in rel or "\x00" in rel or rel.startswith("/"):
        return False
    return all(part not in ("", ".", "..") for part in rel.split("/"))


def _outside(names: Iterable[Any]) -> str | None:
    """The first of ``names`` that points outside its folder, or ``None``."""
    return next((str(n) for n in names if not inside(n)), None)


def verify(folder: Path, meta: dict, sizes: dict[str, int] | None = None) -> str | None:
    """Check a pulled folder against what its metadata recorded; ``None`` when it is whole.

    Uses the per-file record (``meta["files"]``: sizes and xxh3 digests) when the metadata has
    one, else each output's ``digest`` of its files; ``sizes`` (the remote listing) are checked
    against the files on disk either way.
    """
    shape = meta_shape_problem(meta)
    if shape is not None:  # what read_meta refuses locally is no hit from the remote either
        return f"its metadata is damaged: {shape}"
    record = meta.get("files")
    named = [*(sizes or {}), *(record if isinstance(record, dict) else [])]
    named += [i.get("path") for i in (record if isinstance(record, list) else []) if isinstance(i, dict) and "path" in i]
    named += [e.get("path") for e in (meta.get("outputs") or {}).values() if isinstance(e, dict) and e.get("path")]
    bad = _outside(named)
    if bad is not None:
        return f"it names a file outside its folder ({bad!r})"
    for rel, size in (sizes or {}).items():
        path = folder / rel
        if not path.is_file() or path.stat().st_size != size:
            return f"{rel} is not the size the remote listed"
    if isinstance(record, dict):
        record = [{"path": k, **(v if isinstance(v, dict) else {})} for k, v in record.items()]
    if isinstance(record, list) and record:
        for item in record:
            if not isinstance(item, dict) or not isinstance(item.get("path"), str):
                continue
            path = folder / item["path"]
            if not path.is_file():
                return f"{item['path']} is missing"
            if item.get("size") is not None and path.stat().st_size != int(item["size"]):
                return f"{item['path']} has another size than recorded"
            expected = item.get("digest") or item.get(DIGEST)  # step.json's record says "xxh3_128"
            if expected and digest_file(path) != expected:
                return f"{item['path']} has another digest than recorded"
        return None
    for name, entry in (meta.get("outputs") or {}).items():
        if not isinstance(entry, dict) or not entry.get("path"):
            continue
        path = folder / entry["path"]
        if not path.exists():
            return f"the output {name!r} ({entry['path']}) is missing"
        if entry.get("digest") and tree_digest(path) != entry["digest"]:
            return f"the output {name!r} does not match its recorded digest"
    return None


class _Task:
    def __init__(self, label: str, key: str, fn: Callable[["_Task"], None]) -> None:
        self.label, self.key, self.fn = label, key, fn
        self.files_done = 0
        self.files_total = 0
        self.on_progress: Callable[[int, int, bool], Any] | None = None  # (done, total, finished)

    def progressed(self, finished: bool = False) -> None:
        if self.on_progress is not None:
            with contextlib.suppress(Exception):  # a view that cannot update never stops a push
                self.on_progress(self.files_done, self.files_total, finished)


class Remote:
    """One remote output folder: an fsspec filesystem and a root path on it, and the worker
    thread that pushes commits in the background.

    Parameters
    ----------
    url : ``s3://bucket/prefix``, ``gs://…``, ``az://…``, ``file:///path``; credentials and
        endpoint come from the filesystem's usual configuration (for S3: ``AWS_ACCESS_KEY_ID``,
        ``AWS_ENDPOINT_URL``, ``~/.aws``...).
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.fs, self.root = _open_filesystem(url)
        self.machine = f"{socket.gethostname()}-{os.getpid()}"
        self._queue: "queue.Queue[_Task | None]" = queue.Queue()
        self._pending: list[_Task] = []
        self._pending_lock = threading.Lock()
        self._idle = threading.Condition(self._pending_lock)
        self.errors: list[str] = []  # pushes given up after retries (shown by %dreamer status)
        self._uploaded: dict[str, tuple[int, int]] = {}  # remote path -> (size, mtime_ns) pushed by us
        self._kinds: dict[str, str] = {}  # name_path -> "step"/"trainer", of what committed() found
        self._worker = threading.Thread(target=self._work, name="dreamer-remote-push", daemon=True)
        self._worker.start()
        atexit.register(self._at_exit)

    def __repr__(self) -> str:
        return f"Remote({self.url!r})"

    # -- paths and small reads ---------------------------------------------------------
    def path(self, rel: str = "") -> str:
        """The remote path of ``rel`` (a POSIX path relative to the output folder)."""
        return posixpath.join(self.root, rel) if rel else self.root

    def read_json(self, rel: str) -> dict | None:
        """A JSON object stored at ``rel``, or ``None`` if it is missing or not an object.

        A network error (after the retries) is raised, never read as "missing": a push that took
        an unreachable ``step.json`` for an absent one would not back the old version up first.
        """
        try:
            data = retry(lambda: self.fs.cat_file(self.path(rel)))
        except FileNotFoundError:
            return None
        try:
            obj = json.loads(data)
        except ValueError:
            return None
        return obj if isinstance(obj, dict) else None

    def write_bytes(self, rel: str, data: bytes) -> None:
        retry(lambda: self.fs.pipe_file(self.path(rel), data))

    def listing(self, rel: str) -> dict[str, int]:
        """``{relative path: size}`` of every file under the remote folder ``rel``."""
        base = self.path(rel)
        with contextlib.suppress(Exception):
            self.fs.invalidate_cache(base)
        try:
            found = retry(lambda: self.fs.find(base, detail=True))
        except FileNotFoundError:
            return {}
        out = {}
        prefix = self.fs._strip_protocol(base).rstrip("/") + "/"
        for path, info in found.items():
            path = self.fs._strip_protocol(path)
            if info.get("type", "file") != "file" or not path.startswith(prefix):
                continue
            out[path[len(prefix):]] = int(info.get("size") or 0)
        return out

    def delete(self, rel: str) -> None:
        try:
            retry(lambda: self.fs.rm_file(self.path(rel)))
        except FileNotFoundError:
            pass

    # -- the background queue -------------------------------------------------------------
    def submit(self, label: str, key: str, fn: Callable[[_Task], None], on_progress: Callable[[int, int, bool], Any] | None = None) -> None:
        """Run ``fn`` on the worker thread (tasks run in order, one at a time); ``on_progress(done,
        total, finished)`` hears how many files it has uploaded."""
        task = _Task(label, key, fn)
        task.on_progress = on_progress
        with self._pending_lock:
            self._pending.append(task)
        self._queue.put(task)

    def pending(self) -> list[str]:
        """What is queued or being uploaded now, e.g. ``['step clean-reviews (3/7 files)']``."""
        with self._pending_lock:
            out = []
            for t in self._pending:
                progress = f" ({t.files_done}/{t.files_total} files)" if t.files_total else ""
                out.append(t.label + progress)
            return out

    def progress(self) -> tuple[int, int]:
        """``(files uploaded, files to upload)`` over every pending task."""
        with self._pending_lock:
            return sum(t.files_done for t in self._pending), sum(t.files_total for t in self._pending)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every pending upload is done (``False`` if ``timeout`` ran out first)."""
        if threading.current_thread() is self._worker:
            return not self._pending
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._idle:
            while self._pending:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._idle.wait(left if left is None else min(left, 1.0))
        return True

    def close(self) -> None:
        self._queue.put(None)

    def _at_exit(self) -> None:
        if self._worker.is_alive() and self._pending:
            self.flush(FLUSH_ON_EXIT)

    def _work(self) -> None:
        while True:
            task = self._queue.get()
            if task is None:
                return
            try:
                task.fn(task)
                task.progressed(finished=True)
            except Exception as e:  # noqa: BLE001 - a push that failed is reported, never raised into a cell
                self.errors.append(f"{task.label}: {type(e).__name__}: {e}")
                task.files_total = -1
                task.progressed(finished=True)
            finally:
                with self._idle:
                    if task in self._pending:
                        self._pending.remove(task)
                    self._idle.notify_all()

    # -- pushing a step or trainer folder -------------------------------------------------
    def push_later(
        self, local_root: Path, name_path: str, meta_file: str, kind: str = "step", lease: "Lease | None" = None,
        on_progress: Callable[[int, int, bool], Any] | None = None, only_if_absent: bool = False,
    ) -> None:
        """Push the committed folder ``local_root/name_path`` in the background; the ``lease`` held
        on it is released once the push has committed (or failed). ``only_if_absent`` (a local hit):
        push only if the remote holds no committed version at all."""

        def run(task: _Task) -> None:
            try:
                self.push_folder(local_root, name_path, meta_file, task, only_if_absent=only_if_absent)
            finally:
                if lease is not None:
                    lease.release()

        self.submit(f"{kind} {name_path}", name_path, run, on_progress)

    def push_folder(self, local_root: Path, rel: str, meta_file: str, task: _Task | None = None, *, only_if_absent: bool = False) -> bool:
        """Mirror one committed folder (see the module docstring for the order). Returns whether
        anything was uploaded (``False``: the remote already holds this very commit)."""
        local = Path(local_root, *rel.split("/"))
        meta, _ = read_meta(local, meta_file)
        if meta is None:
            return False  # changed again (or removed) since it committed: a later push follows
        meta_bytes = (local / meta_file).read_bytes()
        self._refuse_other_kind(rel, meta_file)
        remote_meta = self.read_json(f"{rel}/{meta_file}")
        if remote_meta == meta or (only_if_absent and remote_meta is not None):
            return False  # there already, or another machine committed a newer version: not ours to replace
        if remote_meta is not None and isinstance(remote_meta.get("fingerprint"), str) and meta_shape_problem(remote_meta) is None:
            self.backup_remote(rel, meta_file, remote_meta)
        elif meta_file in self.listing(rel):  # a damaged step.json: kept aside, as a local damaged folder is
            self.backup_remote(rel, meta_file, remote_meta or {}, key=f"incomplete-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}")
        self.delete(f"{rel}/{meta_file}")  # the remote step is absent from here on...
        files = [f for f in commit_order(local_files(local)) if f != meta_file]
        self.upload(local, rel, files, task)
        if meta_file == "trainer.json":  # a finished trainer's checkpoints are complete: mark them so
            marked = set(self.complete_checkpoints(rel, meta["fingerprint"]))
            for folder in checkpoint_folders(local):
                in_trainer = folder.relative_to(local).as_posix()
                if in_trainer not in marked:
                    self._mark_checkpoint(folder, f"{rel}/{in_trainer}", meta["fingerprint"])
                files.append(f"{in_trainer}/{CHECKPOINT_MARKER}")
        self.delete_stale(rel, set(files) | {meta_file})
        try:
            unchanged = (local / meta_file).read_bytes() == meta_bytes
        except OSError:
            unchanged = False
        if not unchanged:  # committed again locally while we uploaded: leave it absent, the next push commits
            return True
        retry(lambda: self.fs.pipe_file(self.path(f"{rel}/{meta_file}"), meta_bytes))  # ...committed here
        if task is not None:
            task.files_done = task.files_total
        return True

    def _refuse_other_kind(self, rel: str, meta_file: str) -> None:
        """Raise when the remote folder ``rel`` holds the other kind (a trainer where a step is
        pushed, or the reverse): the push would delete its files as stale, and no backup of the
        other kind is made. The clash is the user's to resolve (rename one of them)."""
        listed = self.listing(rel)
        for other in [f for f in (*META_FILES, ".in-progress.json") if f != meta_file and f in listed]:
            if meta_file == "trainer.json" and other == ".in-progress.json":
                continue  # this trainer's own in-progress marker
            found = self.read_json(f"{rel}/{other}") or {}
            kind = "step" if other == "step.json" else "trainer"
            raise DreamerError(
                f"not pushed: the remote folder {rel!r} holds the {kind} {found.get('name', rel)!r}; "
                "give one of them another name"
            )

    def backup_remote(self, rel: str, meta_file: str, remote_meta: dict, key: str | None = None) -> None:
        """Copy the remote folder in place to ``_backups/<name>/<its fingerprint>/`` (server side),
        metadata last, unless a complete backup with that fingerprint is already there (``key``:
        another folder name, ``incomplete-<time>`` for a folder with damaged metadata)."""
        key = key or remote_meta["fingerprint"]
        dest = f"{BACKUPS}/{rel}/{key}"
        if key == remote_meta.get("fingerprint") and self.read_json(f"{dest}/{meta_file}") == remote_meta:
            return
        self.delete(f"{dest}/{meta_file}")
        files = commit_order(self.listing(rel))
        data = [f for f in files if not is_meta(f)]
        if data:  # every data file at once (server-side copies), then each metadata file, its own last
            retry(lambda: self.fs.copy([self.path(f"{rel}/{f}") for f in data], [self.path(f"{dest}/{f}") for f in data]))
        for f in [f for f in files if is_meta(f) and f != meta_file] + [f for f in files if f == meta_file]:
            retry(lambda f=f: self.fs.copy(self.path(f"{rel}/{f}"), self.path(f"{dest}/{f}")))

    def upload(self, local: Path, rel: str, files: list[str], task: _Task | None = None) -> None:
        """Upload ``files`` (relative to ``local``) to ``rel``, in that order by groups: every data
        file (concurrently, as one batch), then each metadata file one by one. A file this process
        already pushed, unchanged since, and of the same size remotely is not sent again."""
        if task is not None:
            task.files_total, task.files_done = len(files), 0
        remote_sizes = self.listing(rel) if any(self._uploaded.get(self.path(f"{rel}/{f}")) for f in files) else {}
        todo = []
        for f in files:
            path = local / f
            st = path.stat()
            target = self.path(f"{rel}/{f}")
            if self._uploaded.get(target) == (st.st_size, st.st_mtime_ns) and remote_sizes.get(f) == st.st_size:
                if task is not None:
                    task.files_done += 1
                continue
            todo.append(f)
        data = [f for f in todo if not is_meta(f)]
        metas = [f for f in todo if is_meta(f)]
        batches = ([data] if data else []) + [[m] for m in metas]
        for batch in batches:
            lpaths = [str(local / f) for f in batch]
            rpaths = [self.path(f"{rel}/{f}") for f in batch]
            self._put(lpaths, rpaths)
            for lp, rp in zip(lpaths, rpaths):
                st = os.stat(lp)
                self._uploaded[rp] = (st.st_size, st.st_mtime_ns)
            if task is not None:
                task.files_done += len(batch)
                task.progressed()

    def _put(self, lpaths: list[str], rpaths: list[str]) -> None:
        if len(lpaths) == 1:
            retry(lambda: self.fs.put_file(lpaths[0], rpaths[0]))
        else:
            retry(lambda: self.fs.put(lpaths, rpaths))

    def _get(self, rel: str, files: Iterable[str], dest: Path) -> None:
        """Download ``rel/<f>`` to ``dest/<f>`` for each of ``files`` in one batch, with retries
        (callers first refuse names leading outside, with :func:`_outside`)."""
        files = list(files)
        if not files:
            return
        lpaths = [str(dest / f) for f in files]
        for lp in lpaths:
            os.makedirs(os.path.dirname(lp), exist_ok=True)
        rpaths = [self.path(f"{rel}/{f}") for f in files]
        if len(files) == 1:
            retry(lambda: self.fs.get_file(rpaths[0], lpaths[0]))
        else:
            retry(lambda: self.fs.get(rpaths, lpaths))

    # -- pulling ----------------------------------------------------------------------------
    def find(self, rel: str, fingerprint: str, meta_file: str) -> tuple[str, dict] | None:
        """Where the remote keeps a committed ``rel`` with ``fingerprint``: in place, else its backup."""
        for candidate in (rel, f"{BACKUPS}/{rel}/{fingerprint}"):
            meta = self.read_json(f"{candidate}/{meta_file}")
            if meta is not None and meta.get("fingerprint") == fingerprint:
                return candidate, meta
        return None

    def pull(self, where: str, meta: dict, meta_file: str, tmp: Path) -> str | None:
        """Download the committed remote folder ``where`` into the empty folder ``tmp`` (data
        first, the metadata file last) and verify it. ``None`` when it is whole, else why not."""
        sizes = self.listing(where)
        if meta_file not in sizes:
            return "the remote copy is no longer committed"
        files = [f for f in sizes if f != meta_file]
        bad = _outside(files)
        if bad is not None:  # a literal S3 key `x/../../y`: never written beside the output folder
            return f"the remote folder holds a file outside it ({bad!r})"
        self._get(where, files, tmp)
        data = retry(lambda: self.fs.cat_file(self.path(f"{where}/{meta_file}")))
        try:
            if json.loads(data) != meta:
                return "the remote copy changed while it was downloaded"
        except ValueError:
            return "the remote metadata is corrupt"
        (tmp / meta_file).write_bytes(data)
        problem = verify(tmp, meta, {f: sizes[f] for f in files})
        if problem is None:
            for f in files:  # remember what is already remote, so that a push does not re-send it
                st = (tmp / f).stat()
                self._uploaded[self.path(f"{where}/{f}")] = (st.st_size, st.st_mtime_ns)
        return problem

    def pull_into_place(self, where: str, meta: dict, meta_file: str, final: Path, before_rename: Callable[[], Any]) -> str | None:
        """Pull into a temporary folder beside ``final`` and rename it into place (``before_rename``
        moves what is there to the backups first). ``None`` on success, else why not (nothing changed)."""
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            problem = self.pull(where, meta, meta_file, tmp)
            if problem is not None:
                shutil.rmtree(tmp, ignore_errors=True)
                return problem
            from .folders import fsync_dir, fsync_tree

            fsync_tree(tmp)
            before_rename()
            os.rename(tmp, final)
            fsync_dir(final.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return None

    def delete_stale(self, rel: str, keep: set[str]) -> None:
        """Delete the remote files under ``rel`` that are not in ``keep`` (the old version's), the
        completion markers of checkpoints that go first, those of checkpoints kept stay."""
        stale = set(self.listing(rel)) - keep
        kept_checkpoints = {posixpath.dirname(f) for f in keep}
        markers = [f for f in stale if posixpath.basename(f) == CHECKPOINT_MARKER]
        for f in sorted(markers):
            if posixpath.dirname(f) in kept_checkpoints:
                stale.discard(f)  # a checkpoint that stays keeps its marker
            else:
                self.delete(f"{rel}/{f}")
                stale.discard(f)
        for f in sorted(stale):
            self.delete(f"{rel}/{f}")

    # -- checkpoints ------------------------------------------------------------------------
    def push_checkpoints_later(self, local_root: Path, trainer_rel: str, marker_file: str, complete: Callable[[Path], bool]) -> None:
        """Upload, in the background, every complete local checkpoint of a trainer that is not
        complete remotely yet (see :meth:`push_checkpoints`)."""

        def run(task: _Task) -> None:
            self.push_checkpoints(local_root, trainer_rel, marker_file, complete, task)

        self.submit(f"checkpoints of {trainer_rel}", f"{trainer_rel}#checkpoints", run)

    def push_checkpoints(
        self, local_root: Path, trainer_rel: str, marker_file: str, complete: Callable[[Path], bool], task: _Task | None = None
    ) -> list[str]:
        """Upload the trainer's in-progress marker (``marker_file``, with its fingerprint), then each
        complete checkpoint's files, then its ``upload_complete.json``. Returns the names pushed.

        Checkpoints of another run (another fingerprint) found in the remote trainer folder are
        first copied to ``_backups/<trainer>/<their fingerprint>/`` and only then removed there.
        """
        local = Path(local_root, *trainer_rel.split("/"))
        marker = _read_local_json(local / marker_file)
        if marker is None:  # finished since it was saved: the checkpoints belong to the finished run
            marker = _read_local_json(local / "trainer.json")
        if marker is None or not isinstance(marker.get("fingerprint"), str):
            return []  # moved since: nothing of this run to push
        fp = marker["fingerprint"]
        for meta_file in ("trainer.json", marker_file):
            other = self.read_json(f"{trainer_rel}/{meta_file}")
            if other is not None and other.get("fingerprint") != fp and isinstance(other.get("fingerprint"), str):
                self.backup_remote(trainer_rel, meta_file, other)
                self.delete(f"{trainer_rel}/{meta_file}")
                self.delete_stale(trainer_rel, set())
        with contextlib.suppress(FileNotFoundError):
            if self.read_json(f"{trainer_rel}/{marker_file}") != _read_local_json(local / marker_file):
                self.write_bytes(f"{trainer_rel}/{marker_file}", (local / marker_file).read_bytes())
        done = set(self.complete_checkpoints(trainer_rel, fp))
        pushed = []
        for folder in sorted(checkpoint_folders(local), key=_checkpoint_number):
            rel_in_trainer = folder.relative_to(local).as_posix()
            if rel_in_trainer in done or not complete(folder):
                continue
            rel = f"{trainer_rel}/{rel_in_trainer}"
            files = [f for f in local_files(folder) if f != CHECKPOINT_MARKER]
            self.upload(folder, rel, files, task)
            self._mark_checkpoint(folder, rel, fp)
            pushed.append(rel_in_trainer)
        return pushed

    def _mark_checkpoint(self, folder: Path, rel: str, fp: str) -> None:
        """Write a checkpoint's ``upload_complete.json`` (its files and sizes), after its files."""
        files = [f for f in local_files(folder) if f != CHECKPOINT_MARKER]
        record = {
            "files": {f: {"size": (folder / f).stat().st_size} for f in files},
            "fingerprint": fp,
            "machine": self.machine,
            "uploaded": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        self.write_bytes(f"{rel}/{CHECKPOINT_MARKER}", json.dumps(record, indent=2).encode())

    def complete_checkpoints(self, trainer_rel: str, fingerprint: str | None = None) -> list[str]:
        """Checkpoints (``_checkpoints/checkpoint-N``, relative to the trainer folder) whose upload
        finished, i.e. that hold ``upload_complete.json``; oldest first. With ``fingerprint``, only
        those of that run: a push killed while it removed another run's checkpoints leaves some of
        their markers behind, and those are neither resumed from nor taken for this run's."""
        found = []
        for f in self.listing(trainer_rel):
            parts = f.split("/")
            shaped = len(parts) == 3 or (len(parts) == 4 and parts[1].startswith("trainer-"))  # as checkpoint_folders
            if shaped and inside(f) and parts[0] == "_checkpoints" and parts[-1] == CHECKPOINT_MARKER and re.fullmatch(r"checkpoint-\d+", parts[-2]):
                found.append("/".join(parts[:-1]))
        if fingerprint is not None:
            found = [n for n in found if (self.read_json(f"{trainer_rel}/{n}/{CHECKPOINT_MARKER}") or {}).get("fingerprint") == fingerprint]
        return sorted(found, key=lambda n: _checkpoint_number(Path(n)))

    def pull_checkpoint(self, trainer_rel: str, rel_in_trainer: str, local_trainer: Path) -> str | None:
        """Download one complete remote checkpoint into ``local_trainer/rel_in_trainer``
        (a temporary folder renamed into place; sizes checked against its marker).
        ``None`` on success, else why not (nothing changed locally)."""
        rel = f"{trainer_rel}/{rel_in_trainer}"
        record = self.read_json(f"{rel}/{CHECKPOINT_MARKER}")
        if record is None:
            return "no completion marker"
        files = record.get("files") or {}
        if not isinstance(files, dict):
            return "its completion marker is damaged"
        bad = _outside(files)
        if bad is not None:
            return f"its completion marker names a file outside it ({bad!r})"
        final = local_trainer.joinpath(*rel_in_trainer.split("/"))
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            self._get(rel, files, tmp)
            for f, info in files.items():
                if (tmp / f).stat().st_size != int(info.get("size", -1)):
                    shutil.rmtree(tmp, ignore_errors=True)
                    return f"{f} is not the size its marker recorded"
            from .folders import fsync_dir, fsync_tree

            fsync_tree(tmp)
            if final.exists():
                trash = final.parent / f".{final.name}.trash-{uuid.uuid4().hex[:8]}"
                os.rename(final, trash)
                shutil.rmtree(trash, ignore_errors=True)
            os.rename(tmp, final)
            fsync_dir(final.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        for f in files:
            st = (final / f).stat()
            self._uploaded[self.path(f"{rel}/{f}")] = (st.st_size, st.st_mtime_ns)
        return None

    # -- what is where (%dreamer status) -----------------------------------------------------
    def committed(self) -> dict[str, str]:
        """``{name_path: fingerprint}`` of every committed step and trainer folder in the remote."""
        out: dict[str, str] = {}
        for f in self.listing(""):
            parts = f.split("/")
            if parts[-1] not in META_FILES or parts[0].startswith((".", "_")):
                continue
            if any(p.startswith("_") for p in parts[:-1]):
                continue  # inside _checkpoints/_model/_dataset: not a step's own metadata
            meta = self.read_json(f) or {}
            if isinstance(meta.get("fingerprint"), str):
                out["/".join(parts[:-1])] = meta["fingerprint"]
                self._kinds["/".join(parts[:-1])] = "trainer" if parts[-1] == "trainer.json" else "step"
        return out


def checkpoint_folders(trainer: Path) -> list[Path]:
    """The local ``checkpoint-N`` folders of a trainer (``_checkpoints/`` and ``_checkpoints/trainer-K/``)."""
    base = trainer / "_checkpoints"
    if not base.is_dir():
        return []
    out = []
    for parent in [base, *[p for p in base.iterdir() if p.is_dir() and p.name.startswith("trainer-")]]:
        out += [p for p in parent.iterdir() if p.is_dir() and re.fullmatch(r"checkpoint-\d+", p.name)]
    return out


def _read_local_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _checkpoint_number(path: Path) -> int:
    m = re.search(r"(\d+)$", path.name)
    return int(m.group(1)) if m else -1


# -- SIGTERM: the pre-emption notice ---------------------------------------------------------
_sigterm_installed = False


def _install_sigterm_flush() -> None:
    """On SIGTERM, flush pending uploads first, then do what the previous handler did."""
    global _sigterm_installed
    if _sigterm_installed or threading.current_thread() is not threading.main_thread():
        return
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum: int, frame: Any) -> None:
        remote = get_remote()
        if remote is not None:
            remote.flush(FLUSH_ON_EXIT)
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_IGN:
            return
        else:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)

    with contextlib.suppress(ValueError, OSError):
        signal.signal(signal.SIGTERM, on_sigterm)
        _sigterm_installed = True


# -- generation-cache segments ------------------------------------------------------------------
SEGMENTS = ".segments"  # .cache/<database>.segments/<machine>-<seq>.jsonl on the remote
_segment_seq = [0]


def segment_folder(database_name: str) -> str:
    """The remote folder of a generation cache's segments, e.g. ``.cache/my-api.segments``."""
    return f".cache/{database_name}{SEGMENTS}"


def encode_rows(rows: list[dict[str, Any]], header: dict[str, Any] | None = None) -> bytes:
    """One segment: JSON lines, a header first; a ``bytes`` response is stored as hex."""
    lines = [json.dumps({"segment": 1, **(header or {})})]
    for row in rows:
        response = row.get("response")
        if isinstance(response, (bytes, bytearray, memoryview)):
            row = {**row, "response": bytes(response).hex(), "binary": True}
        lines.append(json.dumps(row, ensure_ascii=False, separators=(",", ":")))
    return ("\n".join(lines) + "\n").encode("utf-8")


def decode_rows(data: bytes) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
    """``(header, rows)`` of a segment, or ``None`` if it is not a whole segment."""
    try:
        lines = data.decode("utf-8").splitlines()
        header = json.loads(lines[0])
        rows = [json.loads(line) for line in lines[1:] if line]
    except (UnicodeDecodeError, ValueError, IndexError):
        return None
    if not isinstance(header, dict) or header.get("segment") != 1 or not data.endswith(b"\n"):
        return None
    replaces = header.get("replaces", [])
    if not isinstance(replaces, list) or not all(isinstance(n, str) for n in replaces):
        return None
    for row in rows:  # another machine's (or a hand's) bytes: a row that is not one spoils the segment
        if not isinstance(row, dict) or not isinstance(row.get("key"), str):
            return None
        if row.pop("binary", False):
            try:
                row["response"] = bytes.fromhex(row["response"])
            except (TypeError, ValueError):
                return None
        if not all(v is None or isinstance(v, (str, int, float, bytes)) for v in row.values()):
            return None
    return header, rows


def new_segment_name(remote: Remote) -> str:
    """A name no other machine or process uses: ``<host>-<pid>-<random>-<seq>.jsonl``."""
    _segment_seq[0] += 1
    return f"{remote.machine}-{uuid.uuid4().hex[:6]}-{_segment_seq[0]:06d}.jsonl"


def push_segment_later(remote: Remote, database_name: str, name: str, rows: list[dict[str, Any]]) -> None:
    """Upload one committed batch as an immutable segment (one object, written once)."""
    data = encode_rows(rows)
    rel = f"{segment_folder(database_name)}/{name}"
    remote.submit(f"generation cache {database_name} ({len(rows)} rows)", rel, lambda task: remote.write_bytes(rel, data))


def list_segments(remote: Remote, database_name: str) -> dict[str, int]:
    """``{segment name: size}`` of a generation cache's remote segments."""
    return {k: v for k, v in remote.listing(segment_folder(database_name)).items() if "/" not in k and k.endswith(".jsonl")}


def compact_segments(remote: Remote, database_name: str) -> tuple[int, int]:
    """Merge every segment of one generation cache into one (written first), then delete the
    merged ones. Returns ``(segments removed, bytes freed)``. The new segment's header names
    the segments it replaces, so a machine that merged them all does not read it again."""
    names = sorted(list_segments(remote, database_name).items())
    if len(names) < 2:
        return 0, 0
    rows: dict[str, dict] = {}
    replaced: list[str] = []
    for name, _ in names:
        try:
            decoded = decode_rows(retry(lambda n=name: remote.fs.cat_file(remote.path(f"{segment_folder(database_name)}/{n}"))))
        except FileNotFoundError:
            continue
        if decoded is None:
            continue  # not whole (never on an object store): left alone
        header, part = decoded
        replaced += [name, *header.get("replaces", [])]
        for row in part:
            rows[row["key"]] = row
    kept = [n for n, _ in names if n in replaced]
    out = f"compact-{uuid.uuid4().hex[:12]}.jsonl"
    data = encode_rows(list(rows.values()), {"replaces": sorted(set(replaced))})
    remote.write_bytes(f"{segment_folder(database_name)}/{out}", data)  # first: nothing is lost if we stop here
    freed = -len(data)
    for name, size in names:
        if name in kept:
            remote.delete(f"{segment_folder(database_name)}/{name}")
            freed += size
    return len(kept), max(freed, 0)


def compact_all(remote: Remote) -> tuple[int, int]:
    """Compact the segments of every generation cache in the remote (``%dreamer gc``)."""
    databases = {f.split("/")[0][: -len(SEGMENTS)] for f in remote.listing(".cache") if f.split("/")[0].endswith(SEGMENTS)}
    removed = freed = 0
    for name in sorted(databases):
        r, f = compact_segments(remote, name)
        removed, freed = removed + r, freed + f
    return removed, freed


# -- the step lock, extended to the bucket ------------------------------------------------------
LEASES = ".locks"  # <remote>/.locks/<name>.lease, as the local .locks/<name>.lock
# Seconds a lease lasts unless renewed (renewed every third of it while held): how long a machine
# waits for the lease of one that died. DREAMER_LEASE_TTL overrides it (shorter on a fast network).
def _env_seconds(name: str, default: float) -> float:
    """A positive number of seconds from the environment, else ``default`` (a typo never breaks
    ``import``: ``%dreamer remote`` would show a traceback instead of working)."""
    try:
        value = float(os.environ.get(name) or default)
    except ValueError:
        return default
    return value if value > 0 else default


LEASE_TTL = _env_seconds("DREAMER_LEASE_TTL", 30.0)
LEASE_POLL = 1.0  # seconds between tries while another machine holds a lease


class Lease:
    """One machine's claim on a step or trainer in the remote, so that two machines on one bucket
    do not both run it: an object created with a conditional write (``If-None-Match: *``), with
    an expiry, renewed while the step runs and its push is pending, deleted when the push has
    committed. An expired lease (its machine died) is taken over with ``If-Match`` on its ETag,
    so two machines cannot both take it over. (Filesystems without conditional overwrites, e.g.
    ``file://``, take an expired lease over by delete-then-create.)

    Examples
    --------
    >>> lease = Lease(get_remote(), "clean-reviews")   # doctest: +SKIP
    >>> lease.acquire(on_wait=lambda holder: print("waiting for", holder)); ...; lease.release()
    """

    def __init__(self, remote: Remote, name_path: str, ttl: float | None = None) -> None:
        self.remote = remote
        self.rel = f"{LEASES}/{name_path.replace('/', '__')}.lease"
        self.ttl = float(ttl if ttl is not None else LEASE_TTL)
        self.token = uuid.uuid4().hex
        self.etag: str | None = None
        self.holder: str | None = None  # the machine holding it while we wait
        self.took_over: str | None = None  # the machine whose expired lease we took over
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        self._conditional = type(remote.fs).__name__ == "S3FileSystem"

    def _body(self) -> bytes:
        return json.dumps({"machine": self.remote.machine, "token": self.token, "expires": time.time() + self.ttl, "ttl": self.ttl}).encode()

    def _read(self) -> tuple[dict | None, str | None]:
        """The lease in the bucket and its ETag, ``(None, None)`` when there is none. A lease that
        is not one (garbage, a hand edit, ``expires`` not a number) counts as expiring one ttl
        after it was last written: a waiting machine takes it over then, never waits forever."""
        path = self.remote.path(self.rel)
        try:
            info = retry(lambda: self.remote.fs.info(path))
            raw = retry(lambda: self.remote.fs.cat_file(path))
        except FileNotFoundError:
            return None, None
        etag = info.get("ETag") if self._conditional else None
        try:
            data = json.loads(raw)
            if isinstance(data, dict) and isinstance(data.get("expires", 0), (int, float)) and not isinstance(data.get("expires"), bool):
                return data, etag
        except ValueError:
            pass
        return {"machine": "an unreadable lease", "expires": _modified(info) + self.ttl}, etag

    def _put(self, **kwargs: Any) -> None:
        out = retry(lambda: self.remote.fs.pipe_file(self.remote.path(self.rel), self._body(), **kwargs))
        self.etag = out.get("ETag") if isinstance(out, dict) else None

    def try_acquire(self) -> bool:
        """One attempt: create the lease, or take over an expired one."""
        try:
            self._put(mode="create")
            return True
        except FileExistsError:
            pass
        current, etag = self._read()
        if current is None:
            return False  # released meanwhile: the next attempt creates it
        if current.get("token") == self.token:
            return True
        if float(current.get("expires") or 0) > time.time():
            self.holder = str(current.get("machine") or "another machine")
            return False
        try:  # expired: its machine stopped renewing it (died)
            if self._conditional and etag:
                self._put(IfMatch=etag)
            else:
                self.remote.delete(self.rel)
                self._put(mode="create")
        except FileExistsError:
            return False  # another machine took it over first
        self.took_over = str(current.get("machine") or "a machine")
        return True

    def acquire(self, on_wait: Callable[[str], Any] | None = None) -> None:
        """Wait until this machine holds the lease (``on_wait(holder)`` once, if it must wait)."""
        if not self.try_acquire():
            if on_wait is not None:
                on_wait(self.holder or "another machine")
            while not self.try_acquire():
                time.sleep(LEASE_POLL)
        self._renewer = threading.Thread(target=self._renew, name="dreamer-lease", daemon=True)
        self._renewer.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            with contextlib.suppress(Exception):  # a missed renewal is retried a third of a ttl later
                if self._conditional and self.etag:
                    self._put(IfMatch=self.etag)
                else:
                    self._put()

    def release(self) -> None:
        """Stop renewing and delete the lease (only if it is still ours)."""
        self._stop.set()
        current, _ = self._read()
        if current is not None and current.get("token") == self.token:
            with contextlib.suppress(Exception):
                self.remote.delete(self.rel)


def _modified(info: dict) -> float:
    """When an object was last written (epoch seconds) from an fsspec ``info()``; now if unknown."""
    for key in ("LastModified", "mtime", "last_modified", "updated", "created"):
        value = info.get(key)
        if hasattr(value, "timestamp"):
            return float(value.timestamp())
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return time.time()


# -- %dreamer status ----------------------------------------------------------------------------
def status_rows(remote: Remote, rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Add ``where`` (``local``, ``remote``, ``both``) to ``%dreamer status`` rows, and rows for what
    only the remote holds; also the remote's summary (url, pending uploads, failed pushes)."""
    try:
        committed = remote.committed()
        reachable = True
    except Exception:  # noqa: BLE001 - status never fails on an unreachable remote
        committed, reachable = {}, False
    out = []
    for row in rows:
        there = committed.pop(row["name"], None)
        if not reachable:
            where = "local (remote unreachable)"
        elif there is None:
            where = "local"
        elif there == row.get("fingerprint"):
            where = "both"
        else:
            where = "local (another version in the remote)"
        out.append({**row, "where": where})
    for name, fingerprint in sorted(committed.items()):
        out.append({"name": name, "kind": remote._kinds.get(name, ""), "state": "complete", "size": None, "backups": "", "fingerprint": fingerprint, "where": "remote"})
    pending = remote.pending()
    return out, {"url": remote.url, "pending": pending, "errors": list(remote.errors[-3:])}
