"""What a cell reads and binds (dreamer_magic.cell.analyze), and %%dreamer_step cells that use it.

Most tests are pure: ``analyze`` on code as IPython's ``transform_cell`` leaves it. The flow tests
also *run* each cell with the names it does not read set to different values (or missing), and check
that a hit made from one run gives the namespace the other run leaves: the rule a step must keep.
"""

from __future__ import annotations

import ast
import builtins
import contextlib
import itertools

import pytest

from dreamer_magic.cell import analyze
from dreamer_magic.errors import DreamerError

from conftest import fresh_kernel


def line_magic(name: str, line: str) -> str:
    return f"get_ipython().run_line_magic({name!r}, {line!r})"


def cell_magic(name: str, line: str, body: str) -> str:
    return f"get_ipython().run_cell_magic({name!r}, {line!r}, {body!r})"


# -- 1. names bound only on some paths stay reads -------------------------------------------

MAYBE_BOUND = [
    # (cell, name read after a binding that may not have happened)
    ("if flag:\n    x = 1\nprint(x)", "x"),
    ("if flag:\n    pass\nelse:\n    x = 1\nprint(x)", "x"),
    ("if flag:\n    x = 1\nelif other:\n    x = 2\nprint(x)", "x"),
    ("if flag:\n    if other:\n        x = 1\n    else:\n        x = 2\nprint(x)", "x"),
    ("for v in data:\n    last = v\nprint(last)", "last"),
    ("for v in data:\n    pass\nprint(v)", "v"),
    ("for v in data:\n    if v:\n        found = v\n        break\nprint(found)", "found"),
    ("for v in data:\n    if v:\n        continue\n    seen = v\nprint(seen)", "seen"),
    ("for v in data:\n    for w in v:\n        inner = w\nprint(inner)", "inner"),
    ("while n:\n    y = 1\n    n -= 1\nprint(y)", "y"),
    ("while n > 0:\n    n -= 1\nelse:\n    pass\nprint(z) if n else None\nz = 1", "z"),
    ("try:\n    a = f()\nexcept ValueError:\n    pass\nprint(a)", "a"),
    ("try:\n    a = f()\n    b = g()\nexcept Exception:\n    a = 0\nprint(b)", "b"),
    ("try:\n    pass\nexcept Exception:\n    c = 1\nprint(c)", "c"),
    ("with suppress(KeyError):\n    t = d['k']\nprint(t)", "t"),
    ("with lock:\n    t = 1\nprint(t)", "t"),
    ("with a() as p, b() as q:\n    t = p + q\nprint(t)", "t"),
    ("match cmd:\n    case 1:\n        r = 'one'\nprint(r)", "r"),
    ("match cmd:\n    case [k, *_]:\n        r = k\n    case {'k': k}:\n        r = k\nprint(k)", "k"),
    ("match cmd:\n    case 1:\n        r = 1\n    case n if n > 2:\n        r = 2\nprint(r)", "r"),
    ("v = (w := 1) if flag else 0\nprint(w)", "w"),
    ("v = 0 if flag else (w := 1)\nprint(w)", "w"),
    ("ok = flag and (w := f())\nprint(w)", "w"),
    ("ok = flag or (w := f())\nprint(w)", "w"),
    ("ys = [y := v for v in data]\nprint(y)", "y"),
    ("ys = {v: (y := v) for v in data}\nprint(y)", "y"),
    ("ys = [v for v in data if (y := v)]\nprint(y)", "y"),
    ("n = sum(1 for v in data if (y := v))\nprint(y)", "y"),
    ("x = x if flag else 0", "x"),
    ("x = x + 1", "x"),
    ("x += 1", "x"),
    ("if flag:\n    del x\nprint(x)", "x"),
    ("x = 1\nfor v in data:\n    print(x)\n    del x", "x"),
    ("for v in data:\n    if v:\n        print(w)\n    w = v", "w"),
    ("if flag:\n    import json\nprint(json)", "json"),
    ("if flag:\n    def helper():\n        return 1\nhelper()", "helper"),
]


@pytest.mark.parametrize("cell, name", MAYBE_BOUND, ids=[c for c, _ in MAYBE_BOUND])
def test_a_name_bound_on_some_paths_only_is_still_read(cell, name):
    info = analyze(cell)
    assert name in info.reads
    if "del" not in cell:  # bound on some path: saved when it exists after the run
        assert name in info.outputs


DEFINITELY_BOUND = [
    ("if flag:\n    x = 1\nelse:\n    x = 2\nprint(x)", "x"),
    ("if flag:\n    x = 1\nelif other:\n    x = 2\nelse:\n    x = 3\nprint(x)", "x"),
    ("if flag:\n    raise ValueError\nelse:\n    x = 1\nprint(x)", "x"),
    ("if not flag:\n    raise SystemExit\nx = 1\nprint(x)", "x"),
    ("for v in [1, 2, 3]:\n    last = v\nprint(last, v)", "last"),
    ("for v in range(3):\n    last = v\nprint(last, v)", "last"),
    ("for c in 'abc':\n    last = c\nprint(last)", "last"),
    ("for v in data:\n    if v:\n        u = 1\n        break\nelse:\n    u = 2\nprint(u)", "u"),
    ("while True:\n    z = f()\n    if z:\n        break\nprint(z)", "z"),
    ("while (line := f()):\n    pass\nprint(line)", "line"),
    ("try:\n    a = f()\nexcept ValueError:\n    a = None\nprint(a)", "a"),
    ("try:\n    a = f()\nexcept ValueError:\n    raise\nprint(a)", "a"),
    ("try:\n    import ujson as json\nexcept ImportError:\n    import json\nprint(json)", "json"),
    ("try:\n    a = f()\nfinally:\n    print('done')\nprint(a)", "a"),
    ("try:\n    pass\nexcept Exception:\n    pass\nelse:\n    a = 1\nfinally:\n    a = 2\nprint(a)", "a"),
    ("with open(p) as fh:\n    text = fh.read()\nprint(text)", "text"),
    ("with torch.no_grad():\n    out = model(x)\nprint(out)", "out"),
    ("with np.errstate(all='ignore'):\n    r = a / b\nprint(r)", "r"),
    ("match cmd:\n    case 1:\n        r = 1\n    case _:\n        r = 0\nprint(r)", "r"),
    ("match cmd:\n    case 1:\n        r = 1\n    case other:\n        r = other\nprint(r)", "r"),
    ("v = (w := 1) if flag else (w := 2)\nprint(w)", "w"),
    ("ok = (w := f()) or flag\nprint(w)", "w"),
    ("ys = [(w := 1)] + [v for v in data]\nprint(w)", "w"),
    ("x = 1\nif flag:\n    x = 2\nprint(x)", "x"),
    ("x = 1\nfor v in data:\n    x = v\nprint(x)", "x"),
    ("x = 0\ndel x\nx = 1\nprint(x)", "x"),
]


@pytest.mark.parametrize("cell, name", DEFINITELY_BOUND, ids=[c for c, _ in DEFINITELY_BOUND])
def test_a_name_bound_on_every_path_is_not_read(cell, name):
    info = analyze(cell)
    assert name not in info.reads
    assert name in info.outputs and name not in info.maybe_bound


def test_conditionally_bound_names_are_outputs_in_first_bind_order():
    info = analyze("for v in data:\n    if v > 1:\n        big = v\n    small = -v\n[w := v for v in data]")
    assert info.outputs == ["v", "big", "small", "w"]


def test_reads_come_in_first_read_order():
    info = analyze("total = base + offset\nif flag:\n    extra = 1\nresult = total * scale + extra")
    assert info.reads == ["base", "offset", "flag", "scale", "extra"]


# The oracle: a name the analysis does not read cannot change what the cell leaves behind. Each
# cell runs with every name it mentions set to one value, another value, or left out; a hit made
# from one run must leave exactly the namespace a plain run from the other leaves. The lifecycle
# simulated here is the contract the analysis serves: inputs are the reads that exist; a
# maybe-bound output the cell does not read is taken out for the run, put back if the run did not
# bind it, and saved only if it did; names the run deleted are deleted on a hit.

FLOW_CELLS = [
    ("if flag:\n    x = 10\ntotal = x + 1", {"flag": [True, False]}),
    ("if flag:\n    x = 10\nelse:\n    x = 20\ntotal = x + 1", {"flag": [True, False]}),
    ("if flag:\n    x = 10", {"flag": [True, False]}),
    ("for v in data:\n    last = v\nout = last", {"data": [[], [1, 2]]}),
    ("for v in data:\n    last = v", {"data": [[], [1, 2]]}),
    (
        "for v in data:\n    if v > 1:\n        hit = v\n        break\nelse:\n    hit = -1\nout = hit",
        {"data": [[], [1, 2], [0]]},
    ),
    ("n = len(data)\nwhile n:\n    n -= 1\n    y = n\nout = y", {"data": [[], [1, 2]]}),
    (
        "it = iter(data)\nwhile (item := next(it, None)) is not None:\n    acc = item\nout = (item, acc)",
        {"data": [[], [1]]},
    ),
    ("try:\n    a = data[0]\nexcept IndexError:\n    pass\nout = a", {"data": [[], [1]]}),
    ("try:\n    a = data[0]\nexcept IndexError:\n    a = None\nout = a", {"data": [[], [1]]}),
    ("try:\n    a = data[0]\nexcept IndexError as e:\n    msg = str(e)\nout = msg", {"data": [[], [1]]}),
    ("with suppress(IndexError):\n    a = data[0]\nout = a", {"data": [[], [1]], "suppress": [contextlib.suppress]}),
    ("with suppress(IndexError):\n    a = data[0]", {"data": [[], [1]], "suppress": [contextlib.suppress]}),
    ("match data:\n    case [first, *_]:\n        r = first\n    case []:\n        pass\nout = r", {"data": [[], [1]]}),
    ("squares = [y := v * v for v in data]\nout = y", {"data": [[], [2, 3]]}),
    ("squares = [y := v * v for v in data]", {"data": [[], [2, 3]]}),
    ("pairs = {v: (w := v) for v in data if v}\nout = w", {"data": [[], [0], [2]]}),
    ("ok = flag and (w := 5)\nout = w", {"flag": [True, False]}),
    ("out = (w := 5) if flag else w", {"flag": [True, False]}),
    ("if flag:\n    del x\nout = 1", {"flag": [True, False]}),
    ("x = 1\nif flag:\n    del x\nout = 2", {"flag": [True, False]}),
    ("def get():\n    return x\nif flag:\n    x = 3\nout = get()", {"flag": [True, False]}),
    (
        "class Box:\n    size = width * 2\n    if flag:\n        tag = 'on'\nout = Box.size",
        {"flag": [True, False], "width": [1]},
    ),
    ("total = 0\nfor v in data:\n    total += v\n    tmp = v\ndel total\nout = 1", {"data": [[], [1]]}),
    ("keep = [v for v in data if v]\nout = len(keep)", {"data": [[], [0, 1]]}),
    ("f = lambda k: k + x\nx = 1\nout = f(1)", {}),
    ("def bump():\n    global counter\n    counter = 7\nif flag:\n    bump()\nout = 1", {"flag": [True, False]}),
]

_BUILTINS = set(dir(builtins))
_FAILED = object()


def _run(cell: str, ns: dict):
    ns = dict(ns, __builtins__=builtins)
    try:
        exec(compile(cell, "<cell>", "exec"), ns)
    except Exception:  # noqa: BLE001 - a failed run saves nothing
        return _FAILED
    ns.pop("__builtins__")
    return ns


def _lifecycle_run(cell: str, ns: dict, info):
    """Run as the lifecycle does: (namespace after, what is saved, names to delete on a hit)."""
    stash = {n: ns[n] for n in info.maybe_bound if n not in info.reads and n in ns}
    after = _run(cell, {k: v for k, v in ns.items() if k not in stash})
    if after is _FAILED:
        return _FAILED
    saved = {n: after[n] for n in info.outputs + info.rebind_names if n in after}
    gone = [n for n in info.deleted + info.maybe_deleted if n not in after]
    return {**stash, **after}, saved, gone


def _hit(ns: dict, saved: dict, gone: list) -> dict:
    ns = {k: v for k, v in ns.items() if k not in gone}
    ns.update(saved)
    return ns


def _comparable(ns: dict) -> dict:
    out = {}
    for k, v in ns.items():
        if isinstance(v, type):
            v = ("class", v.__name__, sorted(k2 for k2 in vars(v) if not k2.startswith("__")))
        elif callable(v) and hasattr(v, "__code__"):
            v = ("function", v.__code__.co_code)
        elif type(v).__eq__ is object.__eq__:  # iterators and the like: compare what they are
            v = ("object", type(v).__name__)
        out[k] = v
    return out


def _check_hits(cell: str, controls: dict, info) -> int:
    names = sorted({n.id for n in ast.walk(ast.parse(cell)) if isinstance(n, ast.Name)} - _BUILTINS - set(controls))
    absent = object()
    checked = 0
    for combo in itertools.product(*controls.values()):
        base = dict(zip(controls, combo))
        for name in names:
            if name in info.reads:
                continue  # the fingerprint differs: a miss
            for a, b in [(absent, 2000), (1000, 2000), (1000, absent)]:
                ns_a = dict(base, **({} if a is absent else {name: a}))
                ns_b = dict(base, **({} if b is absent else {name: b}))
                run_a, plain_a = _lifecycle_run(cell, ns_a, info), _run(cell, ns_a)
                assert (run_a is _FAILED) == (plain_a is _FAILED), "the lifecycle's run is a plain run"
                if run_a is _FAILED:
                    continue  # nothing is saved from a failed run
                assert _comparable(run_a[0]) == _comparable(plain_a), "the lifecycle's run is a plain run"
                plain_b = _run(cell, ns_b)
                assert plain_b is not _FAILED, f"{name} is not read, but the run fails when it is {b!r}"
                hit_b = _hit(ns_b, *run_a[1:])
                assert _comparable(hit_b) == _comparable(plain_b), (name, a, b, base)
                checked += 1
    return checked


@pytest.mark.parametrize("cell, controls", FLOW_CELLS, ids=[c for c, _ in FLOW_CELLS])
def test_a_name_the_analysis_does_not_read_cannot_change_the_result(cell, controls):
    assert _check_hits(cell, controls, analyze(cell)) > 0


def test_the_oracle_catches_a_missing_read():
    """Without definite assignment (``x`` taken as bound because some path binds it) the oracle fails."""
    cell, controls = FLOW_CELLS[0]
    info = analyze(cell)
    info.reads.remove("x")
    with pytest.raises(AssertionError):
        _check_hits(cell, controls, info)


def test_the_oracle_catches_saving_a_value_the_run_did_not_bind():
    """A loop that did not run leaves ``last`` as it was: saving that old value makes a stale hit."""
    cell, controls = "for v in data:\n    last = v", {"data": [[]]}
    info = analyze(cell)
    assert info.maybe_bound == ["v", "last"] and "last" not in info.reads
    info.maybe_bound.clear()
    with pytest.raises(AssertionError):
        _check_hits(cell, controls, info)


# -- 2. walrus targets bind at the top level ------------------------------------------------


@pytest.mark.parametrize(
    "cell, names",
    [
        ("ys = [y := f(v) for v in data]", ["y", "ys"]),
        ("[y := f(v) for v in data]", ["y"]),
        ("{(k := v): v for v in data}", ["k"]),
        ("{(s := v) for v in data}", ["s"]),
        ("total = sum((t := v) for v in data)", ["t", "total"]),
        ("ys = [[z := w for w in v] for v in data]", ["z", "ys"]),
        ("if (n := len(data)) > 3:\n    pass", ["n"]),
        ("print(m := 5)", ["m"]),
        ("while (chunk := read()):\n    pass", ["chunk"]),
        ("xs = [v for v in data if (keep := v)]", ["keep", "xs"]),
    ],
)
def test_walrus_targets_are_outputs(cell, names):
    info = analyze(cell)
    assert info.outputs == names
    assert "v" not in info.outputs and "w" not in info.outputs  # comprehension variables stay local


def test_comprehension_variables_do_not_leak_and_the_first_iterable_is_read_outside():
    info = analyze("v = [x for x in x]\nw = [y for x in xs for y in x]\nd = {k: u for k, u in pairs}")
    assert info.reads == ["x", "xs", "pairs"]
    assert info.outputs == ["v", "w", "d"]


def test_a_walrus_read_later_in_the_same_comprehension_is_not_a_read():
    assert "y" not in analyze("out = [(y := f(v), y * 2) for v in data]").reads
    assert analyze("out = [(y, (y := f(v))) for v in data]").reads == ["data", "y", "f"]


# -- 3. del ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cell, deleted, maybe",
    [
        ("del a", ["a"], []),
        ("del a, b", ["a", "b"], []),
        ("del (a, b), [c]", ["a", "b", "c"], []),
        ("x = 1\ndel x", ["x"], []),
        ("del a\ndel b", ["a", "b"], []),
        ("if flag:\n    del a", [], ["a"]),
        ("if flag:\n    del a\nelse:\n    del a", ["a"], []),
        ("for v in data:\n    del a", [], ["a"]),
        ("try:\n    del a\nexcept NameError:\n    pass", [], ["a"]),
        ("del a\nif flag:\n    a = 1", [], ["a"]),
        ("del a\na = 1", [], []),
        ("try:\n    f()\nexcept ValueError as e:\n    print(e)", [], ["e"]),
        ("try:\n    raise ValueError\nexcept ValueError as e:\n    pass", ["e"], []),
        (line_magic("xdel", "big"), ["big"], []),
        (cell_magic("capture", "out", "x = 1;\n"), ["out"], []),
    ],
)
def test_deleted_names(cell, deleted, maybe):
    info = analyze(cell)
    assert info.deleted == deleted
    assert info.maybe_deleted == maybe
    assert not set(info.deleted) & set(info.outputs)


def test_a_name_deleted_then_maybe_rebound_is_an_output_and_maybe_deleted():
    info = analyze("x = 1\ndel x\nif flag:\n    x = 2")
    assert info.outputs == ["x"] and info.maybe_deleted == ["x"] and info.deleted == []


def test_del_of_a_subscript_or_attribute_mutates_its_base():
    info = analyze("del d['k']\ndel obj.attr\ndel rows[0][1]")
    assert info.reads == ["d", "obj", "rows"] and info.outputs == ["d", "obj", "rows"] and info.deleted == []


def test_del_of_a_name_the_cell_did_not_bind_reads_it():
    """``del x`` fails when x is missing: whether it does depends on the namespace."""
    assert analyze("del x").reads == ["x"]
    assert analyze("x = 1\ndel x").reads == []


# -- 4. line magics --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cell, reads, outputs",
    [
        (line_magic("time", "x = f(a)"), ["f", "a"], ["x"]),
        (line_magic("time", "x = f(a); y = x + b"), ["f", "a", "b"], ["x", "y"]),
        (line_magic("time", "f(a)"), ["f", "a"], []),
        ("r = " + line_magic("time", "f(a)"), ["f", "a"], ["r"]),
        (line_magic("time", "x = f(a)") + "\nprint(x)", ["f", "a", "print"], ["x"]),
        (line_magic("time", "--no-raise-error x = f(a)") + "\nprint(x)", ["f", "a", "print", "x"], ["x"]),
        ("if flag:\n    " + line_magic("time", "x = f(a)") + "\nprint(x)", ["flag", "f", "a", "print", "x"], ["x"]),
        (line_magic("prun", "-q x = f(a)"), ["f", "a"], ["x"]),
        (line_magic("prun", "-l 10 -s cumulative -r x = f(a)"), ["f", "a"], ["x"]),
        (line_magic("prun", "-q -l10 x = f(a)"), ["f", "a"], ["x"]),
        (line_magic("timeit", "-n1 -r1 y = g(b)"), ["b", "g"], []),  # runs in a function: binds nothing
        (line_magic("timeit", "-o g(b)"), ["b", "g"], []),
        ("res = " + line_magic("timeit", "-o g(b)"), ["b", "g"], ["res"]),
        (line_magic("timeit", "-q -v saved g(b)"), ["b", "g"], ["saved"]),
        ("x = " + line_magic("sx", "ls {folder}"), ["folder"], ["x"]),
        ("x = get_ipython().getoutput('ls $folder')", ["folder"], ["x"]),
        ("get_ipython().system('echo {a + b} $$HOME')", ["a", "b"], []),
        (line_magic("pinfo", "model.forward"), ["model"], []),
        (line_magic("matplotlib", "inline") + "\nx = 1", [], ["x"]),
    ],
)
def test_line_magics_are_analysed_through(cell, reads, outputs):
    info = analyze(cell)
    assert info.reads == reads
    assert info.outputs == outputs
    assert "get_ipython" not in info.reads


def test_the_statement_after_time_counts_like_cell_code():
    info = analyze(line_magic("time", "import numpy as np") + "\n" + line_magic("time", "def f(): return np"))
    assert info.rebind == ["import numpy as np", "def f(): return np"]
    assert info.rebind_names == ["np", "f"] and info.modules == ["numpy"] and info.outputs == []


@pytest.mark.parametrize(
    "cell, words",
    [
        (line_magic("run", "helpers.py"), ["%run helpers.py", "another file"]),
        (line_magic("store", "-r model"), ["%store -r model", "store"]),
        (line_magic("store", "model"), ["%store model", "store"]),
        (line_magic("load", "snippet.py"), ["%load snippet.py"]),
        (line_magic("autoreload", "2"), ["%autoreload 2"]),
        (line_magic("cd", "data"), ["%cd data", "working directory"]),
        (line_magic("env", "SEED=1"), ["%env SEED=1", "environment"]),
        (line_magic("pip", "install xxhash"), ["%pip install xxhash", "installs"]),
        (line_magic("reset", "-f"), ["%reset -f", "deletes"]),
        (line_magic("prun", "-D stats.prof f()"), ["%prun -D stats.prof f()", "file"]),
        (line_magic("some_user_magic", "x"), ["%some_user_magic x", "cannot be analysed"]),
        ("get_ipython().system('make data')", ["!make data", "shell"]),
        ("x = get_ipython().getoutput('ls')", ["!ls", "shell"]),
        (line_magic("ls", "-l"), ["%ls -l", "shell"]),
        ("get_ipython().run_line_magic(name, 'x')", ["computed"]),
        ("exec(code)", ["exec(code)", "--inputs"]),
        ("globals()['z'] = 1", ["globals()"]),
        ("from os.path import *", ["from os.path import *", "by name"]),
    ],
)
def test_what_cannot_be_analysed_is_listed_with_a_reason(cell, words):
    info = analyze(cell)
    assert len(info.unanalysable) == 1
    line = info.unanalysable[0]
    assert "\n" not in line and all(w in line for w in words), line


def test_analysable_code_lists_nothing_as_unanalysable():
    cells = [
        "x = f(a)",
        line_magic("time", "x = 1"),
        line_magic("matplotlib", "inline"),
        cell_magic("capture", "out", "y = 2\n"),
        "vars(obj)",
        "eval_ = 1\nmodel.eval()",
    ]
    for cell in cells:
        assert analyze(cell).unanalysable == [], cell


def test_a_cell_magic_not_on_the_first_line_is_refused():
    with pytest.raises(DreamerError, match=r"`%%capture` is not on the first line of the cell \(line 2\)"):
        analyze("a = 1\n" + line_magic("%capture", "out") + "\nprint(1)")


# -- 5. a body that starts with a cell magic -------------------------------------------------


def test_capture_body_reads_and_binds_and_the_variable_is_an_output():
    info = analyze(cell_magic("capture", "out", "print(a)\ny = a * 2\n"))
    assert info.outputs == ["y", "out"]
    assert info.reads == ["print", "a"]
    assert info.maybe_bound == ["y"]  # an error in the body is swallowed (below)


@pytest.mark.parametrize("line", ["out", "--no-stderr out", "out --no-display", "--no-stdout --no-stderr out"])
def test_capture_options_do_not_hide_the_variable(line):
    assert analyze(cell_magic("capture", line, "y = 1\n")).outputs == ["y", "out"]


def test_capture_without_a_variable_binds_only_the_body():
    assert analyze(cell_magic("capture", "", "y = 1\n")).outputs == ["y"]
    assert analyze(cell_magic("capture", "--no-stderr", "y = 1\n")).outputs == ["y"]


def test_capture_swallows_errors_so_its_binds_are_maybe():
    # IPython runs a %%capture body with run_cell, which shows an error instead of raising it
    info = analyze(cell_magic("capture", "out", "y = f()\n") + "\nz = y + 1")
    assert "y" in info.reads and info.outputs == ["y", "out", "z"]


@pytest.mark.parametrize("line", ["", "--no-raise-error"])
def test_time_and_prun_bodies_count_like_cell_code(line):
    timed = analyze(cell_magic("time", line, "x = f(a)\ny = x\n") + "\nprint(y)")
    assert timed.outputs == ["x", "y"]
    assert ("y" in timed.reads) == bool(line)  # --no-raise-error: the body may stop early
    profiled = analyze(cell_magic("prun", "-q -s time", "x = f(a)\n"))
    assert profiled.reads == ["f", "a"] and profiled.outputs == ["x"]


def test_timeit_body_and_setup_run_in_a_function():
    info = analyze(cell_magic("timeit", "-n1 -r1 s = setup(c)", "y = g(s, b)\n"))
    assert info.reads == ["b", "c", "g", "setup"] and info.outputs == []
    assert analyze(cell_magic("timeit", "-o -v result", "g(b)\n")).outputs == ["result"]


def test_definitions_in_a_capture_body_are_rebound_on_a_hit():
    info = analyze(cell_magic("capture", "out", "import json\ndef load(p):\n    return json.loads(p)\nx = load(s)\n"))
    assert info.rebind == ["import json\n", "def load(p):\n    return json.loads(p)\n"]
    assert info.rebind_names == ["json", "load"] and info.modules == ["json"] and info.outputs == ["x", "out"]


def test_a_nested_cell_magic_is_followed():
    info = analyze(cell_magic("capture", "out", "%%time\nx = f(a)\n"))
    assert info.reads == ["f", "a"] and info.outputs == ["x", "out"] and info.maybe_bound == ["x"]
    timed = analyze(cell_magic("time", "", "%%capture out\nx = f(a)\n"))
    assert timed.outputs == ["x", "out"] and timed.maybe_bound == ["x"]


def test_nested_ipython_syntax_needs_the_shell_transform(shell):
    cell = cell_magic("capture", "out", "%time x = f(a)\nfiles = !ls {folder}\n")
    with pytest.raises(
        DreamerError, match=r"line 1 of the `%%capture` code uses IPython syntax \(`%time x = f\(a\)`\)"
    ):
        analyze(cell)
    info = analyze(cell, transform=shell.transform_cell)
    assert info.reads == ["f", "a", "folder"] and info.outputs == ["x", "files", "out"]
    assert info.unanalysable == [
        "`!ls {folder}`: runs a shell command; what it reads and writes outside Python is not tracked"
    ]


def test_what_real_ipython_gives_for_magics_is_analysed(shell):
    """The analysis works on IPython's own transform of each magic, not on hand-written strings."""
    cases = {
        "%time x = f(a)\nprint(x)": (["f", "a", "print"], ["x"]),
        "%%capture out\ny = a * 2\n": (["a"], ["y", "out"]),
        "%%time\ny = a * 2\n": (["a"], ["y"]),
        "%prun -q z = g(b)": (["g", "b"], ["z"]),
        "%timeit -o -q g(b)": (["b", "g"], []),
        "x = %sx ls {folder}": (["folder"], ["x"]),
        "x = !ls": ([], ["x"]),
    }
    for raw, (reads, outputs) in cases.items():
        info = analyze(shell.transform_cell(raw), transform=shell.transform_cell)
        assert (info.reads, info.outputs) == (reads, outputs), raw


@pytest.mark.parametrize(
    "magic, fix",
    [
        ("bash", "another process"),
        ("sh", "another process"),
        ("script", "another process"),
        ("python3", "another process"),
        ("writefile", "put %%writefile in its own cell before the step"),
        ("file", "put %%file in its own cell before the step"),
        ("html", "only displays"),
        ("markdown", "only displays"),
        ("javascript", "only displays"),
        ("latex", "only displays"),
        ("debug", "%%capture, %%time, %%timeit and %%prun"),
        ("my_magic", "%%capture, %%time, %%timeit and %%prun"),
    ],
)
def test_other_cell_magics_are_refused_with_one_line(shell, magic, fix):
    source = shell.transform_cell(f"%%{magic} arg\nbody\n")
    with pytest.raises(DreamerError) as err:
        analyze(source)
    message = str(err.value)
    assert message.startswith(f"`%%{magic}` cannot run inside a step") and fix in message and "\n" not in message
    with pytest.raises(DreamerError, match=f"`%%{magic}` cannot run"):  # also nested in an analysed magic
        analyze(cell_magic("capture", "out", f"%%{magic} arg\nbody\n"))


# -- 6./7. top-level await, return, yield, break, continue, nonlocal --------------------------


@pytest.mark.parametrize(
    "cell, start",
    [
        ("return 1", "`return` at the top level of the cell (line 1)"),
        ("x = 1\nif x:\n    return x", "`return` at the top level of the cell (line 3)"),
        ("class A:\n    return 1", "`return` at the top level of the cell (line 2)"),
        ("yield 1", "`yield` at the top level of the cell (line 1)"),
        ("x = yield", "`yield` at the top level of the cell (line 1)"),
        ("yield from range(3)", "`yield` at the top level of the cell (line 1)"),
        ("for v in data:\n    pass\nbreak", "`break` outside a loop in the cell (line 3)"),
        ("continue", "`continue` outside a loop in the cell (line 1)"),
        ("for v in data:\n    pass\nelse:\n    break", "`break` outside a loop in the cell (line 4)"),
        ("while x:\n    class A:\n        break", "`break` outside a loop in the cell (line 3)"),
        ("nonlocal x", "`nonlocal` at the top level of the cell (line 1)"),
        ("await f()", "top-level `await` in the cell (line 1)"),
        ("x = 1\nr = await f(x)", "top-level `await` in the cell (line 2)"),
        ("async for v in stream():\n    pass", "top-level `await` in the cell (line 1)"),
        ("async with session() as s:\n    pass", "top-level `await` in the cell (line 1)"),
        ("xs = [v async for v in stream()]", "top-level `await` in the cell (line 1)"),
        ("xs = [await f(v) for v in data]", "top-level `await` in the cell (line 1)"),
        (cell_magic("capture", "out", "return 1\n"), "`return` at the top level of the `%%capture` code (line 1)"),
        (line_magic("time", "await f()"), "top-level `await` in the `%time` code (line 1)"),
    ],
)
def test_what_only_a_function_or_loop_allows_is_refused_with_one_line(cell, start):
    with pytest.raises(DreamerError) as err:
        analyze(cell)
    message = str(err.value)
    assert message.startswith(start) and "\n" not in message


@pytest.mark.parametrize(
    "cell",
    [
        "def f():\n    return 1",
        "def g():\n    yield 1\nxs = list(g())",
        "async def f():\n    await g()\n    async for v in s():\n        pass",
        "f = lambda: (yield)",
        "for v in data:\n    if v:\n        break\n    continue",
        "while x:\n    try:\n        break\n    finally:\n        pass",
        "def outer():\n    n = 0\n    def inner():\n        nonlocal n\n        n += 1",
        "global x\nx = 1",
    ],
)
def test_the_same_words_where_python_allows_them_are_fine(cell):
    analyze(cell)


def test_await_refusal_says_how_to_fix_it():
    with pytest.raises(DreamerError, match="in a cell of its own before the step"):
        analyze("data = await fetch()")


@pytest.mark.parametrize(
    "cell", ["x = (", "def f(:\n    pass", "from __future__ import nope", "x = 1\nfrom __future__ import annotations"]
)
def test_invalid_python_is_one_clear_line(cell):
    with pytest.raises(DreamerError, match=r"^the cell is not valid Python \(line \d+: .*\); fix"):
        analyze(cell)


# -- 8. attributes, keywords, global, class bodies ------------------------------------------


@pytest.mark.parametrize(
    "cell, reads",
    [
        ("n = r.size", ["r"]),
        ("n = r.size.real + df.shape[0]", ["r", "df"]),
        ("model.eval()", ["model"]),
        ("obj.attr = 1", ["obj"]),
        ("m = f(size=3, dtype=kind)", ["f", "kind"]),
        ("m = dict(a=1, b=b)", ["dict", "b"]),
        ("class C(Base, metaclass=Meta):\n    pass", ["Base", "Meta"]),
        ("s = f'{r.size:{width}}'", ["r", "width"]),
    ],
)
def test_attribute_and_keyword_names_are_never_reads(cell, reads):
    assert analyze(cell).reads == reads


def test_global_in_a_function_binds_at_the_top_level():
    info = analyze("def bump():\n    global counter\n    counter = counter + 1\nbump()")
    assert info.outputs == ["counter"] and "counter" in info.reads
    nested = analyze("def outer():\n    def inner():\n        global seen\n        seen = 1\n    inner()\nouter()")
    assert nested.outputs == ["seen"]


def test_global_at_the_top_level_or_in_a_class_body():
    assert analyze("global x\nx = 1\nprint(x)").outputs == ["x"]
    info = analyze("class C:\n    global G\n    G = 3\n    local = 4\nprint(G)")
    assert info.outputs == ["G"] and info.reads == ["print"]


def test_class_bodies_run_now_in_their_own_scope():
    info = analyze(
        "class Config:\n    lr = base_lr * 2\n    steps = lr * 10\n    if flag:\n        extra = 1\n    more = extra"
    )
    assert info.reads == ["base_lr", "flag", "extra"]  # `lr` is the class's own; `extra` may be missing
    assert info.outputs == [] and info.rebind_names == ["Config"]


def test_what_is_nested_in_a_class_body_does_not_see_the_class_names():
    info = analyze(
        "class C:\n    n = 2\n    vals = [1, 2]\n    sq = [v * n for v in vals]\n    def f(self):\n        return n"
    )
    assert info.reads == ["n"]  # the comprehension and the method both read the global n, not C.n


def test_function_free_names_are_read_unless_bound_on_every_path():
    assert analyze("def f():\n    return helper(scale)\ndef helper(v):\n    return v\nscale = 2").reads == []
    assert analyze("def f():\n    return scale\nif flag:\n    scale = 2").reads == ["flag", "scale"]
    assert analyze("def f(a, *args, k=1, **kw):\n    local = a\n    return local + k").reads == []


def test_free_names_of_nested_scopes_resolve_as_python_does():
    info = analyze(
        "def f():\n"
        "    x = 1\n"
        "    def g():\n"
        "        return x + y\n"
        "    return [x for x in zs] + [w := 2] + [w]\n"
    )
    assert info.reads == ["y", "zs"]


def test_lambdas_read_their_free_names_where_they_are_made():
    assert analyze("f = lambda q, *r, k=dflt: q + z").reads == ["dflt", "z"]


def test_annotations_defaults_and_decorators_are_read_when_the_definition_runs():
    info = analyze("@register(kind)\ndef f(a: T = default) -> R:\n    return a\nx: List[int] = [1]\ny: Hidden")
    assert info.reads == ["register", "kind", "default", "T", "R", "List", "int", "Hidden"]
    assert info.outputs == ["x"]


# -- changed lines (unchanged behaviour) ------------------------------------------------------


def test_changed_lines_name_the_lines():
    from dreamer_magic.cell import changed_lines

    assert changed_lines("a = 1\nb = 2", "a = 1\nb = 3") == ["line 2: `b = 2` → `b = 3`"]


# -- end to end: %%dreamer_step with the cell shapes above ------------------------------------


def _user_names(ip) -> dict:
    hidden = set(ip.user_ns_hidden)
    shell_names = {"In", "Out", "exit", "quit", "get_ipython"}
    return {k: v for k, v in ip.user_ns.items() if not k.startswith("_") and k not in hidden | shell_names}


def _state(ip):
    return ip._dreamer_magics._last_status.state


def _same_namespace(after_hit: dict, after_run: dict, compare=None) -> None:
    assert sorted(after_hit) == sorted(after_run)
    for name, value in after_run.items():
        if compare and name in compare:
            assert compare[name](after_hit[name]) == compare[name](value), name
        else:
            assert after_hit[name] == value, name


def test_step_with_time_line_magic_hits_and_restores(ip):
    cell = "%time doubled = [2 * v for v in data]\ntotal = sum(doubled)\n"
    ip.user_ns["data"] = [1, 2, 3]
    ip.run_cell_magic("dreamer_step", "timed", cell)
    after_run = _user_names(ip)
    assert after_run["doubled"] == [2, 4, 6] and after_run["total"] == 12
    fresh_kernel(ip)
    ip.user_ns["data"] = [1, 2, 3]
    ip.run_cell_magic("dreamer_step", "timed", cell)
    assert _state(ip) == "loaded from disk"
    _same_namespace(_user_names(ip), after_run)
    ip.user_ns["data"] = [1, 2, 4]  # the statement inside %time reads `data`: a change re-runs
    ip.run_cell_magic("dreamer_step", "timed", cell)
    assert _state(ip) == "ran" and ip.user_ns["total"] == 14


def test_step_whose_body_starts_with_capture_hits_and_restores(ip, capsys):
    cell = "%%capture out\nprint('rows:', len(data))\nfirst = data[0]\n"
    ip.user_ns["data"] = [5, 6]
    ip.run_cell_magic("dreamer_step", "captured", cell)
    after_run = _user_names(ip)
    assert after_run["first"] == 5 and after_run["out"].stdout == "rows: 2\n"
    fresh_kernel(ip)
    ip.user_ns["data"] = [5, 6]
    ip.run_cell_magic("dreamer_step", "captured", cell)
    assert _state(ip) == "loaded from disk"
    _same_namespace(_user_names(ip), after_run, compare={"out": lambda o: (o.stdout, o.stderr)})
    ip.user_ns["data"] = [7]
    ip.run_cell_magic("dreamer_step", "captured", cell)
    assert _state(ip) == "ran" and ip.user_ns["out"].stdout == "rows: 1\n"


def test_step_with_a_branch_bound_name_reads_it_from_the_namespace(ip):
    cell = "if use_default:\n    scale = 10\nscaled = [v * scale for v in data]\n"
    ip.user_ns.update(use_default=False, scale=3, data=[1, 2])
    ip.run_cell_magic("dreamer_step", "branchy", cell)
    assert ip.user_ns["scaled"] == [3, 6]
    after_run = _user_names(ip)
    ip.run_cell_magic("dreamer_step", "branchy", cell)
    assert _state(ip) == "loaded from disk"
    _same_namespace(_user_names(ip), after_run)
    ip.user_ns["scale"] = 4  # the branch did not run: `scale` came from the namespace
    ip.run_cell_magic("dreamer_step", "branchy", cell)
    assert _state(ip) != "loaded from disk" and ip.user_ns["scaled"] == [4, 8]


def test_step_with_a_walrus_in_a_comprehension_restores_its_target(ip):
    cell = "squares = [last := v * v for v in data]\n"
    ip.user_ns["data"] = [2, 3]
    ip.run_cell_magic("dreamer_step", "walrus", cell)
    after_run = _user_names(ip)
    assert after_run["last"] == 9
    fresh_kernel(ip)
    ip.user_ns["data"] = [2, 3]
    ip.run_cell_magic("dreamer_step", "walrus", cell)
    assert _state(ip) == "loaded from disk"
    _same_namespace(_user_names(ip), after_run)


def test_step_refuses_other_cell_magics_and_top_level_return(ip):
    from IPython.core.error import UsageError

    with pytest.raises(UsageError, match="`%%bash` cannot run inside a step"):
        ip.run_cell_magic("dreamer_step", "shelly", "%%bash\necho hi\n")
    with pytest.raises(UsageError, match="`return` at the top level of the cell"):
        ip.run_cell_magic("dreamer_step", "early", "x = 1\nif x:\n    return\n")
    with pytest.raises(UsageError, match="top-level `await`"):
        ip.run_cell_magic("dreamer_step", "awaits", "import asyncio\nawait asyncio.sleep(0)\n")


def test_step_that_deletes_a_name_deletes_it_on_a_hit(ip):
    cell = "total = sum(scratch)\ndel scratch\n"
    ip.user_ns["scratch"] = [1, 2]
    ip.run_cell_magic("dreamer_step", "deleter", cell)
    after_run = _user_names(ip)
    assert "scratch" not in after_run
    ip.user_ns["scratch"] = [1, 2]
    ip.run_cell_magic("dreamer_step", "deleter", cell)
    assert _state(ip) == "loaded from disk"
    _same_namespace(_user_names(ip), after_run)


def test_step_whose_loop_did_not_run_leaves_its_target_as_it_was(ip):
    cell = "for v in data:\n    last = v\n"
    ip.user_ns.update(data=[], last="old")
    ip.run_cell_magic("dreamer_step", "empty-loop", cell)
    assert ip.user_ns["last"] == "old"
    ip.user_ns["last"] = "newer"  # not read: still a hit, and a run would leave "newer"
    ip.run_cell_magic("dreamer_step", "empty-loop", cell)
    assert _state(ip) == "loaded from disk"
    assert ip.user_ns["last"] == "newer"


def test_step_status_names_what_it_cannot_analyse(ip):
    ip.run_cell_magic("dreamer_step", "env-step", "%env DREAMER_TEST_FLAG=1\nx = 1\n")
    notes = " ".join(ip._dreamer_magics._last_status.notes)
    assert "%env DREAMER_TEST_FLAG=1" in notes
