"""No stale hits: a hit gives exactly what running the cell now would give (issue 9, SPEC §3).

Each test is one class of stale hit, with several variants, run as a user would meet it: cells
in a fresh process per "kernel session" (tests/_session.py), the output folder kept between
sessions, something changed between them. Three things are checked every time:

* nothing changed -> the second session is a hit and leaves the namespace exactly as the run
  did (every dumped name has the same fingerprint);
* the dependency changed -> the step runs again, and the status says what changed;
* what cannot be tracked is named in the status.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from _session import session

HIT = ("loaded from disk", "restored from backup")


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip("\n"))


def assert_hits_like(run, hit):
    assert not hit.errors, hit.errors
    assert all(state in HIT for state in hit.states), (hit.states, [s["reasons"] for s in hit.statuses])
    assert hit.same_values(run), {k: (run.values[k], hit.values[k]) for k in run.values if run.values[k] != hit.values[k]}


# -- 1. code outside the notebook ------------------------------------------------------------------


def test_local_modules_packages_and_transitive_code(tmp_path):
    write(tmp_path / "helpers.py", """
        import textutil

        def clean(rows):
            return [textutil.norm(r) for r in rows]   # calls into another local module
    """)
    write(tmp_path / "textutil.py", """
        def norm(text):
            return text.strip().lower()
    """)
    write(tmp_path / "proj/__init__.py", "")
    write(tmp_path / "proj/scoring.py", """
        WEIGHT = 2

        def score(words):
            return len(words) * WEIGHT
    """)
    cells = [
        "import helpers\nrows = [' A', 'b ']",
        "%%dreamer_step via-input\ncleaned = helpers.clean(rows)",  # a module read as an input
        "%%dreamer_step via-import\nfrom proj.scoring import score\ntotal = score(['x', 'y', 'z'])",  # imported in the cell
    ]
    dump = ["cleaned", "total"]
    run = session(tmp_path, cells, dump=dump)
    assert run.states == ["ran", "ran"] and not run.errors, run.errors
    assert run.values["cleaned"]["repr"] == "['a', 'b']" and run.values["total"]["repr"] == "6"
    assert_hits_like(run, session(tmp_path, cells, dump=dump))

    # a comment-only edit changes no code that runs: still a hit
    write(tmp_path / "textutil.py", """
        def norm(text):
            # strip, then lower-case
            return text.strip().lower()
    """)
    assert_hits_like(run, session(tmp_path, cells, dump=dump))

    # an edit two modules away (helpers -> textutil) re-runs the step that reaches it, only that one
    write(tmp_path / "textutil.py", """
        def norm(text):
            return text.strip().upper()
    """)
    edited = session(tmp_path, cells, dump=dump)
    assert edited.states == ["ran", "loaded from disk"], edited.statuses
    assert "textutil" in edited.reasons(0) and "norm" in edited.reasons(0)
    assert edited.values["cleaned"]["repr"] == "['A', 'B']"

    # a module constant and a package module imported by the cell itself
    write(tmp_path / "proj/scoring.py", """
        WEIGHT = 3

        def score(words):
            return len(words) * WEIGHT
    """)
    edited = session(tmp_path, cells, dump=dump)
    assert edited.states == ["loaded from disk", "ran"], edited.statuses
    assert "scoring" in edited.reasons(1) and edited.values["total"]["repr"] == "9"


def test_an_edited_file_that_was_not_reloaded_still_hits_until_the_restart(tmp_path):
    write(tmp_path / "helpers.py", "def double(x):\n    return x * 2\n")
    step = "%%dreamer_step doubled\nimport helpers\ny = helpers.double(21)"
    edit = "open('helpers.py', 'w').write('def double(x):\\n    return x * 3\\n')"
    same_kernel = session(tmp_path, [step, edit, step], dump=["y"])
    assert same_kernel.states == ["ran", "loaded from disk"], same_kernel.statuses
    assert same_kernel.values["y"]["repr"] == "42", "the code that runs in this kernel is still the old one"
    restarted = session(tmp_path, [step], dump=["y"])
    assert restarted.states == ["ran"] and "double" in restarted.reasons()
    assert restarted.values["y"]["repr"] == "63"


# -- 3. files the body reads -----------------------------------------------------------------------


def test_files_read_by_the_body(tmp_path):
    write(tmp_path / "data.csv", "a,b\n1,2\n3,4\n")
    write(tmp_path / "config.json", '{"threshold": 2}')
    (tmp_path / "shards").mkdir()
    write(tmp_path / "shards/part-0.txt", "x\n")
    write(tmp_path / "native.csv", "v\n1\n2\n")
    cells = [
        "import pandas as pd, json, glob",
        "%%dreamer_step csv\ndf = pd.read_csv('data.csv')\ntotal = int(df.a.sum())",
        "%%dreamer_step cfg\nwith open('config.json') as f:\n    cfg = json.load(f)",
        "%%dreamer_step shards\nparts = sorted(glob.glob('shards/*.txt'))",
        "%%dreamer_step native --files native.csv\nimport pyarrow.csv as pacsv\nn = pacsv.read_csv('native.csv').num_rows",
    ]
    dump = ["total", "cfg", "parts", "n"]
    run = session(tmp_path, cells, dump=dump)
    assert run.states == ["ran"] * 4 and not run.errors, run.errors
    meta = json.loads((tmp_path / "output/csv/step.json").read_text())
    assert [f["path"] for f in meta["dependencies"]["files"]] == ["data.csv"]
    assert_hits_like(run, session(tmp_path, cells, dump=dump))

    # touched only: same content, new mtime -> still a hit
    import os
    import time

    later = time.time() + 5
    for name in ("data.csv", "config.json", "native.csv"):
        os.utime(tmp_path / name, (later, later))
    assert_hits_like(run, session(tmp_path, cells, dump=dump))

    # changed content, a new file in a listed folder, a declared file read by native code
    write(tmp_path / "data.csv", "a,b\n1,2\n30,4\n")
    write(tmp_path / "shards/part-1.txt", "y\n")
    write(tmp_path / "native.csv", "v\n1\n2\n3\n")
    changed = session(tmp_path, cells, dump=dump)
    assert changed.states == ["ran", "loaded from disk", "ran", "ran"], changed.statuses
    assert "file `data.csv` changed" in changed.reasons(0)
    assert "shards" in changed.reasons(2) and "native.csv" in changed.reasons(3)
    assert changed.values["total"]["repr"] == "31" and changed.values["n"]["repr"] == "3"

    # deleted: runs again, and the error is the user's (FileNotFoundError), not a stale hit
    (tmp_path / "config.json").unlink()
    gone = session(tmp_path, cells[:1] + cells[2:3], dump=["cfg"])
    assert gone.states == ["failed"] and "FileNotFoundError" in gone.errors[0]


def test_what_cannot_be_tracked_is_named(tmp_path):
    cells = ["import os, subprocess", "%%dreamer_step env\nkey = os.environ.get('MY_SETTING', 'none')\nout = subprocess.run(['true']).returncode"]
    run = session(tmp_path, cells, dump=["key"], env={"MY_SETTING": "a"})
    assert run.states == ["ran"]
    assert "MY_SETTING" in run.reasons() and "not tracked" in run.reasons()
    hit = session(tmp_path, cells, dump=["key"], env={"MY_SETTING": "a"})
    assert hit.states == ["loaded from disk"] and "MY_SETTING" in hit.reasons(), "a hit says it too"


# -- 4. lineage that outlives its data ---------------------------------------------------------------


def test_downstream_steps_follow_the_data_not_the_upstream_fingerprint(tmp_path):
    make = "%%dreamer_step make {flags}\nimport os\nfrom datasets import Dataset\nds = Dataset.from_dict({{'x': list(range(int(os.environ['N'])))}})"
    total = "%%dreamer_step total\ns = sum(ds['x'])"
    first = session(tmp_path, [make.format(flags=""), total], dump=["s"], env={"N": "3"})
    assert first.states == ["ran", "ran"] and first.values["s"]["repr"] == "3"
    again = session(tmp_path, [make.format(flags=""), total], dump=["s"], env={"N": "3"})
    assert again.states == ["loaded from disk", "loaded from disk"], "a dataset loaded from a step keeps its key"
    # --force: same fingerprint upstream, other data -> the downstream step must not hit
    forced = session(tmp_path, [make.format(flags="--force"), total], dump=["s"], env={"N": "5"})
    assert forced.states == ["ran", "ran"], forced.statuses
    assert forced.values["s"]["repr"] == "10"
    # and the same in one kernel: force twice with other data
    both = session(tmp_path, ["import os", make.format(flags="--force"), total, "os.environ['N'] = '4'", make.format(flags="--force"), total], dump=["s"], env={"N": "5"})
    assert both.states[-1] == "ran" and both.values["s"]["repr"] == "6"


# -- 5. in-place mutation ----------------------------------------------------------------------------


def test_inputs_changed_in_place_are_restored_on_a_hit(tmp_path):
    setup = "import numpy as np, pandas as pd\nlst = [3, 1]\nd = {'a': 1}\narr = np.array([3, 1, 2])\ndf = pd.DataFrame({'x': [1, 2, 3], 'y': [4, 5, 6]})"
    cells = [
        setup,
        "%%dreamer_step mutate\nlst.append(2)\nd.update(b=2)\narr.sort()\ndf.drop(columns=['y'], inplace=True)\nn = len(lst)",
    ]
    dump = ["lst", "d", "arr", "df", "n"]
    run = session(tmp_path, cells, dump=dump)
    assert run.states == ["ran"] and run.values["lst"]["repr"] == "[3, 1, 2]"
    hit = session(tmp_path, cells, dump=dump)
    assert_hits_like(run, hit)
    assert hit.values["arr"]["repr"] == "array([1, 2, 3])" and "y" not in hit.values["df"]["repr"]


def test_a_model_trained_in_a_step_comes_back_trained(tmp_path):
    cells = [
        "import torch\ntorch.manual_seed(0)\nmodel = torch.nn.Linear(3, 1)\nopt = torch.optim.SGD(model.parameters(), lr=0.1)",
        "%%dreamer_step fit\nfor _ in range(5):\n    loss = model(torch.ones(2, 3)).pow(2).mean()\n    opt.zero_grad(); loss.backward(); opt.step()\nfinal = float(loss)",
    ]
    run = session(tmp_path, cells, dump=["model", "final"])
    hit = session(tmp_path, cells, dump=["model", "final"])
    assert_hits_like(run, hit)


# -- 6. randomness -------------------------------------------------------------------------------------


def test_global_rng_state_counts_and_is_left_as_a_run_leaves_it(tmp_path):
    cells = [
        "import random, numpy as np, torch\nrandom.seed(1); np.random.seed(1); torch.manual_seed(1)",
        "%%dreamer_step draw\na = random.random()\nb = float(np.random.rand())\nc = float(torch.rand(1))",
        "after = (random.random(), float(np.random.rand()), float(torch.rand(1)))",
    ]
    dump = ["a", "b", "c", "after"]
    run = session(tmp_path, cells, dump=dump)
    hit = session(tmp_path, cells, dump=dump)
    assert_hits_like(run, hit)
    other = session(tmp_path, [cells[0].replace("seed(1)", "seed(2)")] + cells[1:], dump=dump)
    assert other.states == ["ran"] and "RNG" in other.reasons()
    assert other.values["a"] != run.values["a"]
    # a body that seeds before drawing does not depend on the state it started from
    seeded = ["import random", "%%dreamer_step seeded\nrandom.seed(7)\nz = random.random()"]
    first = session(tmp_path, seeded, dump=["z"])
    assert_hits_like(first, session(tmp_path, seeded, dump=["z"]))


def test_rng_objects_count_by_state_and_come_back_in_their_end_state(tmp_path):
    cells = [
        "import random, numpy as np\nrng = np.random.default_rng(0)\nr = random.Random(5)\nss = np.random.SeedSequence(3)",
        "%%dreamer_step draw\nx = rng.random(3).tolist()\ny = r.random()\nchild = ss.spawn(1)[0].entropy",
        "next_draws = (float(rng.random()), r.random())",
    ]
    dump = ["x", "y", "next_draws", "rng", "r"]
    run = session(tmp_path, cells, dump=dump)
    hit = session(tmp_path, cells, dump=dump)
    assert_hits_like(run, hit)
    other = session(tmp_path, [cells[0].replace("default_rng(0)", "default_rng(1)")] + cells[1:], dump=dump)
    assert other.states == ["ran"] and "rng" in other.reasons()


# -- 7. order and flags ---------------------------------------------------------------------------------


def test_order_and_flags_count(tmp_path):
    cells = [
        "import collections, torch\nlabels = {'neg': 0, 'pos': 1}\ncounts = collections.defaultdict(int)\nw = torch.zeros(2, requires_grad=True)",
        "%%dreamer_step names\nnames = list(labels)",
        "%%dreamer_step grad\nneeds = w.requires_grad",
        "%%dreamer_step table --outputs a\na = 1\nb = 2",
    ]
    run = session(tmp_path, cells, dump=["names", "needs", "a"])
    assert run.states == ["ran"] * 3
    assert_hits_like(run, session(tmp_path, cells, dump=["names", "needs", "a"]))
    changed = [
        cells[0].replace("{'neg': 0, 'pos': 1}", "{'pos': 1, 'neg': 0}").replace("requires_grad=True", "requires_grad=False"),
        cells[1],
        cells[2],
        cells[3].replace("--outputs a", "--outputs a,b"),
    ]
    again = session(tmp_path, changed, dump=["names", "needs", "a", "b"])
    assert again.states == ["ran"] * 3, again.statuses
    assert again.values["names"]["repr"] == "['pos', 'neg']" and again.values["needs"]["repr"] == "False"
    assert again.values["b"]["repr"] == "2"


# -- 2. notebook classes and models ---------------------------------------------------------------------


CLASSES = '''
import dataclasses, torch

class Scaler:
    def __init__(self, k):
        self.k = k
    def __call__(self, x):
        return x * self.k

@dataclasses.dataclass
class Config:
    size: int = 2
    def __post_init__(self):
        self.size = self.size * 10

class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(2, 2)
        self.drop = torch.nn.Dropout(0.1)
    def forward(self, x):
        return self.drop(self.lin(x))

torch.manual_seed(0)
scale, cfg, net = Scaler(3), Config(), Net().eval()
'''


@pytest.mark.parametrize(
    "edit, step",
    [
        (("self.k = k", "self.k = k + 1"), "scaled"),  # __init__ of a plain class
        (("return x * self.k", "return x * self.k * 2"), "scaled"),  # __call__
        (("self.size = self.size * 10", "self.size = self.size * 100"), "config"),  # __post_init__ of a dataclass
        (("Dropout(0.1)", "Dropout(0.3)"), "model"),  # a hyperparameter of an nn.Module
        (("Net().eval()", "Net().train()"), "model"),  # train/eval mode
    ],
)
def test_every_method_and_hyperparameter_of_notebook_classes_counts(tmp_path, edit, step):
    cells = [
        CLASSES,
        "%%dreamer_step scaled\ny = scale(2)",
        "%%dreamer_step config\nsize = cfg.size",
        "%%dreamer_step model\nout = net(torch.ones(1, 2)).tolist()\nmode = net.training",
    ]
    run = session(tmp_path, cells, dump=["y", "size", "out", "mode"])
    assert run.states == ["ran"] * 3, run.errors
    edited = session(tmp_path, [CLASSES.replace(*edit)] + cells[1:], dump=["y", "size", "out", "mode"])
    which = ["scaled", "config", "model"].index(step)
    assert edited.states[which] == "ran", (edit, edited.statuses)
    assert [s for i, s in enumerate(edited.states) if i != which] == ["loaded from disk"] * 2, edited.statuses


def test_classes_and_functions_defined_in_steps_survive_a_restart(tmp_path):
    cells = [
        "%%dreamer_step define\nclass Point:\n    def __init__(self, x):\n        self.x = x\ndef norm(p):\n    return abs(p.x)\npts = [Point(-2), Point(3)]\nsquare = lambda v: v * v",
        "%%dreamer_step use\ntotal = sum(norm(p) for p in pts) + square(2)",
    ]
    run = session(tmp_path, cells, dump=["total"])
    assert run.states == ["ran", "ran"] and run.values["total"]["repr"] == "9"
    hit = session(tmp_path, cells, dump=["total", "pts"])
    assert hit.states == ["loaded from disk", "loaded from disk"], hit.statuses
    assert hit.values["total"]["repr"] == "9" and "Point" in hit.values["pts"]["repr"]


def test_outputs_that_cannot_be_saved_are_skipped_with_a_note(tmp_path):
    cells = ["%%dreamer_step handles\nimport threading\nlock = threading.Lock()\nf = open('notes.txt', 'w')\ngen = (i for i in range(3))\nkept = [1, 2]\nf.close()"]
    run = session(tmp_path, cells, dump=["kept"])
    assert run.states == ["ran"] and not run.errors
    assert "`lock`" in run.reasons() and "`gen`" in run.reasons() and "`f`" in run.reasons()
    assert session(tmp_path, cells, dump=["kept"]).states == ["loaded from disk"]


# -- 8. cell syntax -----------------------------------------------------------------------------------------


def test_cell_syntax_hits_leave_the_namespace_as_a_run(tmp_path):
    cells = [
        "flag = False\nx = 'from before'\ndata = [1, 2, 3]\nscratch = 1",
        "%%dreamer_step branch\nif flag:\n    x = 'set in the step'\nseen = x",  # x is an input: the branch did not run
        "%%dreamer_step magic\n%time t = sum(data)",
        "%%dreamer_step walrus\nsquares = [y := v * v for v in data]\ndel scratch",
        "%%dreamer_step capture\n%%capture out\nprint('quiet')\nq = len(data)",
    ]
    dump = ["seen", "t", "squares", "y", "scratch", "q", "out"]
    run = session(tmp_path, cells, dump=dump)
    assert run.states == ["ran"] * 4 and not run.errors, run.errors
    assert run.values["scratch"] is None and run.values["y"]["repr"] == "9"
    hit = session(tmp_path, cells, dump=dump)
    assert_hits_like(run, hit)
    changed = session(tmp_path, [cells[0].replace("'from before'", "'other'")] + cells[1:], dump=dump)
    assert changed.states[0] == "ran" and "`x`" in changed.reasons(0)
    assert changed.values["seen"]["repr"] == "'other'"


# -- values that must fingerprint alike in every process --------------------------------------------------


VALUES = {
    "rng": "np.random.default_rng(7)",
    "seedseq": "np.random.SeedSequence(11)",
    "ts": "pd.Timestamp('2024-05-01 12:00', tz='Europe/Paris')",
    "td": "pd.Timedelta('3h')",
    "nat": "pd.NaT",
    "na": "pd.NA",
    "cat": "pd.Categorical(['a', 'b', 'a'])",
    "cached_fn": "functools.lru_cache(maxsize=8)(lambda v: v + 1)",
    "big": "10 ** 5000",
    "sparse": "torch.tensor([[0, 1.5], [2.0, 0]]).to_sparse()",
    "ufunc": "np.add",
    "relu": "torch.nn.functional.relu",
}


def test_everyday_values_as_inputs_hit_after_a_restart(tmp_path):
    setup = "import functools, numpy as np, pandas as pd, torch\n" + "\n".join(f"{k} = {v}" for k, v in VALUES.items())
    step = "%%dreamer_step uses-them\nseen = [" + ", ".join(f"type({k}).__name__" for k in VALUES) + "]"
    run = session(tmp_path, [setup, step], dump=["seen"])
    assert run.states == ["ran"] and not run.errors, (run.errors, run.statuses)
    hit = session(tmp_path, [setup, step], dump=["seen"])
    assert hit.states == ["loaded from disk"], hit.statuses
    changed = session(tmp_path, [setup.replace("default_rng(7)", "default_rng(8)"), step], dump=["seen"])
    assert changed.states == ["ran"] and "`rng`" in changed.reasons()
