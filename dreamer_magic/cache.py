"""The generation cache: one SQLite database per model, shared by kernels and processes.

Examples
--------
>>> db = open_database("my-api", root=tmp / ".cache")  # doctest: +SKIP
>>> found = db.get_many([request_key('{"prompt":"hi"}')])  # doctest: +SKIP

Each database lives in ``<output folder>/.cache/<name>.sqlite`` (schema version
:data:`SCHEMA_VERSION`, in ``PRAGMA user_version``), readable with the ``sqlite-utils`` CLI::

    CREATE TABLE [cache] (
       [key] TEXT PRIMARY KEY,   -- xxh3-128 hex digest of the full request, below
       [request] TEXT,           -- the full request as canonical JSON, or (shared set) the
                                 --   JSON of its per-item part only: the prompt, the text
       [response] TEXT,          -- the response as JSON (Embedder: float32 little-endian BLOB)
       [created] TEXT,           -- ISO 8601 UTC time the row was written
       [shared] INTEGER          -- the row's shared request parts, or NULL
    )
    CREATE TABLE [shared] (      -- what many rows' requests share, stored once
       [id] INTEGER PRIMARY KEY,
       [prefix] TEXT NOT NULL,   -- the request's JSON up to the item: model fingerprint, arguments
       [suffix] TEXT NOT NULL,   -- and after it: ``}`` or ``,"sample":N}``
       UNIQUE ([prefix], [suffix])
    )
    CREATE VIEW [requests] AS    -- key, full request (prefix || request || suffix), response, created

``sqlite-utils rows output/.cache/gpt2-tiny-0123456789abcdef.sqlite requests`` lists every row
with its full request; ``... cache`` lists the rows as stored. A row's key is always the hash
of its full request. Storing the model fingerprint and generation arguments once instead of in
every row makes a short entry 55% of its version-1 size (456 bytes to 251 in
``benchmarks/bench_cache.py``; sqlitedict, which stores no request at all, takes 184). Version 1
(``user_version`` 0: the full request in every row, no ``shared``) is migrated in place on
first use, by adding the column, the table and the view; its rows stay as they are and hit.

API and engine backends (``backends/``) add three columns the first time they use a database
(``ALTER TABLE ... ADD COLUMN``: older databases and readers are unaffected)::

       [meta] TEXT,              -- JSON: finish_reason, model (as the server reported it),
                                 --   system_fingerprint, usage, choices, tool_calls
       [prompt_tokens] REAL,     -- this answer's share of the request's prompt tokens
       [completion_tokens] REAL  -- and of its completion tokens

so that an all-hit lookup sums the tokens it saved in the same query (:meth:`Database.get_answers`).

Keys
    ``key = xxh3_128(canonical JSON of the request)``, where canonical JSON is
    ``json.dumps(request, sort_keys=True, separators=(",", ":"), ensure_ascii=False)``
    encoded as UTF-8. Only JSON values may take part (:func:`canonical_json` checks,
    and names any argument that is not one); nothing is ever a ``repr``, nothing is
    silently dropped. Clients build the JSON of the arguments shared by many prompts once
    and splice each prompt in (:func:`request_prefix`), which gives byte-identical JSON
    to ``canonical_json`` of the whole request at a fraction of the cost.

Several processes at once
    WAL journal, a busy timeout of :data:`BUSY_TIMEOUT_S` seconds, ``BEGIN IMMEDIATE`` for
    every write, and an ``INSERT ... ON CONFLICT(key) DO UPDATE`` upsert that cannot raise
    a UNIQUE error when two writers race on one key. Each :meth:`Database.put_many` is one
    transaction, so every finished batch survives an interrupt or ``kill -9``.

When the disk or another process says no
    A computed result is always returned. A write waits :data:`WAIT_NOTE_AFTER_S` for
    another process's lock quietly, then says so (:class:`~dreamer_magic.errors.CacheWarning`)
    and waits up to :data:`BUSY_TIMEOUT_S` in all; if the lock is still held, the disk is full
    or the file cannot be written, the rows are kept in memory (lookups in this process see
    them) and written with the next write or at exit (:meth:`Database.flush`). A damaged file
    ("file is not a database", "malformed") is renamed ``<name>.sqlite.damaged-<time>`` (its
    WAL with it) and a new one started, with one warning; a file deleted while in use (``.cache``
    removed) is created again before the next write.

Lookups
    The table keeps its rows in write order (appends are cheap and pages full). A batched
    lookup finds the rowids through the key index, then reads the rows in rowid order and
    returns each row's own stored key with its response, so a response is only ever matched
    to the key it was stored under. (Rejected, measured: a hash-derived ``id INTEGER PRIMARY
    KEY``, one B-tree search per key, made 100,000 small writes 3.4x slower, as random ids
    scatter rows over the table just as ``WITHOUT ROWID`` does.) After a call that wrote
    :data:`CHECKPOINT_AFTER` rows or more, :func:`get_or_compute` checkpoints the WAL.

Live counts
    :func:`add_observer` registers ``fn(database, hits, misses)``, called after each lookup
    (a running ``%%dreamer_step`` uses it to show the cell's cache activity);
    :func:`session_counts` and :func:`list_databases` report this session's hit rates.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import sqlite3
import sys
import threading
import time
import warnings
from json.encoder import encode_basestring as _json_str
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import xxhash

from . import events
from .errors import CacheMissError, CacheWarning, DreamerError

__all__ = [
    "TABLE",
    "Database",
    "add_observer",
    "cache_folder",
    "canonical_json",
    "database_name",
    "decode_json_many",
    "get_or_compute",
    "json_str",
    "jsonable",
    "list_databases",
    "open_database",
    "remove_observer",
    "request_key",
    "request_keys",
    "request_prefix",
    "session_counts",
    "session_savings",
]

TABLE = "cache"
SHARED = "shared"  # request parts shared by many rows (the model fingerprint, the generation arguments)
REQUESTS_VIEW = "requests"  # every row with its full request JSON, for readers
SCHEMA_VERSION = 2  # PRAGMA user_version; 1 (or 0) is the sqlite-utils table of full requests
SUFFIX = ".sqlite"
BUSY_TIMEOUT_S = 60.0  # how long a write waits for another process's write lock (read at each write)
WAIT_NOTE_AFTER_S = 1.0  # a write that waits longer than this for the lock says so first
CHECKPOINT_AFTER = 10_000  # rows written by one get_or_compute call that trigger a checkpoint
LOOKUP_CHUNK = 250_000  # keys per lookup query (one JSON array parameter each)

json_str = _json_str  # JSON string literal of a str, as json.dumps(..., ensure_ascii=False) writes it
_hash = xxhash.xxh3_128_hexdigest
_NAME_OK = re.compile(r"[^a-z0-9._-]+")


# -- canonical requests and keys ------------------------------------------------------------
def canonical_json(value: Any, what: str = "value") -> str:
    """The canonical JSON text of a JSON value: sorted keys, no spaces, UTF-8 characters kept.

    Examples
    --------
    >>> canonical_json({"b": [1, 2.5], "a": "é"})
    '{"a":"é","b":[1,2.5]}'

    Tuples become lists and numpy scalars their Python value; anything else that is not a
    JSON value raises, naming where it is (``what`` names the outermost value).

    Raises
    ------
    DreamerError
        For a dict key that is not a string, a set, an object, bytes, ... — never a repr.
    """
    return json.dumps(jsonable(value, what), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


_JSON_SCALARS = (str, int, float, bool, type(None))


def jsonable(value: Any, what: str = "value") -> Any:
    """``value`` as plain JSON data: tuples become lists, numpy scalars Python numbers.

    Examples
    --------
    >>> jsonable({"a": (1, 2)})
    {'a': [1, 2]}

    Raises
    ------
    DreamerError
        Naming where the offending part is (``what`` names the whole value), for a dict key
        that is not a string, a set, bytes, an arbitrary object... — never a repr.
    """
    if isinstance(value, _JSON_SCALARS):
        return value
    if isinstance(value, (list, tuple)):
        return [jsonable(item, f"{what}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, dict):
        out = {}
        for k, item in value.items():
            if not isinstance(k, str):
                raise DreamerError(
                    f"{what} has the key {k!r} ({type(k).__name__}), but only string keys "
                    "can be part of a cache key or a cached result; use str keys"
                )
            out[k] = jsonable(item, f"{what}[{k!r}]")
        return out
    if type(value).__module__ == "numpy" and getattr(value, "shape", None) == ():
        return jsonable(value.item(), what)
    raise DreamerError(
        f"{what} is a {type(value).__module__}.{type(value).__qualname__}, which cannot be "
        "part of a cache key or a cached result: only JSON values (None, bool, int, float, "
        "str, lists and dicts with str keys) can; convert it to one"
    )


def request_prefix(shared: dict[str, Any], item_field: str, what: str = "argument") -> str:
    """The canonical JSON of a request up to its per-item field, for fast key building.

    Examples
    --------
    >>> prefix = request_prefix({"args": {"t": 0.7}}, "prompt")
    >>> prefix + json_str("hi") + "}" == canonical_json({"args": {"t": 0.7}, "prompt": "hi"})
    True

    Every key of ``shared`` must sort before ``item_field``, and any field appended after
    the item (``,"sample":1}``) must sort after it, so that the spliced text is exactly the
    canonical JSON of the whole request.
    """
    if any(k >= item_field for k in shared):
        raise ValueError(f"shared request fields must sort before {item_field!r}")
    body = canonical_json(shared, what)
    return body[:-1] + ("," if shared else "") + json_str(item_field) + ":"


def request_key(request_json: str) -> str:
    """The cache key of a request given as canonical JSON: a 32-character xxh3-128 hex digest.

    Examples
    --------
    >>> len(request_key(canonical_json({"prompt": "hi"})))
    32
    """
    return _hash(request_json.encode("utf-8"))


_KEY_MEMO: dict[tuple[str, str], dict[int, str]] = {}  # (prefix, suffix) -> prompt digest -> key
KEY_MEMO_ENTRIES = 300_000  # keys remembered per (prefix, suffix): about 50 MB at most


def invalid_text(items: Sequence[str], what: str) -> DreamerError | None:
    """The error for the first of ``items`` that cannot be encoded as UTF-8 (a lone surrogate),
    named ``what[i]``, for a caller that caught the ``UnicodeEncodeError`` of building its keys;
    ``None`` when every item encodes (the fault is elsewhere: re-raise)."""
    for i, p in enumerate(items):
        try:
            p.encode()
        except UnicodeEncodeError as e:
            return DreamerError(
                f"{what}[{i}] is not valid Unicode text ({e.reason} at position {e.start}); "
                "remove lone surrogate characters"
            )
    return None


def request_keys(prefix: str, items: Sequence[str], suffix: str) -> list[str]:
    """The keys of ``prefix + json_str(item) + suffix`` for each item, remembered for the next call.

    Examples
    --------
    >>> prefix = request_prefix({"args": {"t": 0.7}}, "prompt")
    >>> request_keys(prefix, ["hi"], "}") == [request_key(prefix + json_str("hi") + "}")]
    True

    The key is always the hash of the request's canonical JSON (:func:`request_key`);
    building that JSON (escaping a 2,000-character prompt) costs ten times hashing the
    prompt itself, so each key is remembered under the xxh3-128 digest of the prompt's
    UTF-8 text: looking the same prompts up again (re-running a cell) hashes each prompt
    once instead of escaping it. At most :data:`KEY_MEMO_ENTRIES` keys are kept per
    ``(prefix, suffix)``, and only for the few most recent ones.

    Raises
    ------
    TypeError
        If an item is not a ``str``. ``UnicodeEncodeError`` if one holds a lone surrogate.
    """
    memo = _KEY_MEMO.get((prefix, suffix))
    if memo is None:
        if len(_KEY_MEMO) >= 4:
            _KEY_MEMO.pop(next(iter(_KEY_MEMO)))
        memo = _KEY_MEMO[(prefix, suffix)] = {}
    digest = xxhash.xxh3_128_intdigest
    try:
        digests = [digest(p.encode()) for p in items]
    except AttributeError:
        raise TypeError("request_keys() takes strings") from None
    keys = list(map(memo.get, digests))
    if None in keys:
        if len(memo) + len(items) > KEY_MEMO_ENTRIES:
            memo.clear()
        for i, key in enumerate(keys):
            if key is None:
                key = keys[i] = _hash(f"{prefix}{json_str(items[i])}{suffix}".encode())
                if len(items) <= KEY_MEMO_ENTRIES:
                    memo[digests[i]] = key
    return keys  # type: ignore[return-value]


def database_name(name: str, fingerprint: str | None = None) -> str:
    """The file stem of a model's database: the model's name and 16 hex of its fingerprint.

    Examples
    --------
    >>> database_name("GPT2 tiny", "0123456789abcdef0123")
    'gpt2-tiny-0123456789abcdef'
    """
    stem = _NAME_OK.sub("-", str(name).strip().lower().replace(" ", "-")).strip("-._")[:80]
    stem = stem or "model"
    return f"{stem}-{fingerprint[:16]}" if fingerprint else stem


def cache_folder(output_folder: str | os.PathLike | None = None) -> Path:
    """``<output folder>/.cache``, the home of every generation-cache database.

    Examples
    --------
    >>> cache_folder("/tmp/output")
    PosixPath('/tmp/output/.cache')
    """
    if output_folder is None:
        from .folders import get_output_folder  # imported late: folders is a sibling module

        output_folder = get_output_folder()
    return Path(output_folder).absolute() / ".cache"


# -- observers and this session's counts ------------------------------------------------------
# Hit/miss counts go out as events (events.py): running steps subscribe for their own thread.
_observers: list[tuple[Any, int]] = []  # (fn, subscription token); fns may be unhashable
_session: dict[str, list[int]] = {}  # database path -> [hits, misses]
_savings: dict[str, list] = {}  # database path -> [tokens served from the cache, money saved or None]
_session_lock = threading.Lock()


def add_observer(fn: Callable[[str, int, int], Any]) -> None:
    """Call ``fn(database_name, hits, misses)`` after every generation-cache lookup, in any thread.

    Examples
    --------
    >>> add_observer(status.count_cache)  # doctest: +SKIP
    """
    if all(known != fn for known, _ in _observers):
        _observers.append((fn, events.subscribe(fn)))


def remove_observer(fn: Callable[[str, int, int], Any]) -> None:
    """Stop calling ``fn``; removing one that is not registered does nothing."""
    for i, (known, token) in enumerate(_observers):
        if known == fn:
            del _observers[i]
            events.unsubscribe(token)
            return


def record(database: Database, hits: int, misses: int, *, tokens: int = 0,
           saved: float | None = None) -> None:
    """Count a lookup in this session's totals and publish it (running steps show it live).

    ``tokens`` is what the hits would have cost in tokens and ``saved`` in money (API
    backends, given prices); both add up per database for ``%dreamer status``.
    """
    with _session_lock:
        counts = _session.setdefault(str(database.path), [0, 0])
        counts[0] += hits
        counts[1] += misses
        if tokens or saved is not None:
            more = _savings.setdefault(str(database.path), [0, None])
            more[0] += tokens
            if saved is not None:
                more[1] = (more[1] or 0.0) + saved
    if tokens or saved is not None:
        events.publish(database.name, hits, misses, tokens=tokens, saved=saved)
    else:
        events.publish(database.name, hits, misses)


def session_counts() -> dict[str, tuple[int, int]]:
    """This session's ``{database path: (hits, misses)}``.

    Examples
    --------
    >>> session_counts()  # doctest: +SKIP
    {'/work/output/.cache/gpt2-tiny-0123456789abcdef.sqlite': (990, 10)}
    """
    with _session_lock:
        return {path: (h, m) for path, (h, m) in _session.items()}


def session_savings() -> dict[str, tuple[int, float | None]]:
    """This session's ``{database path: (tokens served from the cache, money saved or None)}``.

    Examples
    --------
    >>> session_savings()  # doctest: +SKIP
    {'/work/output/.cache/openai-gpt-4o-mini-0123456789abcdef.sqlite': (51200, 0.0123)}

    Only API backends report tokens (from the usage stored with each answer); money needs
    ``prices=`` on the backend.
    """
    with _session_lock:
        return {path: (t, m) for path, (t, m) in _savings.items()}


def list_databases(root: str | os.PathLike) -> list[dict[str, Any]]:
    """Every generation-cache database under an output folder, for ``%dreamer status``.

    Examples
    --------
    >>> list_databases(get_output_folder())  # doctest: +SKIP
    [{'name': 'gpt2-tiny-0123456789abcdef', 'path': '...', 'rows': 1000, 'size': 303104,
      'hits': 990, 'misses': 10, 'hit_rate': 0.99, 'tokens_from_cache': 0, 'money_saved': None}]

    ``root`` is the output folder (its ``.cache`` folder is read) or the ``.cache`` folder
    itself. ``size`` counts the database with its WAL file; ``hit_rate`` is ``None`` when
    this session made no lookup in that database.
    """
    root = Path(root).absolute()
    folder = root if root.name == ".cache" else root / ".cache"
    if not folder.is_dir():
        return []
    counts = session_counts()
    savings = session_savings()
    found = []
    for path in sorted(folder.glob(f"*{SUFFIX}")):
        size = sum(
            p.stat().st_size for p in (path, Path(f"{path}-wal")) if p.exists()
        )
        try:
            rows = open_database(path.stem, folder).count()
        except sqlite3.DatabaseError:
            rows = None
        hits, misses = counts.get(str(path), (0, 0))
        tokens, money = savings.get(str(path), (0, None))
        found.append(
            {
                "name": path.stem,
                "path": str(path),
                "rows": rows,
                "size": size,
                "hits": hits,
                "misses": misses,
                "hit_rate": hits / (hits + misses) if hits + misses else None,
                "tokens_from_cache": tokens,
                "money_saved": money,
            }
        )
    return found


# Lookups in two steps inside one query: the keys' index gives the rowids (covering, so the
# table is not touched), then SQLite reads the rows in rowid order (``IN`` sorts them), walking
# the table front to back instead of jumping to a random page for every key. Rows come back in
# table order, each with its stored key, so a row can only ever be returned for its own key.
SEGMENTS_TABLE = "remote_segments"  # the remote segments merged into (or pushed from) this database
_SEGMENT_COLUMNS = ("key", "request", "response", "created", "meta", "prompt_tokens", "completion_tokens")
_KEY_SEP = ","
_HITS = f"SELECT c.rowid FROM json_each(?) AS j JOIN [{TABLE}] AS c ON c.key = j.value"
_LOOKUP_ROWS = f"SELECT key, response FROM [{TABLE}] WHERE rowid IN ({_HITS})"
_ANSWER_COLUMNS = (("meta", "TEXT"), ("prompt_tokens", "REAL"), ("completion_tokens", "REAL"))
_LOOKUP_ANSWERS_JOINED = (
    f"SELECT count(*), group_concat(key, '{_KEY_SEP}'), group_concat(response, ','), "
    f"total(prompt_tokens), total(completion_tokens) FROM [{TABLE}] WHERE rowid IN ({_HITS})"
)
_LOOKUP_ANSWERS = (
    f"SELECT key, response, prompt_tokens, completion_tokens FROM [{TABLE}] WHERE rowid IN ({_HITS})"
)
_LOOKUP_JOINED = (
    f"SELECT count(*), group_concat(key, '{_KEY_SEP}'), group_concat(response, ',') "
    f"FROM [{TABLE}] WHERE rowid IN ({_HITS})"
)

# -- the database -----------------------------------------------------------------------------
_open: dict[str, Database] = {}
_open_lock = threading.Lock()


def open_database(name: str, root: str | os.PathLike | None = None) -> Database:
    """The database ``<root>/<name>.sqlite`` (``root`` defaults to the output folder's ``.cache``).

    Examples
    --------
    >>> db = open_database("gpt2-tiny-0123456789abcdef")  # doctest: +SKIP

    One :class:`Database` object per file and process; it is created on first use.
    """
    folder = Path(root).absolute() if root is not None else cache_folder()
    path = folder / f"{name}{SUFFIX}"
    with _open_lock:
        db = _open.get(str(path))
        if db is None:
            db = _open[str(path)] = Database(path)
        return db


class Database:
    """One generation-cache database file; safe to share between threads and processes.

    Examples
    --------
    >>> db = Database(tmp / "my-api.sqlite")  # doctest: +SKIP
    >>> db.put_many([(request_key(r), r, '"hello"') for r in ['{"prompt":"hi"}']])  # doctest: +SKIP
    1
    >>> db.get_many([request_key('{"prompt":"hi"}')])  # doctest: +SKIP
    {'6c1f…': '"hello"'}
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path).absolute()
        self.name = self.path.name[: -len(SUFFIX)] if self.path.name.endswith(SUFFIX) else self.path.stem
        self._conn: sqlite3.Connection | None = None
        self._pid = -1
        self._lock = threading.RLock()
        self._answer_columns = -1  # the pid whose connection has the backends' columns
        self._shared_ids: dict[tuple[str, str], int] = {}  # (prefix, suffix) -> id in the shared table
        self._shared_pid = -1
        self._file_id: tuple[int, int] | None = None  # (device, inode) of the file the connection opened
        self._unwritten: list[tuple[str, list, bool]] = []  # (sql, rows, needs the answer columns)
        self._unwritten_responses: dict[str, str | bytes] = {}  # key -> response of those rows

    def __repr__(self) -> str:
        return f"Database({str(self.path)!r})"

    # connection ------------------------------------------------------------------------------
    @property
    def connection(self) -> sqlite3.Connection:
        """This process's connection (re-opened after a fork), created with the table on first use.

        With a remote output folder, the first connection of a process first merges the
        segments other machines pushed (:meth:`merge_remote_segments`).
        """
        if self._conn is None or self._pid != os.getpid():
            try:
                conn = self._connect()
            except sqlite3.DatabaseError as e:  # "file is not a database": set it aside, start anew
                kind = _error_kind(e)
                if kind == "unwritable" and self.path.is_file():  # a read-only folder: lookups still work
                    conn = self._connect_read_only(e)
                elif kind != "damaged" or not self._set_aside(e):
                    raise
                else:
                    conn = self._connect()
            _busy(conn, min(WAIT_NOTE_AFTER_S, BUSY_TIMEOUT_S))  # longer waits say so first (_write_waiting)
            self._conn = conn
            self._pid = os.getpid()
            self._answer_columns = -1
            self._shared_pid = -1  # ids of shared request parts are looked up again
            self._file_id = _file_id(self.path)
            try:
                self.merge_remote_segments()
            except (sqlite3.Error, OSError) as e:  # locked, full...: merged when it is next opened
                if _error_kind(e) is None:
                    raise
                _note(f"the remote segments of the generation cache {self.name!r} could not be merged now ({e})")
        return self._conn

    def _connect_read_only(self, error: BaseException) -> sqlite3.Connection:
        """A read-only connection to a database that cannot be opened for writing (a read-only
        output folder): lookups work, and writes are kept in memory (:meth:`_store`)."""
        from urllib.parse import quote

        for mode in ("mode=ro", "immutable=1"):  # immutable: not even the WAL index can be written
            conn = sqlite3.connect(f"file:{quote(str(self.path))}?{mode}", uri=True, isolation_level=None, check_same_thread=False)
            try:
                conn.execute(f"SELECT 1 FROM [{TABLE}] LIMIT 1").fetchall()
                return conn
            except sqlite3.Error:
                conn.close()
        raise error

    # the remote output folder (remote.py, SPEC §7) ------------------------------------------
    def _mirror(self) -> Any:
        """The remote mirror, when one is set and this database lives in the output folder's ``.cache``."""
        import sys

        module = sys.modules.get("dreamer_magic.remote")  # never imported here: set by %dreamer remote
        remote = module.get_remote() if module is not None else None
        if remote is None or self.path.parent != cache_folder():
            return None
        return remote

    def merge_remote_segments(self) -> int:
        """Merge the remote segments of this database not merged here yet; returns rows added.

        Each segment goes in one transaction with its name in ``[remote_segments]``, so a
        segment is merged once, and an interrupted merge resumes. A row already here is kept
        (both machines computed the same request).
        """
        remote = self._mirror()
        if remote is None:
            return 0
        from . import remote as mirror

        conn = self._conn
        assert conn is not None
        with self._lock:
            conn.execute(f"CREATE TABLE IF NOT EXISTS [{SEGMENTS_TABLE}] (name TEXT PRIMARY KEY, merged TEXT)")
            done = {row[0] for row in conn.execute(f"SELECT name FROM [{SEGMENTS_TABLE}]")}
        try:
            names = [n for n in sorted(mirror.list_segments(remote, self.name)) if n not in done]
            if not names:
                return 0
            paths = {remote.path(f"{mirror.segment_folder(self.name)}/{n}"): n for n in names}
            contents = mirror.retry(lambda: remote.fs.cat(list(paths), on_error="omit"))
        except Exception:  # noqa: BLE001 - an unreachable remote: the local cache as it is
            return 0
        added = 0
        for path, data in sorted(contents.items(), key=lambda item: paths.get(item[0], "")):
            decoded = mirror.decode_rows(data) if isinstance(data, bytes) else None
            if decoded is None:
                continue
            header, rows = decoded
            replaces = set(header.get("replaces") or [])
            if replaces and replaces <= done:
                rows = []  # a compaction of segments merged here already
            added += self._merge_rows(paths[path] if path in paths else path.rsplit("/", 1)[-1], rows)
            done.add(paths.get(path, ""))
        return added

    def _merge_rows(self, segment: str, rows: list[dict]) -> int:
        conn = self._conn
        assert conn is not None
        if any("meta" in r for r in rows):
            self._add_answer_columns(conn)
        with self._lock:
            conn.execute("BEGIN IMMEDIATE")
            try:
                before = conn.total_changes
                for row in rows:
                    columns = [c for c in _SEGMENT_COLUMNS if c in row]
                    conn.execute(
                        f"INSERT INTO [{TABLE}] ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))}) "
                        "ON CONFLICT(key) DO NOTHING",
                        [row[c] for c in columns],
                    )
                added = conn.total_changes - before
                conn.execute(f"INSERT OR IGNORE INTO [{SEGMENTS_TABLE}] (name, merged) VALUES (?, ?)", (segment, _now_iso()))
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        return added

    @staticmethod
    def _add_answer_columns(conn: sqlite3.Connection) -> None:
        have = {row[1] for row in conn.execute(f"PRAGMA table_info([{TABLE}])")}
        for name, kind in _ANSWER_COLUMNS:
            if name not in have:
                conn.execute(f"ALTER TABLE [{TABLE}] ADD COLUMN [{name}] {kind}")

    def _push_segment(self, columns: Sequence[str], data: list) -> None:
        """After a batch commits: push it to the remote as one immutable segment (in the background)."""
        remote = self._mirror()
        if remote is None:
            return
        from . import remote as mirror

        name = mirror.new_segment_name(remote)
        with self._lock:
            try:  # not merged back here later; if it cannot be noted now, a merge adds nothing new
                self.connection.execute(
                    f"INSERT OR IGNORE INTO [{SEGMENTS_TABLE}] (name, merged) VALUES (?, ?)", (name, _now_iso())
                )
            except (sqlite3.Error, OSError) as e:
                if _error_kind(e) is None:
                    raise
        mirror.push_segment_later(remote, self.name, name, [dict(zip(columns, row)) for row in data])

    def _connect(self) -> sqlite3.Connection:
        # Plain sqlite3: importing sqlite_utils (pandas, click, ...) would cost the first
        # lookup of a process ~0.3 s; it stays the documented way to read a database.
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _write_gitignore(self.path.parent)
        conn = sqlite3.connect(
            str(self.path), timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
        )
        conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        conn.execute("PRAGMA cache_size = -131072")  # 128 MiB of page cache for batched lookups
        conn.execute("PRAGMA mmap_size = 1073741824")
        if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            conn.execute("PRAGMA journal_mode = wal")  # persistent; waits on the busy timeout if another process holds it
        conn.execute("PRAGMA synchronous = NORMAL")  # WAL + NORMAL: safe against process crashes
        # Batches of random keys dirty many pages: checkpoint every 64 MiB of WAL instead of
        # every 4 MiB (a page rewritten by several batches is then copied back once).
        conn.execute("PRAGMA wal_autocheckpoint = 16384")
        conn.execute("PRAGMA journal_size_limit = 67108864")
        if conn.execute("PRAGMA user_version").fetchone()[0] < SCHEMA_VERSION or not _has_table(conn, TABLE):
            _create_or_migrate(conn)
        return conn

    def close(self) -> None:
        """Close this process's connection (it re-opens on next use)."""
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None

    # reads ------------------------------------------------------------------------------------
    def get_many(self, keys: Sequence[str]) -> dict[str, str | bytes]:
        """The stored responses of those ``keys`` that are in the database (batched lookups).

        Examples
        --------
        >>> db.get_many(["0" * 32])  # doctest: +SKIP
        {}
        """
        found: dict[str, str | bytes] = {}
        if not keys:
            return found
        with self._lock:
            conn = self.connection
            for start in range(0, len(keys), LOOKUP_CHUNK):
                rows = conn.execute(
                    _LOOKUP_ROWS, ('["' + '","'.join(keys[start : start + LOOKUP_CHUNK]) + '"]',)
                ).fetchall()
                if rows:
                    found.update(rows)
        return found

    def get_json_many(self, keys: Sequence[str]) -> dict[str, Any]:
        """Like :meth:`get_many`, with the stored JSON responses decoded (the all-hit fast path).

        Examples
        --------
        >>> db.get_json_many([key])  # doctest: +SKIP
        {'6c1f…': 'an answer'}

        One query per chunk returns the count of hits and the hits' keys and responses, each
        joined into one string in the same (table) order; when every key is a hit, the keys
        come back with one ``str.split`` and the responses with a single ``json.loads`` of
        ``"[" + joined + "]"`` (no per-row Python objects). Otherwise (a miss, a repeated key,
        a key holding the separator) it falls back to :meth:`get_many`.
        """
        found: dict[str, Any] = {}
        with self._lock:
            conn = self.connection
            for start in range(0, len(keys), LOOKUP_CHUNK):
                chunk = keys[start : start + LOOKUP_CHUNK]
                count, joined_keys, joined = conn.execute(
                    _LOOKUP_JOINED, ('["' + '","'.join(chunk) + '"]',)
                ).fetchone()
                if count == len(chunk) and count:
                    got = joined_keys.split(_KEY_SEP)
                    if len(got) == count:
                        found.update(zip(got, json.loads("[" + joined + "]")))
                        continue
                raw = self.get_many(chunk)
                found.update(zip(raw.keys(), decode_json_many(raw.values())))
        return found

    def _ensure_answer_columns(self) -> sqlite3.Connection:
        """This process's connection, with the backends' ``meta``/token columns added if missing."""
        conn = self.connection
        if self._answer_columns == os.getpid():
            return conn
        have = {row[1] for row in conn.execute(f"PRAGMA table_info([{TABLE}])")}
        if any(name not in have for name, _ in _ANSWER_COLUMNS):
            _busy(conn, BUSY_TIMEOUT_S)  # once per process: wait as long as it takes
            conn.execute("BEGIN IMMEDIATE")
            try:
                have = {row[1] for row in conn.execute(f"PRAGMA table_info([{TABLE}])")}
                for name, kind in _ANSWER_COLUMNS:
                    if name not in have:
                        conn.execute(f"ALTER TABLE [{TABLE}] ADD COLUMN [{name}] {kind}")
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            finally:
                _busy(conn, min(WAIT_NOTE_AFTER_S, BUSY_TIMEOUT_S))
        self._answer_columns = os.getpid()
        return conn

    def get_answers(self, keys: Sequence[str]) -> tuple[dict[str, Any], float, float]:
        """Decoded responses of the stored ``keys``, and the prompt and completion tokens they hold.

        Examples
        --------
        >>> found, prompt_tokens, completion_tokens = db.get_answers(keys)  # doctest: +SKIP

        The backends' all-hit fast path: like :meth:`get_json_many`, one query per chunk that
        also sums the ``prompt_tokens`` and ``completion_tokens`` columns of the hits.
        """
        found: dict[str, Any] = {}
        prompt = completion = 0.0
        with self._lock:
            conn = self._ensure_answer_columns()
            for start in range(0, len(keys), LOOKUP_CHUNK):
                chunk = keys[start : start + LOOKUP_CHUNK]
                arg = ('["' + '","'.join(chunk) + '"]',)
                count, joined_keys, joined, p, c = conn.execute(_LOOKUP_ANSWERS_JOINED, arg).fetchone()
                if count == len(chunk) and count:
                    got = joined_keys.split(_KEY_SEP)
                    if len(got) == count:
                        found.update(zip(got, json.loads("[" + joined + "]")))
                        prompt += p
                        completion += c
                        continue
                rows = conn.execute(_LOOKUP_ANSWERS, arg).fetchall()
                if rows:
                    found.update(zip((r[0] for r in rows), decode_json_many(r[1] for r in rows)))
                    prompt += sum(r[2] or 0 for r in rows)
                    completion += sum(r[3] or 0 for r in rows)
        return found, prompt, completion

    def put_answers(self, rows: Iterable[tuple[str, str, str, str, float, float]]) -> int:
        """Store ``(key, request, response, meta, prompt_tokens, completion_tokens)`` rows in one transaction.

        Examples
        --------
        >>> db.put_answers([(key, request, '"Blue."', '{"finish_reason":"stop"}', 12.0, 2.0)])  # doctest: +SKIP
        1

        As :meth:`put_many` (an upsert, committed before it returns), with the backends' columns.
        """
        created = _now_iso()
        data = [(k, q, r, m, p, c, created) for k, q, r, m, p, c in rows]
        if not data:
            return 0
        sql = (
            f"INSERT INTO [{TABLE}] (key, request, response, meta, prompt_tokens, completion_tokens, "
            "created) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(key) DO UPDATE SET "
            "request = excluded.request, response = excluded.response, meta = excluded.meta, "
            "prompt_tokens = excluded.prompt_tokens, completion_tokens = excluded.completion_tokens, "
            "created = excluded.created, shared = NULL"  # the full request is in the row
        )
        self._store(sql, data, answers=True)
        self._push_segment(("key", "request", "response", "meta", "prompt_tokens", "completion_tokens", "created"), data)
        return len(data)

    def get(self, key: str) -> str | bytes | None:
        """The stored response of one key, or ``None``."""
        with self._lock:
            row = self.connection.execute(
                f"SELECT response FROM [{TABLE}] WHERE key = ?", (key,)
            ).fetchone()
        return row[0] if row else None

    def count(self) -> int:
        """How many rows the database holds."""
        with self._lock:
            return self.connection.execute(f"SELECT count(*) FROM [{TABLE}]").fetchone()[0]

    # writes -----------------------------------------------------------------------------------
    def checkpoint(self) -> None:
        """Copy the WAL back into the database file now (``PRAGMA wal_checkpoint(PASSIVE)``).

        Never waits on other processes: pages a reader still needs stay in the WAL. Lookups
        read the database file through its memory map, which is faster than through the WAL
        (all-hit lookups right after a large write burst ran ~25% faster).
        """
        with self._lock:
            try:
                self.connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            except sqlite3.OperationalError:  # busy: the next checkpoint will do it
                pass

    def put_many(self, rows: Iterable[tuple[str, str, str | bytes]]) -> int:
        """Store ``(key, request, response)`` rows in one transaction; returns how many.

        ``request`` is the request's canonical JSON, or that JSON split in three,
        ``(prefix, item JSON, suffix)``, where ``prefix`` and ``suffix`` are shared by many rows
        (the model fingerprint and generation arguments): the row then keeps only the item's
        JSON and the database the shared parts once (the ``requests`` view joins them back).

        Examples
        --------
        >>> db.put_many([(key, request, '"an answer"')])  # doctest: +SKIP
        1

        Existing keys are overwritten (an upsert that cannot fail on a race). The transaction
        starts with ``BEGIN IMMEDIATE`` and commits before returning: once this returns, the
        rows survive an interrupt, a crash or ``kill -9`` of this process. When the database
        cannot be written now (another process holds the lock past :data:`BUSY_TIMEOUT_S`, the
        disk is full), the rows are kept in memory instead, with a :class:`CacheWarning`, and
        written with the next write or when Python exits (:meth:`flush`); lookups in this
        process see them meanwhile.
        """
        created = _now_iso()
        rows = list(rows)
        if not rows:
            return 0
        sql = (
            f"INSERT INTO [{TABLE}] (key, request, response, created, shared) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT(key) DO UPDATE SET request = excluded.request, "
            "response = excluded.response, created = excluded.created, shared = excluded.shared"
        )
        with self._lock:
            data = self._compact(self.connection, rows, created)
        self._store(sql, data)
        # other machines get full requests: a shared id means something in this file only
        full = [(k, "".join(q) if type(q) is tuple else q, r, created) for k, q, r in rows]
        self._push_segment(("key", "request", "response", "created"), full)
        return len(data)

    def _compact(self, conn: sqlite3.Connection, rows: list, created: str) -> list[tuple]:
        """Rows as stored: a request given as ``(prefix, item JSON, suffix)`` keeps only the item
        JSON and the id of its shared parts in the ``shared`` table (added once, committed)."""
        ids = self._shared_ids if self._shared_pid == os.getpid() else {}
        self._shared_ids, self._shared_pid = ids, os.getpid()
        data = []
        for key, request, response in rows:
            if type(request) is tuple:
                prefix, item, suffix = request
                shared = ids.get((prefix, suffix))
                if shared is None:
                    try:
                        shared = ids[(prefix, suffix)] = self._shared_id(conn, prefix, suffix)
                    except (sqlite3.Error, OSError) as e:  # cannot write now: the row keeps its full request
                        if _error_kind(e) is None:
                            raise
                        data.append((key, prefix + item + suffix, response, created, None))
                        continue
                data.append((key, item, response, created, shared))
            else:
                data.append((key, request, response, created, None))
        return data

    def _shared_id(self, conn: sqlite3.Connection, prefix: str, suffix: str) -> int:
        sql = f"INSERT INTO [{SHARED}] (prefix, suffix) VALUES (?, ?) ON CONFLICT DO NOTHING"
        _write_many(conn, sql, [(prefix, suffix)])
        query = f"SELECT id FROM [{SHARED}] WHERE prefix = ? AND suffix = ?"
        return conn.execute(query, (prefix, suffix)).fetchone()[0]

    def request(self, key: str) -> str | None:
        """The full request JSON stored under ``key`` (its shared parts put back), or ``None``."""
        with self._lock:
            row = self.connection.execute(
                f"SELECT request FROM [{REQUESTS_VIEW}] WHERE key = ?", (key,)
            ).fetchone()
        return row[0] if row else None


    def _store(self, sql: str, data: list, *, answers: bool = False) -> None:
        """Write ``data`` now, or keep it in memory to write later: a result is never lost here.

        A database file deleted (or replaced) since it was opened is opened anew, so that later
        writes land in a file that exists; a damaged one is set aside and started anew.
        """
        connect = self._ensure_answer_columns if answers else (lambda: self.connection)
        with self._lock:
            self._check_file()
            if self._unwritten:
                self._write_unwritten(wait=False)
            for attempt in range(2):  # a second try only on a fresh database after a damaged one was set aside
                try:
                    self._write_waiting(connect(), sql, data)
                    return
                except (sqlite3.Error, OSError) as e:
                    error, kind = e, _error_kind(e)
                    if kind is None:
                        raise
                if attempt or kind != "damaged" or not self._set_aside(error):
                    break
            self._keep(sql, data, answers, error, kind or "unwritable")

    def _write_waiting(self, conn: sqlite3.Connection, sql: str, data: list) -> None:
        """One transaction; if another process holds the write lock, say so, then wait for it.

        The connection waits :data:`WAIT_NOTE_AFTER_S` for a lock by itself (no statement more
        per write); only a longer wait changes its busy timeout, and rows already kept in
        memory mean not waiting at all (the lock was held past the timeout a moment ago).
        """
        short = min(WAIT_NOTE_AFTER_S, BUSY_TIMEOUT_S)
        changed = bool(self._unwritten)
        if changed:
            _busy(conn, 0.0)
        try:
            try:
                _write_many(conn, sql, data)
                return
            except sqlite3.OperationalError as e:
                if _error_kind(e) != "busy" or self._unwritten or short >= BUSY_TIMEOUT_S:
                    raise
            _note(
                f"the generation cache {self.name!r} is locked by another process: waiting up to "
                f"{BUSY_TIMEOUT_S - short:.0f} s more to write {len(data)} result{'s' if len(data) != 1 else ''} "
                "(they are returned either way)"
            )
            changed = True
            _busy(conn, BUSY_TIMEOUT_S - short)
            _write_many(conn, sql, data)
        finally:
            if changed:
                with contextlib.suppress(sqlite3.Error):
                    _busy(conn, short)

    def _keep(self, sql: str, data: list, answers: bool, error: BaseException, kind: str) -> None:
        first = not self._unwritten
        self._unwritten.append((sql, data, answers))
        self._unwritten_responses.update((row[0], row[2]) for row in data)
        _BEHIND.add(self)
        if first:
            reason = {
                "busy": f"another process has held its write lock for more than {BUSY_TIMEOUT_S:.0f} s",
                "full": "the disk is full",
                "damaged": f"it is damaged and could not be set aside: {error}",
            }.get(kind, str(error))
            _note(
                f"{len(data)} result{'s' if len(data) != 1 else ''} could not be written to the generation "
                f"cache {self.name!r} ({reason}); they are returned as usual, kept in memory and written "
                "with the next batch or when Python exits"
            )

    def _write_unwritten(self, *, wait: bool) -> None:
        """Try again to write the rows kept in memory (waiting for the lock only if ``wait``)."""
        rows = sum(len(data) for _, data, _ in self._unwritten)
        conn = None
        try:
            while self._unwritten:
                sql, data, answers = self._unwritten[0]
                conn = self._ensure_answer_columns() if answers else self.connection
                _busy(conn, BUSY_TIMEOUT_S if wait else 0.0)
                _write_many(conn, sql, data)
                self._unwritten.pop(0)
        except (sqlite3.Error, OSError) as e:
            if _error_kind(e) is None:
                raise
            return
        finally:
            if conn is not None:
                with contextlib.suppress(sqlite3.Error):
                    _busy(conn, min(WAIT_NOTE_AFTER_S, BUSY_TIMEOUT_S))
        self._unwritten_responses.clear()
        _BEHIND.discard(self)
        _note(f"the {rows} result{'s' if rows != 1 else ''} kept in memory are now written to the generation cache {self.name!r}")

    def flush(self, *, wait: bool = True) -> int:
        """Write the rows kept in memory (see :meth:`put_many`); returns how many are still unwritten.

        Examples
        --------
        >>> db.flush()  # doctest: +SKIP
        0

        Called for every database when Python exits; ``wait`` waits up to :data:`BUSY_TIMEOUT_S`
        for another process's write lock.
        """
        with self._lock:
            if self._unwritten:
                self._check_file()
                self._write_unwritten(wait=wait)
            return sum(len(data) for _, data, _ in self._unwritten)

    def unwritten(self, keys: Iterable[str]) -> dict[str, str | bytes]:
        """The responses of those ``keys`` that are kept in memory, not yet written."""
        if not self._unwritten_responses:
            return {}
        with self._lock:
            return {k: self._unwritten_responses[k] for k in keys if k in self._unwritten_responses}

    def _check_file(self) -> None:
        """Re-open the database if its file was deleted (``.cache`` removed) or replaced."""
        if self._conn is None or self._pid != os.getpid():
            return
        now = _file_id(self.path)
        if now == self._file_id:
            return
        self._drop_connection()
        if now is None:
            _note(
                f"the generation cache {self.name!r} was deleted while in use ({self.path}); it is "
                "created again, so the results from now on are kept"
            )

    def _drop_connection(self) -> None:
        if self._conn is not None and self._pid == os.getpid():
            with contextlib.suppress(sqlite3.Error):
                self._conn.close()
        self._conn = None
        self._answer_columns = -1
        self._file_id = None

    def _set_aside(self, error: BaseException) -> bool:
        """Rename a damaged database file (and its WAL) out of the way; ``True`` if a new one can start.

        Nothing is deleted: ``<name>.sqlite.damaged-<time>`` keeps what it held. If another
        process has already set it aside (the file is not the one this process opened), this
        one only re-opens.
        """
        with self._lock:
            now = _file_id(self.path)
            opened = self._file_id
            self._drop_connection()
            if now is None or (opened is not None and now != opened):
                return True
            aside = self.path.with_name(f"{self.path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
            try:
                os.rename(self.path, aside)
            except OSError:
                return False
            for suffix in ("-wal", "-shm"):
                with contextlib.suppress(OSError):
                    os.rename(f"{self.path}{suffix}", f"{aside}{suffix}")
            _note(
                f"the generation cache {self.path.name} is damaged ({error}): it was set aside as "
                f"{aside.name} (nothing is deleted) and a new, empty one is started"
            )
            return True



# The table as sqlite-utils' ``create_table`` writes it (databases made by earlier versions
# read the same).
_CREATE_TABLE = (
    f"CREATE TABLE IF NOT EXISTS [{TABLE}] (\n   [key] TEXT PRIMARY KEY,\n   [request] TEXT,\n"
    "   [response] TEXT,\n   [created] TEXT\n)"
)
_CREATE_SHARED = (
    f"CREATE TABLE IF NOT EXISTS [{SHARED}] (\n   [id] INTEGER PRIMARY KEY,\n   [prefix] TEXT NOT NULL,\n"
    "   [suffix] TEXT NOT NULL,\n   UNIQUE ([prefix], [suffix])\n)"
)
_CREATE_VIEW = (
    f"CREATE VIEW IF NOT EXISTS [{REQUESTS_VIEW}] AS SELECT c.key AS key, "
    "CASE WHEN c.shared IS NULL THEN c.request ELSE s.prefix || c.request || s.suffix END AS request, "
    f"c.response AS response, c.created AS created FROM [{TABLE}] AS c LEFT JOIN [{SHARED}] AS s ON s.id = c.shared"
)


def _create_or_migrate(conn: sqlite3.Connection) -> None:
    """Create the tables, or bring a database of an earlier schema up to :data:`SCHEMA_VERSION`.

    Version 1 (sqlite-utils' table, full request JSON in every row) becomes version 2 by adding
    the ``shared`` column, the ``shared`` table and the ``requests`` view: a cheap change in
    place. Rows already stored keep their full request (``shared`` is NULL) and hit as before;
    readers and writers of either version go on working with the other's rows.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        if conn.execute("PRAGMA user_version").fetchone()[0] < SCHEMA_VERSION or not _has_table(conn, TABLE):
            # A rowid table: rows are appended in the order they are written and the key
            # has its own narrow index. (WITHOUT ROWID made all-hit lookups ~20% faster
            # but writes 2-4x slower and files 2.4x larger with realistic prompt sizes,
            # as random keys scatter wide rows over half-empty pages.)
            conn.execute(_CREATE_TABLE)
            columns = {row[1] for row in conn.execute(f"PRAGMA table_info([{TABLE}])")}
            if "shared" not in columns:
                conn.execute(f"ALTER TABLE [{TABLE}] ADD COLUMN [shared] INTEGER")
            conn.execute(_CREATE_SHARED)
            conn.execute(_CREATE_VIEW)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _has_table(conn: sqlite3.Connection, name: str) -> bool:
    return conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)).fetchone() is not None


    # when another process or the disk says no -------------------------------------------------


def _error_kind(error: BaseException) -> str | None:
    """What stopped a database operation: ``"busy"`` (another process holds the lock),
    ``"full"`` (the disk), ``"damaged"`` (not a database, malformed), ``"unwritable"``
    (read-only, cannot be opened, an I/O error), or ``None`` (a bug: let it raise)."""
    if isinstance(error, (sqlite3.ProgrammingError, sqlite3.IntegrityError, sqlite3.InterfaceError)):
        return None
    name = getattr(error, "sqlite_errorname", "") or ""
    text = str(error).lower()
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")) or "database is locked" in text or "is busy" in text:
        return "busy"
    if name.startswith("SQLITE_FULL") or "disk is full" in text or getattr(error, "errno", None) == 28:
        return "full"
    if name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")) or "malformed" in text or "not a database" in text:
        return "damaged"
    if isinstance(error, (sqlite3.DatabaseError, OSError)):
        return "unwritable"
    return None


def _busy(conn: sqlite3.Connection, seconds: float) -> None:
    conn.execute(f"PRAGMA busy_timeout = {int(seconds * 1000)}")


def _file_id(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _note(message: str) -> None:
    """Show a :class:`CacheWarning` at the user's line, every time it happens (not once per line)."""
    frame = sys._getframe(1)
    while frame.f_back is not None and frame.f_globals.get("__name__", "").startswith(("dreamer_magic.", "tqdm")):
        frame = frame.f_back
    warnings.warn_explicit(
        message, CacheWarning, frame.f_code.co_filename, frame.f_lineno,
        module=frame.f_globals.get("__name__", "__main__"), registry={},
    )


_BEHIND: set[Database] = set()  # databases with rows kept in memory (held until written)


@atexit.register
def _flush_at_exit() -> None:
    """Write what could not be written earlier; say what is lost if even that fails."""
    for database in list(_BEHIND):
        try:
            left = database.flush(wait=True)
        except Exception as e:  # noqa: BLE001 - the interpreter is exiting: report, never raise
            left = sum(len(data) for _, data, _ in database._unwritten)
            print(f"dreamer_magic: the generation cache {database.name!r} could not be written: {e}", file=sys.stderr)
        if left:
            print(
                f"dreamer_magic: {left} results could not be written to the generation cache "
                f"{database.name!r} before exit (they were returned; they will be computed again)",
                file=sys.stderr,
            )


def _write_many(conn: sqlite3.Connection, sql: str, data: list) -> None:
    """One immediate transaction for a batch of upserts: all rows are committed, or none."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.executemany(sql, data)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def decode_json_many(values: Iterable[str]) -> list:
    """Decode many stored JSON responses in one C-level parse.

    Examples
    --------
    >>> decode_json_many(['"a"', '[1,2]', 'null'])
    ['a', [1, 2], None]
    """
    return json.loads("[" + ",".join(values) + "]")


def _now_iso() -> str:
    from .folders import now_iso

    return now_iso()


def _write_gitignore(folder: Path) -> None:
    marker = folder / ".gitignore"
    if not marker.exists():
        try:
            marker.write_text("# generation caches written by dreamer_magic\n*\n")
        except OSError:
            pass


# -- lookup, compute the misses in batches, store -------------------------------------------------
def _lookup(database: Database, keys: Sequence[str], decode_json: bool) -> dict[str, Any]:
    """The stored responses of ``keys`` (also those kept in memory, not yet written).

    A damaged database is set aside and started anew; one that cannot be read at all is
    treated as empty, with a warning: the cache never keeps the function from running.
    """
    found: dict[str, Any] = {}
    for attempt in (1, 2):
        try:
            found = database.get_json_many(keys) if decode_json else database.get_many(keys)
            break
        except (sqlite3.Error, OSError) as e:
            kind = _error_kind(e)
            if kind is None:
                raise
            if kind == "damaged" and attempt == 1 and database._set_aside(e):
                continue
            if kind == "busy" and attempt == 1:  # rare in WAL (a crash recovery): wait as a write does
                _note(f"the generation cache {database.name!r} is locked by another process: waiting to read it")
                with database._lock:
                    _busy(database.connection, BUSY_TIMEOUT_S)
                try:
                    found = database.get_json_many(keys) if decode_json else database.get_many(keys)
                    break
                except (sqlite3.Error, OSError) as again:
                    if _error_kind(again) is None:
                        raise
                    e = again
                finally:
                    with database._lock, contextlib.suppress(sqlite3.Error):
                        _busy(database.connection, min(WAIT_NOTE_AFTER_S, BUSY_TIMEOUT_S))
            _note(f"the generation cache {database.name!r} cannot be read ({e}): computing the results instead")
            break
    if database._unwritten_responses and len(found) < len(keys):
        kept = database.unwritten(k for k in keys if k not in found)
        found.update(zip(kept, decode_json_many(kept.values())) if decode_json else kept.items())
    return found


def get_or_compute(
    database: Database,
    keys: Sequence[str],
    compute: Callable[[list[str]], Sequence[str | bytes]],
    requests: Callable[[list[str]], Sequence[str | tuple[str, str, str]]],
    *,
    batch_size: int,
    force: bool = False,
    cache_only: bool = False,
    unit: str = "prompts",
    what: str = "prompts",
    progress: bool = True,
    order: Callable[[list[str]], list[str]] | None = None,
    decode_json: bool = False,
) -> dict[str, Any]:
    """Look ``keys`` up, compute the misses batch by batch, store each batch, return them all.

    Examples
    --------
    >>> found = get_or_compute(db, keys, compute=run_model, requests=rebuild_json,
    ...                        batch_size=8)  # doctest: +SKIP

    Parameters
    ----------
    keys
        Distinct keys (clients remove duplicates first, so each is computed once).
    compute
        Given a batch of missing keys, returns their responses in stored form (JSON text,
        or bytes); called once per batch.
    requests
        Given a batch of missing keys, returns their request JSON (stored alongside).
    force
        Recompute and overwrite every key. ``cache_only`` raises :class:`CacheMissError`
        naming how many ``what`` are missing, instead of computing anything.
    order
        Optionally reorders the missing keys before batching (to batch prompts of similar
        length together).
    decode_json
        Return decoded JSON values instead of the stored text (fast path for all hits).

    Every finished batch is committed in its own transaction, so an interrupted call keeps
    what it finished and a re-run computes only the rest. Observers hear the hits and misses
    once, right after the lookup.
    """
    found = {} if force else _lookup(database, keys, decode_json)
    if len(found) == len(keys):
        record(database, len(keys), 0)
        return found
    missing = [k for k in keys if k not in found]
    record(database, len(keys) - len(missing), len(missing))
    if cache_only:
        raise CacheMissError(
            f"{len(missing)} of {len(keys)} {what} are not in the generation cache "
            f"{database.name!r} (cache_only=True); run again without cache_only=True to "
            "compute them"
        )
    if order is not None:
        missing = order(missing)
    from tqdm.auto import tqdm

    bar = tqdm(
        total=len(missing), desc=database.name, unit=unit.rstrip("s") or unit,
        disable=not progress, leave=True,
    )
    try:
        for start in range(0, len(missing), batch_size):
            batch = missing[start : start + batch_size]
            responses = compute(batch)
            if len(responses) != len(batch):
                raise DreamerError(
                    f"the model returned {len(responses)} results for a batch of {len(batch)}"
                )
            database.put_many(zip(batch, requests(batch), responses))
            found.update(zip(batch, decode_json_many(responses) if decode_json else responses))
            bar.update(len(batch))
    finally:
        bar.close()
    if len(missing) >= CHECKPOINT_AFTER:
        database.checkpoint()
    return found
