"""The generation-cache database: canonical keys, storage, concurrency, observers, interrupts."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dreamer_magic import cache
from dreamer_magic.errors import CacheMissError, DreamerError

REPO = Path(__file__).resolve().parents[1]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4),
    max_leaves=12,
)


@pytest.fixture
def db(tmp_path):
    database = cache.Database(tmp_path / ".cache" / "test-db.sqlite")
    yield database
    database.close()


def rows_for(texts, tag="t"):
    out = []
    for i, text in enumerate(texts):
        request = cache.canonical_json({"args": {"tag": tag}, "prompt": text, "sample": i})
        out.append((cache.request_key(request), request, cache.json_str(f"answer to {text}")))
    return out


# -- canonical JSON and keys ------------------------------------------------------------------------
def test_canonical_json_is_sorted_compact_and_keeps_unicode():
    assert cache.canonical_json({"b": [1, (2, 3)], "a": "été"}) == '{"a":"été","b":[1,[2,3]]}'


def test_canonical_json_converts_numpy_scalars():
    np = pytest.importorskip("numpy")
    assert cache.canonical_json({"x": np.int64(3), "y": np.float64(0.5)}) == '{"x":3,"y":0.5}'


@pytest.mark.parametrize(
    "value, fragment",
    [
        ({"opts": {1: "a"}}, "the key 1"),
        ({"opts": {"s": {1, 2}}}, "args['opts']['s'] is a builtins.set"),
        ({"client": object()}, "args['client'] is a builtins.object"),
        ({"raw": b"x"}, "builtins.bytes"),
    ],
)
def test_canonical_json_names_what_cannot_be_a_key(value, fragment):
    with pytest.raises(DreamerError) as info:
        cache.canonical_json(value, "args")
    assert fragment in str(info.value)
    assert "repr" not in str(info.value)


@given(prompt=st.text(), shared=st.dictionaries(st.sampled_from(["args", "a", "model"]), json_values, max_size=3))
def test_spliced_request_is_exactly_the_canonical_json(prompt, shared):
    prefix = cache.request_prefix(shared, "prompt")
    spliced = f"{prefix}{cache.json_str(prompt)},\"sample\":3}}"
    assert spliced == cache.canonical_json({**shared, "prompt": prompt, "sample": 3})
    assert cache.request_key(spliced) == xxhash.xxh3_128_hexdigest(spliced.encode())


@given(prompts=st.lists(st.text(), max_size=5), shared=st.dictionaries(st.sampled_from(["args", "a"]), json_values, max_size=2))
def test_request_keys_are_the_keys_of_the_canonical_requests_on_every_call(prompts, shared):
    prefix = cache.request_prefix(shared, "prompt")
    expected = [cache.request_key(cache.canonical_json({**shared, "prompt": p, "sample": 1})) for p in prompts]
    assert cache.request_keys(prefix, prompts, ',"sample":1}') == expected
    assert cache.request_keys(prefix, prompts, ',"sample":1}') == expected  # remembered
    assert cache.request_keys(prefix, [p + "\n" for p in prompts], ',"sample":1}') == [
        cache.request_key(cache.canonical_json({**shared, "prompt": p + "\n", "sample": 1})) for p in prompts
    ]


def test_request_prefix_refuses_fields_that_would_break_the_order():
    with pytest.raises(ValueError):
        cache.request_prefix({"zzz": 1}, "prompt")


def test_database_name_is_readable_and_carries_the_fingerprint():
    assert cache.database_name("GPT2 tiny/../x", "0123456789abcdef" * 2) == "gpt2-tiny-..-x-0123456789abcdef"
    assert cache.database_name("my-api") == "my-api"


# -- storage ---------------------------------------------------------------------------------------
def test_schema_wal_and_busy_timeout(db):
    db.put_many(rows_for(["x"]))
    conn = db.connection
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    # a lock is waited for 1 s quietly, then (with a CacheWarning) up to BUSY_TIMEOUT_S in all
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == int(cache.WAIT_NOTE_AFTER_S * 1000)
    assert cache.BUSY_TIMEOUT_S >= 30
    columns = [row[1] for row in conn.execute("PRAGMA table_info(cache)")]
    assert columns == ["key", "request", "response", "created", "shared"]
    assert conn.execute("PRAGMA user_version").fetchone()[0] == cache.SCHEMA_VERSION == 2
    assert (db.path.parent / ".gitignore").is_file()


def test_readable_with_the_sqlite_utils_cli(db):
    rows = rows_for(["héllo", ""])
    db.put_many(rows)
    cli = Path(sys.executable).with_name("sqlite-utils")
    out = subprocess.run([str(cli), "rows", str(db.path), "cache"], capture_output=True, text=True, check=True)
    listed = json.loads(out.stdout)
    assert {r["key"] for r in listed} == {r[0] for r in rows}
    request = json.loads(listed[0]["request"])
    assert request["args"] == {"tag": "t"} and "prompt" in request
    assert xxhash.xxh3_128_hexdigest(listed[0]["request"].encode()) == listed[0]["key"]


def test_the_generation_path_never_imports_sqlite_utils(tmp_path):
    """A first lookup must not pay for ``import sqlite_utils`` (pandas, click: ~0.3 s); the
    database it writes stays the one the sqlite-utils CLI reads (test above)."""
    code = textwrap.dedent(
        f"""
        import sys
        from dreamer_magic import cache
        db = cache.open_database("no-sqlite-utils", root={str(tmp_path)!r})
        keys = [cache.request_key(str(i)) for i in range(3)]
        found = cache.get_or_compute(db, keys, lambda b: ['"a"'] * len(b), lambda b: ["{{}}"] * len(b),
                                     batch_size=2, progress=False, decode_json=True)
        again = cache.get_or_compute(db, keys, None, None, batch_size=2, decode_json=True)
        print(found == again == dict.fromkeys(keys, "a"), "sqlite_utils" in sys.modules)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "False"], out.stdout + out.stderr


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=st.lists(st.text() | st.just("") | st.text(min_size=1, max_size=20).map(lambda s: s * 1000), max_size=6),
       responses=st.lists(json_values, min_size=6, max_size=6))
def test_round_trip_of_prompts_and_responses(db, texts, responses):
    rows = []
    for text, response in zip(texts, responses):
        request = cache.canonical_json({"prompt": text})
        rows.append((cache.request_key(request), request, json.dumps(response, ensure_ascii=False)))
    db.put_many(rows)
    keys = [r[0] for r in rows]
    expected = {k: json.loads(r[2]) for k, r in zip(keys, rows)}
    assert db.get_json_many(keys) == expected  # the all-hit fast path
    assert db.get_json_many(keys + ["0" * 32]) == expected  # the fallback with a miss
    assert {k: json.loads(v) for k, v in db.get_many(keys).items()} == expected


def test_upsert_overwrites(db):
    (key, request, _), = rows_for(["a"])
    db.put_many([(key, request, '"old"')])
    db.put_many([(key, request, '"new"')])
    assert db.get(key) == '"new"' and db.count() == 1


def test_blobs_round_trip(db):
    db.put_many([("k" * 32, "{}", b"\x00\x01\xff")])
    assert db.get_many(["k" * 32]) == {"k" * 32: b"\x00\x01\xff"}


WRITER = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {repo!r})
    from dreamer_magic import cache
    worker, path = int(sys.argv[1]), sys.argv[2]
    db = cache.Database(path)
    for i in range(2500):
        request = cache.canonical_json({{"worker": worker, "i": i}})
        rows = [(cache.request_key(request), request, cache.json_str(f"w{{worker}} {{i}}"))]
        if i % 100 == 0:  # a key every worker writes: races on one row must not raise
            shared = cache.canonical_json({{"shared": i}})
            rows.append((cache.request_key(shared), shared, cache.json_str(f"w{{worker}}")))
        db.put_many(rows)
    """
)


def test_four_processes_write_2500_entries_each_at_once(tmp_path):
    path = tmp_path / ".cache" / "shared.sqlite"
    script = WRITER.format(repo=str(REPO))
    procs = [
        subprocess.Popen([sys.executable, "-c", script, str(w), str(path)], stderr=subprocess.PIPE, text=True)
        for w in range(4)
    ]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], errors
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT count(*) FROM cache").fetchone()[0] == 4 * 2500 + 25
    assert conn.execute("SELECT count(*) FROM cache WHERE request LIKE '{\"i\":%'").fetchone()[0] == 10_000


# -- get_or_compute ------------------------------------------------------------------------------------
def make_calls(db, texts, **kw):
    rows = {k: (q, r) for k, q, r in rows_for(texts)}
    batches = []

    def compute(batch):
        batches.append(list(batch))
        return [rows[k][1] for k in batch]

    found = cache.get_or_compute(
        db, list(rows), compute, lambda batch: [rows[k][0] for k in batch],
        batch_size=kw.pop("batch_size", 2), progress=False, decode_json=True, **kw,
    )
    return found, batches


def test_get_or_compute_computes_misses_once_in_batches(db):
    found, batches = make_calls(db, ["a", "b", "c"])
    assert [len(b) for b in batches] == [2, 1]
    assert sorted(found.values()) == ["answer to a", "answer to b", "answer to c"]
    again, batches = make_calls(db, ["a", "b", "c", "d"])
    assert len(batches) == 1 and len(batches[0]) == 1 and len(again) == 4


def test_cache_only_raises_saying_how_many_are_missing(db):
    make_calls(db, ["a"])
    with pytest.raises(CacheMissError, match="2 of 3 prompts are not in the generation cache"):
        make_calls(db, ["a", "b", "c"], cache_only=True)
    assert db.count() == 1


def test_force_recomputes_everything(db):
    make_calls(db, ["a", "b"])
    _, batches = make_calls(db, ["a", "b"], force=True)
    assert sum(map(len, batches)) == 2


def test_an_interrupt_keeps_every_finished_batch(db):
    rows = {k: (q, r) for k, q, r in rows_for([str(i) for i in range(10)])}
    calls = []

    def compute(batch):
        calls.append(batch)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return [rows[k][1] for k in batch]

    with pytest.raises(KeyboardInterrupt):
        cache.get_or_compute(db, list(rows), compute, lambda b: [rows[k][0] for k in b], batch_size=2, progress=False)
    assert db.count() == 4
    calls.clear()
    cache.get_or_compute(db, list(rows), lambda b: [rows[k][1] for k in b] if not calls.append(b) else None,
                         lambda b: [rows[k][0] for k in b], batch_size=2, progress=False)
    assert sum(map(len, calls)) == 6


# -- observers and status -----------------------------------------------------------------------------
def test_observers_hear_hits_and_misses_and_session_counts_add_up(db):
    heard = []
    observer = lambda name, hits, misses: heard.append((name, hits, misses))  # noqa: E731
    cache.add_observer(observer)
    try:
        make_calls(db, ["a", "b"])
        make_calls(db, ["a", "b", "c"])
    finally:
        cache.remove_observer(observer)
    make_calls(db, ["a"])
    assert heard == [("test-db", 0, 2), ("test-db", 2, 1)]
    hits, misses = cache.session_counts()[str(db.path)]
    assert (hits, misses) == (3, 3)


def test_status_counts_cache_activity_through_an_observer(db):
    from dreamer_magic.status import Status

    status = Status(kind="step", name="s")
    cache.add_observer(status.count_cache)
    try:
        make_calls(db, ["a", "b"])
    finally:
        cache.remove_observer(status.count_cache)
    assert status.cache == {"test-db": [0, 2]}


def test_list_databases_reports_rows_size_and_hit_rate(db, tmp_path):
    make_calls(db, ["a", "b"])
    make_calls(db, ["a", "b"])
    (listed,) = cache.list_databases(tmp_path)
    assert listed["name"] == "test-db" and listed["rows"] == 2 and listed["size"] > 0
    assert listed["hits"] >= 2 and 0 < listed["hit_rate"] < 1
    assert cache.list_databases(tmp_path / ".cache")[0]["path"] == str(db.path)
    assert cache.list_databases(tmp_path / "nowhere") == []


# -- lookups never mix keys up --------------------------------------------------------------------
def test_lookups_return_each_key_only_its_own_response(db):
    # keys sharing a long prefix (as two keys hashed onto one integer id would), keys that
    # hold the separator, a miss among hits and a repeated key: never another key's answer
    keys = ["a" * 16 + "0" * 16, "a" * 16 + "1" * 16, "a" * 16 + "0" * 15, "x,y", "x"]
    db.put_many([(k, "{}", json.dumps(f"answer for {k}")) for k in keys])
    for wanted in (keys, keys[:2], keys[:3] + ["a" * 16 + "2" * 16], keys + keys[:1], ["x,y"], ["x", "y"]):
        expected = {k: f"answer for {k}" for k in wanted if k in keys}
        assert db.get_json_many(wanted) == expected
        assert {k: json.loads(v) for k, v in db.get_many(wanted).items()} == expected


def test_a_large_write_is_checkpointed_and_read_back(db, monkeypatch):
    monkeypatch.setattr(cache, "CHECKPOINT_AFTER", 3)
    calls = []
    checkpoint = db.checkpoint
    monkeypatch.setattr(db, "checkpoint", lambda: calls.append(1) or checkpoint())
    found, _ = make_calls(db, ["a", "b"])  # 2 rows: below the threshold
    assert calls == []
    found, _ = make_calls(db, ["a", "b", "c", "d", "e"])  # 3 new rows
    assert calls == [1]
    assert make_calls(db, ["a", "b", "c", "d", "e"])[0] == found
