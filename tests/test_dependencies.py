"""dependencies.py: what a body reads besides its inputs, traced, recorded and checked.

Real files under tmp_path, real modules written to disk and imported, fresh interpreters where
a restart is the point, the real global RNGs.
"""

from __future__ import annotations

import functools
import glob
import importlib
import json
import os
import random
import socket
import subprocess
import sys
import textwrap
import threading
import uuid
from pathlib import Path

import pytest

from dreamer_magic import dependencies as deps
from dreamer_magic.dependencies import check, restore_rng, rng_end_state, untracked_in_source
from dreamer_magic.dependencies import trace as _trace
from dreamer_magic.dependencies import user_modules_reached


# These tests watch functions run on every Python (the lifecycle does so on 3.12+ only); a
# partial, not a def, so that no function of this (user-code) file runs inside a trace.
trace = functools.partial(_trace, code=True)

ROOT = Path(__file__).resolve().parents[1]


def texts(recorded, cwd=None):
    return [c.text for c in check(recorded, cwd)]


def paths(recorded, key="files"):
    return [e["path"] for e in recorded[key]]


@pytest.fixture
def work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def bump_mtime(path: Path) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))


# --------------------------------------------------------------------------- files


def test_a_file_read_is_recorded_and_its_edit_is_a_change(work):
    (work / "data.csv").write_text("a,b\n1,2\n")
    with trace(output_folder=work / "output") as t:
        rows = open("data.csv").read().splitlines()
    recorded = t.record()
    assert rows == ["a,b", "1,2"]
    [entry] = recorded["files"]
    assert entry["path"] == "data.csv"
    assert entry["size"] == 8
    assert entry["mtime_ns"] == (work / "data.csv").stat().st_mtime_ns
    assert len(entry["digest"]) == 32
    assert json.loads(json.dumps(recorded)) == recorded
    assert check(recorded) == []

    (work / "data.csv").write_text("a,b\n1,3\n")  # same size, other content
    [change] = check(recorded)
    assert (change.kind, change.subject, change.text) == ("file", "data.csv", "file `data.csv` changed")


def test_touched_only_is_no_change_and_deleted_is(work):
    data = work / "data.csv"
    data.write_text("x\n")
    with trace() as t:
        data.read_bytes()
    recorded = t.record()
    bump_mtime(data)
    assert check(recorded) == []
    data.write_text("x\ny\n")  # another size: changed without reading
    assert texts(recorded) == ["file `data.csv` changed"]
    data.unlink()
    assert texts(recorded) == ["file `data.csv` was deleted"]


def test_every_way_of_opening_is_seen(work):
    np = pytest.importorskip("numpy")
    pd = pytest.importorskip("pandas")
    for name in ("a.txt", "b.txt", "c.bin"):
        (work / name).write_text(name)
    np.save(work / "arr.npy", np.arange(3))
    pd.DataFrame({"x": [1, 2]}).to_csv(work / "frame.csv", index=False)
    import io

    with trace() as t:
        with io.open("a.txt") as f:
            f.read()
        Path("b.txt").read_text()
        fd = os.open("c.bin", os.O_RDONLY)
        os.close(fd)
        np.load("arr.npy")
        pd.read_csv("frame.csv")
    assert sorted(paths(t.record())) == ["a.txt", "arr.npy", "b.txt", "c.bin", "frame.csv"]


def test_what_the_body_wrote_then_read_back_is_not_a_dependency(work):
    (work / "input.txt").write_text("in")
    (work / "output").mkdir()
    (work / "output" / "saved.txt").write_text("mine")
    with trace(output_folder=work / "output") as t:
        text = open("input.txt").read()
        Path("made.txt").write_text(text * 2)
        Path("made.txt").read_text()
        Path("tmp.part").write_text("z")
        os.replace("tmp.part", "renamed.txt")
        Path("renamed.txt").read_text()
        (work / "output" / "saved.txt").read_text()
    recorded = t.record()
    assert paths(recorded) == ["input.txt"]
    assert recorded["writes"] == ["made.txt", "renamed.txt"]  # left outside the output folder


def test_library_and_module_files_are_not_dependencies(work):
    json_module = sys.modules["json"].__file__
    modname = f"mod_{uuid.uuid4().hex[:8]}"
    (work / f"{modname}.py").write_text("VALUE = 1\n")
    sys.path.insert(0, str(work))
    try:
        with trace() as t:
            open(json_module).read()  # the standard library
            importlib.import_module(modname)  # importing reads its source and writes a .pyc
    finally:
        sys.path.remove(str(work))
        sys.modules.pop(modname, None)
    recorded = t.record()
    assert recorded["files"] == []
    assert recorded["folders"] == []  # the import system's listing of sys.path is not the body's


def test_a_file_read_outside_cwd_is_absolute(work, tmp_path_factory):
    other = tmp_path_factory.mktemp("elsewhere") / "far.txt"
    other.write_text("far")
    with trace() as t:
        other.read_text()
    assert paths(t.record()) == [str(other)]


def test_reads_in_another_thread_are_not_traced(work):
    (work / "mine.txt").write_text("1")
    (work / "theirs.txt").write_text("2")
    with trace() as t:
        worker = threading.Thread(target=lambda: Path("theirs.txt").read_text())
        worker.start()
        worker.join()
        Path("mine.txt").read_text()
    assert paths(t.record()) == ["mine.txt"]


# --------------------------------------------------------------------------- folders


def test_a_folder_listing_is_a_dependency(work):
    data = work / "data"
    data.mkdir()
    (data / "a.csv").write_text("1")
    (data / "b.csv").write_text("2")
    with trace() as t:
        names = sorted(os.listdir("data"))
    recorded = t.record()
    assert names == ["a.csv", "b.csv"]
    assert recorded["files"] == []
    [folder] = recorded["folders"]
    assert (folder["path"], folder["entries"]) == ("data", 2)
    bump_mtime(data / "a.csv")
    assert check(recorded) == []  # touched only
    (data / "c.csv").write_text("3")
    [change] = check(recorded)
    assert (change.kind, change.text) == ("folder", "folder `data/` changed (2 → 3 entries)")
    (data / "c.csv").unlink()
    (data / "b.csv").write_text("22")
    assert texts(recorded) == ["folder `data/` changed (an entry was renamed, replaced or resized)"]


def test_glob_and_pathlib_listings_are_seen(work):
    (work / "data").mkdir()
    (work / "more").mkdir()
    (work / "data" / "a.csv").write_text("1")
    with trace() as t:
        glob.glob("data/*.csv")
        list(Path("more").iterdir())
    assert sorted(paths(t.record(), "folders")) == ["data", "more"]


def test_declared_files_and_folders(work):
    (work / "native.bin").write_text("read by C code")
    tree = work / "shards"
    (tree / "deep").mkdir(parents=True)
    (tree / "deep" / "0.arrow").write_text("0")
    with trace() as t:
        pass
    recorded = t.record(declared_files=["native.bin", "shards/", "later.csv"])
    assert sorted(paths(recorded)) == ["later.csv", "native.bin", "shards/deep/0.arrow"]
    assert all(e["declared"] for e in recorded["files"])
    assert [(f["path"], f["recursive"]) for f in recorded["folders"]] == [("shards", True)]
    assert check(recorded) == []
    (tree / "deep" / "1.arrow").write_text("1")
    assert texts(recorded) == ["folder `shards/` changed (2 → 3 entries)"]
    (tree / "deep" / "1.arrow").unlink()
    (work / "later.csv").write_text("now here")
    assert texts(recorded) == ["file `later.csv` now exists"]


def test_check_is_relative_to_the_given_cwd(work, tmp_path_factory):
    (work / "data.csv").write_text("1")
    with trace(cwd=work) as t:
        open("data.csv").read()
    recorded = t.record()
    elsewhere = tmp_path_factory.mktemp("moved")
    (elsewhere / "data.csv").write_text("2")
    assert texts(recorded, cwd=elsewhere) == ["file `data.csv` changed"]
    assert check(recorded, cwd=work) == []


# --------------------------------------------------------------------------- user code

HELPERS = '''
import functools

THRESHOLD = 0.5
WORDS = ["a", "the"]


def clean(values):
    return [v for v in values if v > THRESHOLD]


def unused():
    return "never called"


def outer():
    def inner(x):
        return x * 2
    return inner(3)


def logged(fn):
    @functools.wraps(fn)
    def wrapper(*a, **k):
        return fn(*a, **k)
    return wrapper


@logged
def decorated(x):
    return x + 1


class Model:
    scale = 2

    def __init__(self, k):
        self.k = k

    def __call__(self, x):
        return x * self.k

    @property
    def double(self):
        return self.k * 2

    @staticmethod
    def helper():
        return "static"


HANDLERS = {"twice": lambda x: 2 * x}


def _hidden(x):
    return x - 1


def make_hidden(found=_hidden):  # reachable only through a default argument
    return found


del _hidden
'''


@pytest.fixture
def helpers(work, monkeypatch):
    """A user module beside the notebook, imported, under a name unique to the test."""
    name = f"helpers_{uuid.uuid4().hex[:8]}"
    path = work / f"{name}.py"
    path.write_text(HELPERS)
    monkeypatch.syspath_prepend(str(work))
    module = importlib.import_module(name)
    yield module
    sys.modules.pop(name, None)


def edit(module, old, new):
    path = Path(module.__file__)
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))
    bump_mtime(path)
    # a fresh import must not reuse a .pyc that has the old code (same second, same size)
    for pyc in (path.parent / "__pycache__").glob(f"{path.stem}.*.pyc"):
        pyc.unlink()


def functions(recorded):
    return sorted(f["qualname"] for entry in recorded["code"] for f in entry["functions"])


def check_in_fresh_python(recorded, cwd, imports=()):
    """check() in a new interpreter: the module is not imported (a restarted kernel)."""
    code = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {str(cwd)!r})
        for name in {list(imports)!r}:
            __import__(name)
        from dreamer_magic.dependencies import check
        print(json.dumps([c.text for c in check(json.loads(sys.stdin.read()), {str(cwd)!r})]))
    """)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-c", code], input=json.dumps(recorded), capture_output=True,
                            text=True, cwd=cwd, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_functions_that_ran_are_recorded_and_those_not_called_are_not(helpers):
    with trace() as t:
        helpers.clean([0.1, 0.9])
        helpers.outer()
        m = helpers.Model(3)
        m(2), m.double, helpers.Model.helper(), helpers.decorated(1)
    recorded = t.record()
    [entry] = recorded["code"]
    assert entry["module"] == helpers.__name__
    assert entry["file"] == f"{helpers.__name__}.py"
    # outer.<locals>.inner is covered by outer's digest; wrapper by logged's code it came from
    assert functions(recorded) == sorted([
        "clean", "outer", "Model.__init__", "Model.__call__", "Model.double", "Model.helper",
        "decorated", "logged.<locals>.wrapper",
    ])
    assert "unused" not in functions(recorded)
    assert entry["globals"] == {"THRESHOLD": deps._literal_digest(0.5)}
    assert check(recorded) == []
    assert check_in_fresh_python(recorded, Path.cwd()) == []


def test_functions_kept_in_a_registry_or_only_by_reference(helpers):
    hidden = helpers.make_hidden()
    with trace() as t:
        helpers.HANDLERS["twice"](2)
        hidden(1)
    recorded = t.record()
    assert functions(recorded) == ["<lambda>", "_hidden"]
    assert check(recorded) == []
    assert check_in_fresh_python(recorded, Path.cwd()) == []
    name = helpers.__name__
    edit(helpers, "return x - 1", "return x - 2")
    assert check_in_fresh_python(recorded, Path.cwd()) == [f"function `{name}._hidden` changed ({name}.py)"]


def test_an_edit_without_reload_is_no_change_until_the_module_reloads(helpers):
    with trace() as t:
        helpers.clean([0.9])
    recorded = t.record()
    edit(helpers, "v > THRESHOLD", "v >= THRESHOLD")
    assert check(recorded) == []  # the code that runs in this process is still the old one
    name = helpers.__name__
    assert check_in_fresh_python(recorded, Path.cwd()) == [f"function `{name}.clean` changed ({name}.py)"]
    importlib.reload(helpers)
    assert texts(recorded) == [f"function `{name}.clean` changed ({name}.py)"]


def test_a_fresh_kernel_that_imports_the_module_first_sees_the_edit(helpers):
    with trace() as t:
        helpers.Model(2)(3)
    recorded = t.record()
    name = helpers.__name__
    edit(helpers, "return x * self.k", "return x * self.k + 1")
    assert check_in_fresh_python(recorded, Path.cwd(), imports=[name]) == [
        f"function `{name}.Model.__call__` changed ({name}.py)"
    ]


def test_an_edit_of_a_function_that_did_not_run_is_no_change(helpers):
    with trace() as t:
        helpers.clean([1])
    recorded = t.record()
    edit(helpers, '"never called"', '"still never called"')
    assert check_in_fresh_python(recorded, Path.cwd()) == []


def test_a_removed_function_and_a_changed_constant(helpers):
    with trace() as t:
        helpers.clean([1])
        helpers.outer()
    recorded = t.record()
    name = helpers.__name__
    edit(helpers, "THRESHOLD = 0.5", "THRESHOLD = 0.7")
    assert check_in_fresh_python(recorded, Path.cwd()) == [f"`{name}.THRESHOLD` changed ({name}.py)"]
    edit(helpers, "def outer():", "def renamed_outer():")
    assert check_in_fresh_python(recorded, Path.cwd()) == [
        f"function `{name}.outer` no longer exists ({name}.py)",
        f"`{name}.THRESHOLD` changed ({name}.py)",
    ]
    helpers.THRESHOLD = 0.9  # the loaded module's value is what the loaded code reads
    assert texts(recorded) == [f"`{name}.THRESHOLD` changed ({name}.py)"]


def test_a_deleted_module_file_is_a_change(helpers):
    with trace() as t:
        helpers.clean([1])
    recorded = t.record()
    Path(helpers.__file__).unlink()
    name = helpers.__name__
    assert check_in_fresh_python(recorded, Path.cwd()) == [
        f"function `{name}.clean` changed ({name}.py was deleted)"
    ]


def test_a_module_imported_by_the_body_counts_by_its_code(work, monkeypatch):
    name = f"fresh_{uuid.uuid4().hex[:8]}"
    (work / f"{name}.py").write_text("def go():\n    return 1\n")
    monkeypatch.syspath_prepend(str(work))
    try:
        with trace() as t:
            importlib.import_module(name).go()
        recorded = t.record()
    finally:
        sys.modules.pop(name, None)
    assert functions(recorded) == ["go"]
    assert recorded["files"] == [] and recorded["folders"] == []
    assert check_in_fresh_python(recorded, work) == []


def test_code_under_another_python_is_checked_by_its_source(helpers):
    with trace() as t:
        helpers.clean([1])
        helpers.Model(1).double
    recorded = t.record()
    assert all("source" in f for f in recorded["code"][0]["functions"])
    upgraded = json.loads(json.dumps(recorded))
    upgraded["python"] = "2.7"  # recorded by another interpreter: bytecode is not comparable
    assert check(upgraded) == []
    edit(helpers, "def double(self):\n        return self.k * 2", "def double(self):\n        return self.k * 3")
    name = helpers.__name__
    assert texts(upgraded) == [f"function `{name}.Model.double` changed ({name}.py)"]


def test_libraries_whose_code_ran_count_by_version(work):
    np = pytest.importorskip("numpy")
    import importlib.metadata as md

    with trace() as t:
        np.linspace(0, 1, 5)  # Python code in numpy/_core/function_base.py
    recorded = t.record()
    assert recorded["libraries"].get("numpy") == md.version("numpy")
    assert recorded["code"] == []
    older = json.loads(json.dumps(recorded))
    older["libraries"]["numpy"] = "1.0.0"
    assert [c.text for c in check(older) if c.kind == "library"] == [
        f"library `numpy` changed: 1.0.0 → {md.version('numpy')}"
    ]
    older["libraries"] = {"no-such-distribution-xyz": "1.0"}
    assert texts(older) == ["library `no-such-distribution-xyz` is no longer installed (was 1.0)"]


def test_notebook_cells_are_not_user_code_but_what_they_call_is(shell, helpers):
    shell.user_ns["helpers"] = helpers
    shell.run_cell("def from_a_cell(values):\n    return helpers.clean(values)\n", store_history=False)
    Path("cell.txt").write_text("1")
    with trace(output_folder=Path.cwd() / "output") as t:
        result = shell.run_cell("kept = from_a_cell([0.2, 0.7]); open('cell.txt').read()", store_history=False)
    result.raise_error()
    recorded = t.record()
    assert shell.user_ns["kept"] == [0.7]
    assert functions(recorded) == ["clean"]  # from_a_cell is the cell fingerprint's business
    assert paths(recorded) == ["cell.txt"]
    assert not {"ipython", "traitlets"} & set(recorded["libraries"])  # the notebook's machinery


# --------------------------------------------------------------------------- RNG


def test_no_draw_records_no_rng(work):
    with trace() as t:
        sum(range(10))
    assert t.record()["rng"] == {}


def test_python_random_draw_depends_on_the_start_state(work):
    start = random.getstate()
    with trace() as t:
        random.random()
    recorded = t.record()
    assert set(recorded["rng"]) == {"random"}
    assert recorded["rng"]["random"]["start"] == deps._state_digest(start)
    assert texts(recorded) == ["the global RNG state of `random` differs from the saved run"]
    random.setstate(start)
    assert check(recorded) == []


def test_seeding_before_drawing_frees_the_start_state(work):
    with trace() as t:
        random.seed(0)
        random.random()
    assert t.record()["rng"] == {"random": {"start": None}}
    with trace() as t:
        random.random()  # drawn before seeding: the start state mattered
        random.seed(0)
    assert t.record()["rng"]["random"]["start"] is not None
    assert random.seed.__name__ == "seed" and not hasattr(random.seed, "__wrapped__")  # unpatched


def test_numpy_draw_and_seed(work):
    np = pytest.importorskip("numpy")
    start = np.random.get_state()
    with trace() as t:
        np.random.rand()
    recorded = t.record()
    assert set(recorded["rng"]) == {"np.random"} and recorded["rng"]["np.random"]["start"]
    assert texts(recorded) == ["the global RNG state of `np.random` differs from the saved run"]
    np.random.set_state(start)
    assert check(recorded) == []
    with trace() as t:
        np.random.seed(1)
        np.random.rand()
    assert t.record()["rng"] == {"np.random": {"start": None}}


def test_torch_draw(work):
    torch = pytest.importorskip("torch")
    with trace() as t:
        torch.rand(2)
    recorded = t.record()
    assert set(recorded["rng"]) == {"torch"} and recorded["rng"]["torch"]["start"]
    assert texts(recorded) == ["the global RNG state of `torch` differs from the saved run"]
    with trace() as t:
        torch.manual_seed(3)
        torch.rand(2)
    assert t.record()["rng"] == {"torch": {"start": None}}


def test_restore_rng_reproduces_the_next_draw(work):
    np = pytest.importorskip("numpy")
    torch = pytest.importorskip("torch")
    with trace() as t:
        random.random(), np.random.rand(), torch.rand(1)
    recorded = t.record()
    saved = json.loads(json.dumps(rng_end_state(recorded["rng"])))  # as stored in step.json
    assert set(saved) == {"random", "np.random", "torch"}
    expected = (random.random(), np.random.rand(), torch.rand(3).tolist(), random.gauss(0, 1))
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    restore_rng(saved)
    assert (random.random(), np.random.rand(), torch.rand(3).tolist(), random.gauss(0, 1)) == expected


def test_rng_end_state_keeps_only_the_named_generators(work):
    assert set(rng_end_state(["random"])) == {"random"}
    assert rng_end_state([]) == {}


# --------------------------------------------------------------------------- untracked


def test_network_and_subprocesses_are_named(work):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    try:
        with trace() as t:
            socket.getaddrinfo("localhost", port)
            with socket.create_connection(("127.0.0.1", port)):
                pass
            subprocess.run([sys.executable, "-c", "pass"], check=True)
            os.system("true")
    finally:
        server.close()
    untracked = t.record()["untracked"]
    assert untracked[0].startswith("uses the network (`localhost:")
    assert untracked[0].endswith(": not tracked")
    assert untracked[1] == f"runs `{sys.executable} -c pass`, `true`: not tracked"


def test_nothing_untracked_when_nothing_happens(work):
    with trace() as t:
        pass
    assert t.record(source="x = 1")["untracked"] == []


def test_environment_variables_in_the_cell_source():
    source = textwrap.dedent("""
        import os
        from os import environ, getenv
        token = os.environ["HF_TOKEN"]
        level = os.getenv("LEVEL", "1")
        mode = os.environ.get("MODE")
        debug = "DEBUG" in os.environ
        home = environ["HOME"]
        user = getenv("USER")
        os.environ["WRITTEN_ONLY"] = "1"
        key = "X" + "Y"
        dynamic = os.environ[key]
    """)
    assert untracked_in_source(source) == [
        "reads environment variable `HF_TOKEN`: not tracked",
        "reads environment variable `LEVEL`: not tracked",
        "reads environment variable `MODE`: not tracked",
        "reads environment variable `DEBUG`: not tracked",
        "reads environment variable `HOME`: not tracked",
        "reads environment variable `USER`: not tracked",
        "reads an environment variable named at run time: not tracked",
    ]
    assert untracked_in_source("config = dict(os.environ)") == [
        "reads the environment (`os.environ`): not tracked"
    ]
    assert untracked_in_source("os.environ['A'] = '1'\ndel os.environ['B']") == []
    assert untracked_in_source("x = (") == []  # not Python: nothing to say
    with trace() as t:
        pass
    assert t.record(source="os.getenv('K')")["untracked"] == ["reads environment variable `K`: not tracked"]


# --------------------------------------------------------------------------- nesting


def test_nested_traces_both_see_the_inner_reads(helpers):
    for name in ("outer.txt", "inner.txt"):
        Path(name).write_text(name)
    with trace() as outer:
        Path("outer.txt").read_text()
        with trace() as inner:
            Path("inner.txt").read_text()
            helpers.clean([1])
            random.random()
        inner_recorded = inner.record()
        helpers.outer()
    outer_recorded = outer.record()
    assert paths(inner_recorded) == ["inner.txt"]
    assert paths(outer_recorded) == ["outer.txt", "inner.txt"]
    assert functions(inner_recorded) == ["clean"]
    assert functions(outer_recorded) == ["clean", "outer"]
    assert set(inner_recorded["rng"]) == set(outer_recorded["rng"]) == {"random"}
    # the inner record's own reads (digests, module sources) are not the outer body's
    assert paths(outer_recorded) == ["outer.txt", "inner.txt"]


def test_after_a_trace_the_hook_records_nothing(work):
    Path("a.txt").write_text("a")
    with trace() as first:
        pass
    Path("a.txt").read_text()
    with trace() as second:
        pass
    assert first.record()["files"] == second.record()["files"] == []


def test_a_trace_runs_once_and_records_after_it_ends(work):
    t = trace()
    with pytest.raises(RuntimeError):
        t.record()
    with t:
        pass
    with pytest.raises(RuntimeError):
        with t:
            pass


def test_check_of_nothing():
    assert check(None) == [] and check({}) == []


def test_a_profiler_started_by_the_body_is_named_or_harmless(helpers):
    import cProfile

    with trace() as t:
        profiler = cProfile.Profile()
        profiler.enable()
        helpers.clean([1])
        profiler.disable()
        helpers.outer()
    recorded = t.record()
    if sys.version_info >= (3, 12):  # sys.monitoring: one tool per profiler, ours keeps seeing
        assert functions(recorded) == ["clean", "outer"]
        assert recorded["untracked"] == []
    else:  # one profile hook per thread: the body took it, so the trace says it saw only part
        assert recorded["untracked"] == [
            "functions outside the notebook: partly tracked (the body replaced the trace's profile hook)"
        ]


def test_static_record_covers_every_function_of_the_modules_a_cell_reaches(tmp_path, monkeypatch):
    """Where functions are not watched (Python < 3.12), the modules the cell imports and the
    user modules their globals reach count whole: an edit to any of their functions is a change."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    tag = uuid.uuid4().hex[:8]
    (tmp_path / f"inner_{tag}.py").write_text("def g(x):\n    return x * 2\n")
    (tmp_path / f"outer_{tag}.py").write_text(f"import inner_{tag} as inner\ndef f(x):\n    return inner.g(x)\ndef unused():\n    return 1\n")
    outer = importlib.import_module(f"outer_{tag}")
    reached = user_modules_reached([], imported=[f"outer_{tag}"])
    assert reached == sorted([f"inner_{tag}", f"outer_{tag}"])
    assert user_modules_reached([outer.f]) == reached
    assert user_modules_reached([json.dumps], imported=["json"]) == [], "the standard library is no user code"
    with _trace(code=False) as t:
        outer.f(1)
    recorded = t.record(modules=reached)
    functions = {(e["module"], f["qualname"]) for e in recorded["code"] for f in e["functions"]}
    assert {(f"outer_{tag}", "f"), (f"outer_{tag}", "unused"), (f"inner_{tag}", "g")} <= functions
    assert check(recorded) == []
    (tmp_path / f"inner_{tag}.py").write_text("def g(x):\n    return x * 3\n")
    for name in reached:
        sys.modules.pop(name, None)
    changes = check(recorded)
    assert changes and changes[0].kind == "module" and "g" in changes[0].text
