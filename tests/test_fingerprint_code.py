"""Code fingerprints: user code by where its file lives and by the code that actually runs.

Modules are real files under tmp_path, imported, edited, reloaded and imported again in fresh
processes; notebook code goes through a real IPython shell.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dreamer_magic.errors import FingerprintError
from dreamer_magic.fingerprint import (
    code_global_names,
    distribution_version,
    fingerprint,
    fingerprint_untracked,
    is_user_module,
    model_fingerprint,
    package_version,
)

ROOT = Path(__file__).resolve().parents[1]


class Files:
    """Modules written to a folder on sys.path, imported for real, forgotten after the test."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def write(self, relative: str, source: str) -> Path:
        path = self.folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source))
        importlib.invalidate_caches()
        return path

    def load(self, name: str):
        return importlib.import_module(name)

    def run(self, script: str, *extra_path: Path) -> str:
        """Run ``script`` in a fresh interpreter that sees this folder (a kernel restart)."""
        path = os.pathsep.join([str(ROOT), str(self.folder), *map(str, extra_path)])
        env = dict(os.environ, PYTHONPATH=path, PYTHONHASHSEED="4321")
        out = subprocess.run(
            [sys.executable, "-B", "-c", textwrap.dedent(script)], capture_output=True, text=True, env=env, cwd=self.folder
        )
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()


@pytest.fixture
def files(tmp_path, monkeypatch):
    folder = tmp_path / "project"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setattr(sys, "dont_write_bytecode", True)  # every import compiles what is on disk now
    before = set(sys.modules)
    yield Files(folder)
    for name in set(sys.modules) - before:
        del sys.modules[name]


def notebook_function(shell, source: str, name: str):
    result = shell.run_cell(textwrap.dedent(source))
    assert result.success, result.error_in_exec or result.error_before_exec
    return shell.user_ns[name]


# -- 1. user code by where its file lives ------------------------------------------------------


def test_user_modules_by_where_their_file_lives(files):
    files.write("helpers.py", "__version__ = '1.2'\ndef clean(x):\n    return x\n")
    files.write("project_pkg/__init__.py", "")
    files.write("project_pkg/steps.py", "def run():\n    return 1\n")
    files.load("helpers"), files.load("project_pkg.steps")
    assert is_user_module("helpers"), "a file beside the notebook, even with a __version__"
    assert is_user_module("project_pkg.steps") and is_user_module("project_pkg")
    assert is_user_module("__main__")
    assert not is_user_module("json") and not is_user_module("os.path") and not is_user_module("sys")
    assert not is_user_module("numpy") and not is_user_module("xxhash")
    assert package_version("helpers") is None and distribution_version("helpers") is None
    assert distribution_version("numpy.linalg")[0] == "numpy"
    assert distribution_version("json") is None


def _dist_info(site: Path, name: str, version: str, files: list[str], *, editable: bool, top: str) -> None:
    info = site / f"{name}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "top_level.txt").write_text(top + "\n")
    (info / "INSTALLER").write_text("pip\n")
    listed = [*files, f"{info.name}/METADATA", f"{info.name}/RECORD"]
    (info / "RECORD").write_text("".join(f"{f},,\n" for f in listed))
    if editable:
        url = {"url": "file:///somewhere/project", "dir_info": {"editable": True}}
        (info / "direct_url.json").write_text(json.dumps(url))


def test_installed_and_editable_distributions(tmp_path, files, monkeypatch):
    import site

    site_packages = tmp_path / "venv" / "lib" / "site-packages"
    # an ordinary installed library, in site-packages
    (site_packages / "instlib").mkdir(parents=True)
    (site_packages / "instlib" / "__init__.py").write_text("def f(x):\n    return x + 1\n")
    _dist_info(site_packages, "instlib", "1.0", ["instlib/__init__.py"], editable=False, top="instlib")
    # a modern editable install: a .pth in site-packages pointing at the project's source
    source = tmp_path / "checkout" / "src"
    (source / "edpkg").mkdir(parents=True)
    (source / "edpkg" / "__init__.py").write_text("__version__ = '0.3'\ndef f(x):\n    return x + 1\n")
    (site_packages / "__editable__.edpkg-0.3.pth").write_text(str(source) + "\n")
    _dist_info(site_packages, "edpkg", "0.3", ["__editable__.edpkg-0.3.pth"], editable=True, top="edpkg")
    # an editable install whose files sit in site-packages: direct_url.json decides
    (site_packages / "inplace").mkdir()
    (site_packages / "inplace" / "__init__.py").write_text("def f(x):\n    return x\n")
    _dist_info(site_packages, "inplace", "2.0", ["inplace/__init__.py"], editable=True, top="inplace")
    # ``pip install --target``: no site-packages folder, but the RECORD lists the file
    target = tmp_path / "target"
    (target / "tgtlib").mkdir(parents=True)
    (target / "tgtlib" / "__init__.py").write_text("def f(x):\n    return x\n")
    _dist_info(target, "tgtlib", "3.1", ["tgtlib/__init__.py"], editable=False, top="tgtlib")

    monkeypatch.setattr(sys, "path", list(sys.path))
    site.addsitedir(str(site_packages))
    sys.path.insert(0, str(target))
    importlib.invalidate_caches()
    for name in ("instlib", "edpkg", "inplace", "tgtlib"):
        importlib.import_module(name)
    assert Path(sys.modules["edpkg"].__file__).is_relative_to(source)

    assert not is_user_module("instlib") and distribution_version("instlib") == ("instlib", "1.0")
    assert is_user_module("edpkg"), "pip install -e: the code lives in the project"
    assert is_user_module("inplace"), "direct_url.json says editable"
    assert not is_user_module("tgtlib") and distribution_version("tgtlib") == ("tgtlib", "3.1")

    # libraries by name and version: editing an installed file does not count, editable code does
    lib_before, ed_before = fingerprint(sys.modules["instlib"].f), fingerprint(sys.modules["edpkg"].f)
    (site_packages / "instlib" / "__init__.py").write_text("def f(x):\n    return x + 2\n")
    (source / "edpkg" / "__init__.py").write_text("__version__ = '0.3'\ndef f(x):\n    return x + 2\n")
    importlib.reload(sys.modules["instlib"]), importlib.reload(sys.modules["edpkg"])
    assert fingerprint(sys.modules["instlib"].f) == lib_before
    assert fingerprint(sys.modules["edpkg"].f) != ed_before


def test_a_library_counts_by_its_distribution_version(tmp_path, files):
    site_packages = tmp_path / "lib" / "site-packages"
    (site_packages / "verlib").mkdir(parents=True)
    (site_packages / "verlib" / "__init__.py").write_text("def f(x):\n    return x\n")
    _dist_info(site_packages, "verlib", "1.0", ["verlib/__init__.py"], editable=False, top="verlib")
    script = """
        from dreamer_magic.fingerprint import fingerprint, is_user_module
        import verlib
        assert not is_user_module("verlib")
        print(fingerprint(verlib.f), fingerprint(verlib))
    """
    first = files.run(script, site_packages)
    assert files.run(script, site_packages) == first
    info = site_packages / "verlib-1.0.dist-info"
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: verlib\nVersion: 1.1\n")
    upgraded = files.run(script, site_packages)
    assert upgraded.split()[0] != first.split()[0] and upgraded.split()[1] != first.split()[1]


# -- 2. user code by the code that actually runs -------------------------------------------------

HELPERS = """
    import re

    SPACES = re.compile(r"\\s+")
    LIMIT = 3

    def clean(text):
        return SPACES.sub(" ", text).strip()[:LIMIT]
"""


def test_a_local_module_counts_by_its_loaded_code(shell, files):
    path = files.write("helpers.py", HELPERS)
    fn = notebook_function(shell, "import helpers\ndef prepare(x):\n    return helpers.clean(x)\n", "prepare")
    first = fingerprint(fn)
    assert fingerprint(fn) == first

    path.write_text(textwrap.dedent(HELPERS).replace("[:LIMIT]", "[:LIMIT].upper()"))
    assert fingerprint(fn) == first, "edited on disk but not reloaded: the old code still runs"

    importlib.reload(sys.modules["helpers"])
    changed = fingerprint(fn)
    assert changed != first, "reloaded: the new code runs"

    path.write_text(textwrap.dedent(HELPERS).replace("[:LIMIT]", "[:LIMIT].upper()  # shout\n\n# the end"))
    importlib.reload(sys.modules["helpers"])
    assert fingerprint(fn) == changed, "a comment-only edit does not count"

    path.write_text(textwrap.dedent(HELPERS).replace("LIMIT = 3", "LIMIT = 4").replace("[:LIMIT]", "[:LIMIT].upper()"))
    importlib.reload(sys.modules["helpers"])
    assert fingerprint(fn) != changed, "a module constant the code uses counts"


def test_a_fresh_process_sees_the_edited_file(files):
    path = files.write("helpers.py", HELPERS)
    script = """
        import helpers
        from dreamer_magic.fingerprint import fingerprint
        def prepare(x):
            return helpers.clean(x)
        print(fingerprint(prepare), fingerprint(helpers.clean), fingerprint(helpers))
    """
    first = files.run(script)
    assert files.run(script) == first, "the same code fingerprints alike in another process"
    path.write_text(textwrap.dedent(HELPERS) + "\n# a trailing comment\n\n\n")
    assert files.run(script) == first, "comments and blank lines do not count"
    path.write_text(textwrap.dedent(HELPERS).replace('" "', '"_"'))
    after = files.run(script).split()
    assert all(a != b for a, b in zip(after, first.split())), "a restart loads the edited code"


def test_an_edited_file_not_reloaded_hashes_as_the_code_that_was_loaded(files):
    """Edited before anything was fingerprinted: the digest is still that of the loaded code,
    the same a fresh process gets from the original file, never that of the file on disk."""
    path = files.write("helpers.py", HELPERS)
    helpers = files.load("helpers")
    path.write_text(textwrap.dedent(HELPERS).replace('" "', '"-"'))
    loaded = fingerprint(helpers.clean), fingerprint(helpers)
    script = """
        import helpers
        from dreamer_magic.fingerprint import fingerprint
        print(fingerprint(helpers.clean), fingerprint(helpers))
    """
    edited = tuple(files.run(script).split())
    path.write_text(textwrap.dedent(HELPERS))
    original = tuple(files.run(script).split())
    assert loaded == original != edited


def test_user_code_is_followed_transitively(shell, files):
    files.write("othermod.py", "def h(x):\n    return x * 2\n")
    files.write(
        "chain.py",
        """
        import othermod

        def g(x):
            return othermod.h(x) + 1

        def f(x):
            return g(x) - 1

        def unrelated():
            return 0
        """,
    )
    fn = notebook_function(shell, "import chain\ndef cell_fn(x):\n    return chain.f(x)\n", "cell_fn")
    first = fingerprint(fn)
    files.write("othermod.py", "def h(x):\n    return x * 3\n")
    assert fingerprint(fn) == first, "not reloaded yet"
    importlib.reload(sys.modules["othermod"])
    assert fingerprint(fn) != first, "cell_fn -> chain.f -> chain.g -> othermod.h changed"


def test_imports_inside_functions_and_from_imports_are_followed(files):
    files.write("leaf.py", "def h(x):\n    return x + 1\n")
    files.write(
        "uses.py",
        """
        from leaf import h

        def lazy(x):
            import leaf
            return leaf.h(x)

        def direct(x):
            return h(x)
        """,
    )
    script = """
        import uses
        from dreamer_magic.fingerprint import fingerprint
        print(fingerprint(uses.lazy), fingerprint(uses.direct))
    """
    first = files.run(script).split()
    files.write("leaf.py", "def h(x):\n    return x + 2\n")
    after = files.run(script).split()
    assert after[0] != first[0], "a module imported inside the function"
    assert after[1] != first[1], "a function bound by `from leaf import h`"


def test_recursion_and_mutual_recursion_across_modules(files):
    files.write("ping.py", "import pong\n\ndef ping(n):\n    return 0 if n == 0 else pong.pong(n - 1)\n")
    files.write("pong.py", "import ping\n\ndef pong(n):\n    return 1 if n == 0 else ping.ping(n - 1)\n")
    ping = files.load("ping")
    first = fingerprint(ping.ping)
    assert fingerprint(ping.ping) == first == fingerprint(sys.modules["ping"].ping)
    files.write("pong.py", "import ping\n\ndef pong(n):\n    return 2 if n == 0 else ping.ping(n - 1)\n")
    importlib.reload(sys.modules["pong"])
    assert fingerprint(ping.ping) != first


def test_a_user_module_read_by_a_cell_counts_by_its_code(shell, files):
    files.write("helpers.py", textwrap.dedent(HELPERS) + "\nclass Cleaner:\n    def __call__(self, x):\n        return clean(x)\n")
    shell.run_cell("import helpers")
    module = shell.user_ns["helpers"]
    first = fingerprint(module)
    files.write("helpers.py", textwrap.dedent(HELPERS) + "\nclass Cleaner:\n    def __call__(self, x):\n        return clean(x) * 2\n")
    importlib.reload(module)
    assert fingerprint(module) != first, "a method of a class in the module changed"
    import numpy

    assert fingerprint(numpy) == fingerprint(numpy), "a library module by name and version"


def test_module_code_keeping_a_lock_counts_it_by_type_and_says_so(shell, files):
    files.write("locked.py", "import threading\n_lock = threading.Lock()\n\ndef f(x):\n    with _lock:\n        return x\n")
    module = files.load("locked")
    digest, untracked = fingerprint_untracked(module.f)
    assert digest == fingerprint(module.f)
    assert len(untracked) == 1 and "_lock" in untracked[0] and "lock" in untracked[0]
    notebook = notebook_function(shell, "import threading\nlock = threading.Lock()\ndef g():\n    return lock\n", "g")
    with pytest.raises(FingerprintError, match="lock"):
        fingerprint(notebook)


# -- 3. real global loads only -------------------------------------------------------------------


def test_attribute_names_are_not_globals(shell):
    fn = notebook_function(shell, "size = 1\ndef area(r):\n    return r.size * r.width\n", "area")
    assert code_global_names(fn.__code__) == set()
    first = fingerprint(fn)
    shell.run_cell("size = 2")
    assert fingerprint(fn) == first, "`r.size` does not read the global `size`"
    uses = notebook_function(shell, "scale = 2\ndef scaled(xs):\n    return [x * scale for x in xs]\n", "scaled")
    before = fingerprint(uses)
    shell.run_cell("scale = 3")
    assert fingerprint(uses) != before, "a global read inside a comprehension counts"


# -- 4. notebook classes: every method counts, dunders included -------------------------------------

PLAIN = """
class Scaler:
    factor = 2

    def __init__(self, k):
        self.k = k

    def __call__(self, x):
        return x * self.k * self.factor

    def __repr__(self):
        return f"Scaler({self.k})"

    @property
    def double(self):
        return self.k * 2

    @staticmethod
    def unit():
        return 1

    @classmethod
    def make(cls):
        return cls(1)
"""


@pytest.mark.parametrize(
    "edit",
    [
        ("self.k = k", "self.k = k + 1"),
        ("return x * self.k * self.factor", "return x + self.k * self.factor"),
        ('f"Scaler({self.k})"', 'f"S({self.k})"'),
        ("return self.k * 2", "return self.k * 3"),
        ("return 1\n", "return 2\n"),
        ("return cls(1)", "return cls(2)"),
        ("factor = 2", "factor = 3"),
    ],
    ids=["__init__", "__call__", "__repr__", "property", "staticmethod", "classmethod", "attribute"],
)
def test_every_member_of_a_notebook_class_counts(shell, edit):
    first = fingerprint(notebook_function(shell, PLAIN, "Scaler"))
    again = fingerprint(notebook_function(shell, PLAIN.replace("    def __init__", "    # comment\n\n    def __init__"), "Scaler"))
    assert again == first, "comments and blank lines do not count"
    changed = notebook_function(shell, PLAIN.replace(*edit), "Scaler")
    assert fingerprint(changed) != first
    assert fingerprint(changed(1)) != fingerprint(notebook_function(shell, PLAIN, "Scaler")(1)), "its instances too"


DATACLASS = """
from dataclasses import dataclass, field

@dataclass
class Config:
    lr: float = 0.1
    tags: list = field(default_factory=list)

    def __post_init__(self):
        self.lr = float(self.lr)
"""


@pytest.mark.parametrize(
    "edit",
    [
        ("self.lr = float(self.lr)", "self.lr = float(self.lr) * 2"),
        ("lr: float = 0.1", "lr: float = 0.2"),
        ("@dataclass\n", "@dataclass(frozen=True)\n"),
        ("field(default_factory=list)", "field(default_factory=list, compare=False)"),
        ("    tags: list", "    extra: int = 0\n    tags: list"),
    ],
    ids=["__post_init__", "default", "frozen", "field-option", "new-field"],
)
def test_dataclasses_count_their_fields_params_and_methods(shell, edit):
    first = fingerprint(notebook_function(shell, DATACLASS, "Config"))
    assert fingerprint(notebook_function(shell, DATACLASS, "Config")) == first, "re-running the same cell"
    assert fingerprint(notebook_function(shell, DATACLASS.replace(*edit), "Config")) != first


MODULE = """
import torch
from torch import nn

class Block(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, x):
        return torch.relu(self.linear(x))

class Net(Block):
    def __call__(self, x):
        return super().__call__(x)
"""


@pytest.mark.parametrize(
    "edit",
    [
        ("nn.Linear(width, width)", "nn.Linear(width, width, bias=False)"),
        ("torch.relu(self.linear(x))", "torch.tanh(self.linear(x))"),
        ("return super().__call__(x)", "return super().__call__(x) * 2"),
    ],
    ids=["base __init__", "base forward", "subclass __call__"],
)
def test_nn_module_subclasses_and_their_user_bases(shell, edit):
    pytest.importorskip("torch")
    first = fingerprint(notebook_function(shell, MODULE, "Net"))
    assert fingerprint(notebook_function(shell, MODULE, "Net")) == first
    assert fingerprint(notebook_function(shell, MODULE.replace(*edit), "Net")) != first


def test_classes_in_module_files_count_by_their_loaded_code(files):
    path = files.write("shapes.py", "class Square:\n    def __init__(self, s):\n        self.s = s\n\n    def area(self):\n        return self.s ** 2\n")
    module = files.load("shapes")
    first = fingerprint(module.Square(2))
    path.write_text("class Square:\n    def __init__(self, s):\n        self.s = s * 2\n\n    def area(self):\n        return self.s ** 2\n")
    assert fingerprint(module.Square(2)) == first, "not reloaded"
    importlib.reload(module)
    assert fingerprint(module.Square(2)) != first, "__init__ changed"


# -- 5. torch models by structure and hyperparameters ---------------------------------------------


def _net(p: float = 0.1, eps: float = 1e-5, act: str = "relu"):
    import torch
    from torch import nn

    torch.manual_seed(0)
    activation = nn.ReLU() if act == "relu" else nn.GELU()
    return nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4, eps=eps), activation, nn.Dropout(p))


def test_models_by_structure_hyperparameters_and_mode():
    pytest.importorskip("torch")
    base = fingerprint(_net())
    assert fingerprint(_net()) == base
    assert fingerprint(_net(p=0.3)) != base, "dropout p"
    assert fingerprint(_net(eps=1e-6)) != base, "eps"
    assert fingerprint(_net(act="gelu")) != base, "activation"
    model = _net()
    model.eval()
    assert fingerprint(model) != base, "eval mode differs from train mode"
    assert model_fingerprint(model, mode=False) == model_fingerprint(_net(), mode=False), "mode left out"
    model.train()
    assert fingerprint(model) == base


def test_the_memo_sees_hyperparameters_change_in_place():
    pytest.importorskip("torch")
    model = _net()
    first = fingerprint(model)
    model[3].p = 0.5
    assert fingerprint(model) != first, "the memo must not return the old digest"
    model[3].p = 0.1
    assert fingerprint(model) == first
    model[1].eps = 1e-3
    assert fingerprint(model) != first


def test_activation_functions_stored_as_attributes_count():
    torch = pytest.importorskip("torch")
    from torch import nn

    class Mlp(nn.Module):
        def __init__(self, act):
            super().__init__()
            torch.manual_seed(0)
            self.linear = nn.Linear(2, 2)
            self.act = act

        def forward(self, x):
            return self.act(self.linear(x))

    relu = fingerprint(Mlp(torch.nn.functional.relu))
    assert relu == fingerprint(Mlp(torch.nn.functional.relu))
    assert relu != fingerprint(Mlp(torch.nn.functional.gelu))


# -- 6. lru_cache functions and library callables ------------------------------------------------


def test_lru_cache_functions_by_wrapped_code_and_parameters(shell):
    source = "import functools\n@functools.lru_cache(maxsize=8)\ndef square(x):\n    return x * x\n"
    first = fingerprint(notebook_function(shell, source, "square"))
    fn = shell.user_ns["square"]
    fn(3)  # filling the cache does not count
    assert fingerprint(fn) == first
    assert fingerprint(notebook_function(shell, source.replace("maxsize=8", "maxsize=16"), "square")) != first
    assert fingerprint(notebook_function(shell, source.replace("x * x", "x ** 3"), "square")) != first
    cached = notebook_function(shell, "@functools.cache\ndef cube(x):\n    return x ** 3\n", "cube")
    assert fingerprint(cached) != fingerprint(notebook_function(shell, source, "square"))


def test_library_callables_by_qualified_name_in_any_process(files):
    np = pytest.importorskip("numpy")
    torch = pytest.importorskip("torch")
    callables = (np.add, np.multiply, np.sum, np.mean, torch.nn.functional.relu, torch.relu, len, sum)
    here = [fingerprint(v) for v in callables]
    assert len(set(here)) == len(here)
    script = """
        import numpy as np, torch
        from dreamer_magic.fingerprint import fingerprint
        callables = (np.add, np.multiply, np.sum, np.mean, torch.nn.functional.relu, torch.relu, len, sum)
        print(" ".join(fingerprint(v) for v in callables))
    """
    assert files.run(script).split() == here, "never by repr or id"


def test_two_lambdas_on_one_line_differ(shell):
    shell.run_cell("first, second = (lambda x: x + 1), (lambda x: x + 2)")
    assert fingerprint(shell.user_ns["first"]) != fingerprint(shell.user_ns["second"])


def test_a_model_reached_from_its_own_attributes_and_patched_methods():
    pytest.importorskip("torch")
    model = _net()
    first = fingerprint(model)
    real = model.forward

    def counting(*args, **kwargs):  # instrumentation: a closure over the model's own method
        return real(*args, **kwargs)

    model.forward = counting
    assert fingerprint(model) == first, "a method patched on the instance does not count"
    model.helper = real  # a module's method stored under another name
    model.hook = counting
    assert fingerprint(model) == fingerprint(model), "no endless recursion"
    del model.forward, model.helper, model.hook
    assert fingerprint(model) == first


def test_decorated_functions_count_by_the_code_that_runs(shell, files):
    pytest.importorskip("torch")
    source = "import torch\n@torch.no_grad()\ndef infer(x):\n    return x * 2\n"
    first = fingerprint(notebook_function(shell, source, "infer"))
    assert fingerprint(notebook_function(shell, source.replace("x * 2", "x * 3"), "infer")) != first, (
        "a library decorator's wrapper: the user function it wraps counts"
    )
    step_source = "from dreamer_magic import step\n@step('tok')\ndef tok(text):\n    return text.split()\n"
    stepped = fingerprint(notebook_function(shell, step_source, "tok"))
    assert fingerprint(notebook_function(shell, step_source.replace("split()", "split(',')"), "tok")) != stepped

    decorator = """
        import functools
        import numpy as np

        def logged(fn):
            @functools.wraps(fn)
            def wrapper(*args):
                return fn(*args)
            return wrapper

        total = logged(np.sum)
    """
    path = files.write("deco.py", decorator)
    module = files.load("deco")
    before = fingerprint(module.total)
    assert module.total.__module__ == "numpy", "functools.wraps took the library's module"
    path.write_text(textwrap.dedent(decorator).replace("return fn(*args)", "return fn(*args) + 1"))
    importlib.reload(module)
    assert fingerprint(module.total) != before, "a user decorator around a library function: its code counts"
