"""A step's first call changes the process (it imports libraries, fills caches, binds globals);
the next call with the same code and arguments must still be a hit, and so must every call in a
later process. Each process here is fresh, so nothing the test runner imported hides the bug."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from _session import session

from dreamer_magic.status import LOADED, RAN

ROOT = Path(__file__).resolve().parents[1]

_LOCAL_MODULES = {
    "localhelp.py": "def double(x):\n    return 2 * x\n",
    "memo.py": "_CACHE = {}\n\ndef clean(t):\n    if t not in _CACHE:\n        _CACHE[t] = t.strip()\n    return _CACHE[t]\n",
    "lazypkg/__init__.py": "",
    "lazypkg/sub.py": "def inc(x):\n    return x + 1\n",
}

_SCRIPT = """
import json, sys
import dreamer_magic
from dreamer_magic import step
import lazypkg, memo

offset = int(sys.argv[1])
calls = 0

@step("numpy-in-body")
def library(n):
    import numpy as np
    return int(np.arange(n).sum()) + offset

@step("local-in-body")
def local(n):
    import localhelp
    import lazypkg.sub
    return localhelp.double(n) + lazypkg.sub.inc(n) + len(lazypkg.__name__)

@step("own-state")
def counted(text):
    setup()
    return memo.clean(text) + upper("x")

@step("tally")
def tally(n):
    global calls
    calls += 1
    return n + calls

def setup():
    global upper
    upper = str.upper

@step("inner")
def inner(n):
    import statistics
    return statistics.mean([n, n + 2])

@step("outer")
def outer(n):
    return inner(n) + 1

states = []
tally(1)
status = dreamer_magic.last_status()
tallied = [tally(1), status.state, dreamer_magic.last_status().state, [str(r) for r in dreamer_magic.last_status().reasons]]
for fn, arg in [(library, 5), (local, 3), (counted, " a "), (outer, 4)]:
    for _ in range(2):
        fn(arg)
        status = dreamer_magic.last_status()
        states.append([status.name, status.state, [str(r) for r in status.reasons]])
print("@@" + json.dumps({"states": states, "tallied": tallied}))
"""


def _run(folder: Path, offset: int) -> list:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(folder)]), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_SCRIPT), str(offset)], capture_output=True, text=True, cwd=folder, env=env, timeout=120
    )
    assert out.returncode == 0, out.stderr[-3000:]
    found = json.loads(out.stdout.rpartition("@@")[2])
    return found["states"], found["tallied"]


def test_the_python_api_hits_after_a_first_call_that_changed_the_process(tmp_path):
    for rel, text in _LOCAL_MODULES.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    first, tallied = _run(tmp_path, 1)
    assert [s[1] for s in first] == [RAN, LOADED] * 4, first
    # a global the step reads before it changes it counts: the second call returns what a call gives now
    assert tallied[:3] == [3, RAN, RAN], tallied
    assert any("calls" in r for r in tallied[3]), tallied
    again, _ = _run(tmp_path, 1)
    assert [s[1] for s in again] == [LOADED] * 8, again

    (tmp_path / "lazypkg/sub.py").write_text("def inc(x):\n    return x + 10\n")
    changed, _ = _run(tmp_path, 2)  # `offset` changed, and the code of a module imported in a body
    library_runs = [s for s in changed if s[0] == "numpy-in-body"]
    assert [s[1] for s in library_runs] == [RAN, LOADED]
    assert library_runs[0][2] == ["function `library` changed: the global `offset` it uses changed"]
    local_runs = [s for s in changed if s[0] == "local-in-body"]
    assert [s[1] for s in local_runs] == [RAN, LOADED], "a local module imported in the body counts by its code"
    assert [s[1] for s in changed if s[0] in ("own-state", "outer")] == [LOADED] * 4


def test_cells_that_import_in_the_body_hit_in_the_shell_and_after_a_restart(tmp_path):
    (tmp_path / "cellhelp.py").write_text("def triple(x):\n    return 3 * x\n")
    cells = [
        "def h(n):\n    import colorsys, cellhelp\n    import numpy as np\n"
        "    return int(np.ones(n).sum()) + cellhelp.triple(n) + int(colorsys.rgb_to_hsv(0, 0, 1)[2])\n",
        "%%dreamer_step np-cell\nimport numpy as np\ntotal = h(3) + int(np.arange(3).sum())\n",
    ]
    first = session(tmp_path, cells + cells[1:], dump=["total"])
    assert first.states == [RAN, LOADED], first.statuses
    assert first.values["total"]["repr"] == "16"
    restarted = session(tmp_path, cells)
    assert restarted.states == [LOADED], restarted.statuses


def test_a_module_cache_filled_by_a_call_is_state_a_module_table_is_configuration(tmp_path, monkeypatch):
    import importlib

    from dreamer_magic.fingerprint import fingerprint

    (tmp_path / "tables_mod.py").write_text(
        "_SEEN = {}\nLABELS = dict(pos=1)\n\ndef label(t):\n    _SEEN[t] = True\n    return LABELS[t]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    module = importlib.import_module("tables_mod")
    try:
        def score(t):
            return module.label(t) + 1

        first = fingerprint(score)
        assert score("pos") == 2 and module._SEEN
        assert fingerprint(score) == first, "a cache the module starts empty and a call fills"
        (tmp_path / "tables_mod.py").write_text(
            "_SEEN = {}\nLABELS = dict(pos=5)\n\ndef label(t):\n    _SEEN[t] = True\n    return LABELS[t]\n"
        )
        importlib.reload(module)
        assert fingerprint(score) != first, "a table the module fills itself counts by content"
    finally:
        sys.modules.pop("tables_mod", None)


def test_a_namespace_package_counts_by_its_owner_before_and_after_the_import(tmp_path, monkeypatch):
    import importlib
    import site

    from test_fingerprint_code import _dist_info

    from dreamer_magic.fingerprint import distribution_version

    site_packages = tmp_path / "site-packages"
    for dist, sub, version in (("nsadist", "alpha", "1.0"), ("nsbdist", "beta", "2.0")):
        (site_packages / "sharedns" / sub).mkdir(parents=True)
        (site_packages / "sharedns" / sub / "__init__.py").write_text("X = 1\n")
        _dist_info(site_packages, dist, version, [f"sharedns/{sub}/__init__.py"], editable=False, top="sharedns")
    monkeypatch.setattr(sys, "path", list(sys.path))
    site.addsitedir(str(site_packages))
    importlib.invalidate_caches()
    try:
        before = distribution_version("sharedns.beta")
        importlib.import_module("sharedns.beta")
        assert before == distribution_version("sharedns.beta") == ("nsbdist", "2.0")
    finally:
        for name in ("sharedns", "sharedns.beta"):
            sys.modules.pop(name, None)
