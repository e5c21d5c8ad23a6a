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

import json
import os
import re
import sqlite3
import threading
import time
from json.encoder import encode_basestring as _json_str
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import xxhash

from . import events
from .errors import CacheMissError, DreamerError

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
BUSY_TIMEOUT_S = 60.0
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

    def __repr__(self) -> str:
        return f"Database({str(self.path)!r})"

    # connection ------------------------------------------------------------------------------
    @property
    def connection(self) -> sqlite3.Connection:
        """This process's connection (re-opened after a fork), created with the table on first use."""
        if self._conn is None or self._pid != os.getpid():
            self._conn = self._connect()
            self._pid = os.getpid()
            self._answer_columns = -1
            self._shared_pid = -1  # ids of shared request parts are looked up again
        return self._conn

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
        with self._lock:
            _write_many(self._ensure_answer_columns(), sql, data)
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
        rows survive an interrupt, a crash or ``kill -9`` of this process.
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
            conn = self.connection
            data = self._compact(conn, rows, created)
            _write_many(conn, sql, data)
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
                    shared = ids[(prefix, suffix)] = self._shared_id(conn, prefix, suffix)
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
    if force:
        found: dict[str, Any] = {}
    elif decode_json:
        found = database.get_json_many(keys)
    else:
        found = database.get_many(keys)
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
