"""Every prefix of every step operation is recoverable: a SIGKILL before each file-system call.

``_crash_points.py`` (one warmed process, a forked child per crash point) kills first run,
changed run, ``--force``, restore from backup and ``%dreamer gc`` before each of their
file-system calls in turn, and checks after each kill and after the next run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

HERE = Path(__file__).parent


@pytest.mark.skipif(not hasattr(os, "fork"), reason="crash points fork a warmed process")
def test_a_kill_before_any_file_system_call_loses_nothing_and_the_next_run_cleans_up(tmp_path):
    done = subprocess.run(
        [sys.executable, str(HERE / "_crash_points.py"), str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    points = [json.loads(line[len("POINT "):]) for line in done.stdout.splitlines() if line.startswith("POINT ")]
    per_op = Counter(p["op"] for p in points)
    # each operation was killed at every one of its calls (renames, deletes, writes)
    assert set(per_op) == {"first run", "changed run", "--force", "restore", "gc"}
    assert all(per_op[p["op"]] == p["ops"] for p in points)
    assert min(per_op.values()) >= 4, per_op
    failures = [f"{p['op']} killed before call {p['k']}/{p['ops']}: {'; '.join(p['problems'])}" for p in points if p["problems"]]
    assert failures == [], "\n".join(failures)
