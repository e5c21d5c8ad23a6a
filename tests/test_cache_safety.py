"""The generation cache never costs the user a result (issue 12, item 8): a write lock held by
another process, a full disk, a damaged database file, a deleted ``.cache``. Real processes, a real
full file system where this machine lets us mount one, real SQLite."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

from dreamer_magic import cache, cached
from dreamer_magic.errors import CacheWarning

REPO = Path(__file__).resolve().parents[1]

HOLDER = textwrap.dedent(
    """
    import sqlite3, sys
    conn = sqlite3.connect(sys.argv[1], isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")  # the write lock, held until told to let go
    print("held", flush=True)
    sys.stdin.readline()
    conn.execute("COMMIT")
    """
)


def hold_write_lock(path: Path) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def release(holder: subprocess.Popen) -> None:
    holder.stdin.write("\n")
    holder.stdin.flush()
    assert holder.wait(timeout=30) == 0


def rows_on_disk(path: Path) -> int:
    """Rows as another process sees them (a fresh connection)."""
    conn = sqlite3.connect(str(path))
    try:
        return conn.execute(f"SELECT count(*) FROM [{cache.TABLE}]").fetchone()[0]
    finally:
        conn.close()


def messages(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, CacheWarning)]


@pytest.fixture
def api(output):
    calls: list = []

    @cached("api")
    def double(x, pad=0):
        calls.append(x)
        return "y" * pad + str(x * 2)

    double.calls = calls
    yield double
    double.database().close()


def test_a_write_lock_held_past_the_busy_timeout_says_so_and_loses_nothing(api, monkeypatch):
    monkeypatch.setattr(cache, "BUSY_TIMEOUT_S", 0.8)
    monkeypatch.setattr(cache, "WAIT_NOTE_AFTER_S", 0.2)
    assert api(1) == "2"
    path = api.database().path
    holder = hold_write_lock(path)
    try:
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            assert api(2) == "4"  # computed, returned, not thrown away
            assert api(2) == "4" and api.calls == [1, 2]  # seen in this process meanwhile
            assert api(3) == "6"  # no second wait: it joins the rows kept in memory
        seen = messages(record)
        assert len(seen) == 2, seen
        assert "is locked by another process: waiting up to 1 s more" in seen[0]
        assert "could not be written to the generation cache 'api' (another process has held its write lock" in seen[1]
        assert rows_on_disk(path) == 1
    finally:
        release(holder)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert api(4) == "8"
    assert messages(record) == ["the 2 results kept in memory are now written to the generation cache 'api'"]
    assert rows_on_disk(path) == 4


def test_rows_kept_in_memory_are_written_when_python_exits(tmp_path):
    child = textwrap.dedent(
        f"""
        import sys, warnings
        warnings.simplefilter("ignore")
        from dreamer_magic import cache, cached, folders
        folders.set_output_folder({str(tmp_path / "output")!r})
        cache.BUSY_TIMEOUT_S = 0.3

        @cached("api")
        def double(x):
            return x * 2

        double(1)
        print("ready", flush=True)
        sys.stdin.readline()
        print(double(21), flush=True)  # the lock is held: kept in memory
        cache.BUSY_TIMEOUT_S = 30  # at exit, wait for the lock
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", child], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "ready"
    path = tmp_path / "output" / ".cache" / "api.sqlite"
    holder = hold_write_lock(path)
    proc.stdin.write("\n")
    proc.stdin.flush()
    assert proc.stdout.readline().strip() == "42"
    release(holder)  # while the child's exit waits for it
    assert proc.wait(timeout=60) == 0
    assert rows_on_disk(path) == 2


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True).returncode == 0


def test_a_full_disk_drops_no_result_and_the_rows_are_written_once_there_is_room(api, output):
    """A 1 MiB tmpfs under the cache when this machine lets us mount one (a real ENOSPC);
    otherwise SQLite's own page limit, which fails the same way ("database or disk is full")."""
    folder = output / ".cache"
    mounted = _mount_tmpfs(folder, "1m")
    try:
        assert api(0) == "0"
        db = api.database()
        if not mounted:
            pages = db.connection.execute("PRAGMA page_count").fetchone()[0]
            db.connection.execute(f"PRAGMA max_page_count = {pages + 4}")
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            got = [api(i, pad=4000) for i in range(1, 601)]
        assert got == ["y" * 4000 + str(i * 2) for i in range(1, 601)]  # every result returned
        seen = messages(record)
        assert len(seen) == 1 and "(the disk is full)" in seen[0], seen
        written = rows_on_disk(db.path)
        assert written < 601
        if mounted:
            subprocess.run(["mount", "-o", "remount,size=64m", str(folder)], check=True)
        else:
            db.connection.execute("PRAGMA max_page_count = 1073741823")
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            assert api(5000) == "10000"
        assert messages(record) == [f"the {601 - written} results kept in memory are now written to the generation cache 'api'"]
        assert rows_on_disk(db.path) == 602
        assert len(api.calls) == 602
    finally:
        api.database().close()
        if mounted:
            subprocess.run(["umount", "-l", str(folder)], check=True)


def test_a_damaged_database_is_set_aside_with_one_warning_and_rebuilt(api, output):
    folder = output / ".cache"
    folder.mkdir(parents=True)
    garbage = b"this is no SQLite file\x00" * 500
    (folder / "api.sqlite").write_bytes(garbage)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert api(1) == "2"  # the cache does not block the function
        assert api(1) == "2" and api.calls == [1]
    seen = messages(record)
    assert len(seen) == 1, seen
    assert "the generation cache api.sqlite is damaged (file is not a database): it was set aside as api.sqlite.damaged-" in seen[0]
    aside = [p for p in folder.iterdir() if ".damaged-" in p.name]
    assert len(aside) == 1 and aside[0].read_bytes() == garbage  # nothing deleted
    assert rows_on_disk(folder / "api.sqlite") == 1
    assert [row["name"] for row in cache.list_databases(output)] == ["api"]


def test_a_cache_folder_deleted_mid_session_is_created_again(api, output):
    import shutil

    assert api(1) == "2"
    shutil.rmtree(output / ".cache")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert api(2) == "4"
    assert any("was deleted while in use" in m for m in messages(record))
    path = output / ".cache" / "api.sqlite"
    assert rows_on_disk(path) == 1  # the later write is kept, in a file that exists
    assert api(2) == "4" and api.calls == [1, 2]
