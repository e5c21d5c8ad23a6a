"""The shape of the package (STYLE.md, docs/ARCHITECTURE.md): each module imports only those above it.

Imports inside functions count too (a lazy import is still a dependency), so a cycle cannot
hide behind one. Only widgets.py, frontend.py and magics.py may import IPython or ipywidgets.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "dreamer_magic"

# Top to bottom: a module may import only modules listed before it.
ORDER = [
    "errors",
    "events",
    "status",
    "render",
    "fingerprint",
    "cell",
    "integrity",
    "dependencies",
    "folders",
    "storage",
    "remote",
    "cache",
    "models",
    "backends",
    "steps",
    "checkpoints",
    "checkpointer",
    "hf_trainer",
    "trainers",
    "distributed",
    "widgets",
    "frontend",
    "magics",
]
NOTEBOOK_SIDE = {"widgets", "frontend", "magics"}


def _modules() -> dict[str, list[Path]]:
    out: dict[str, list[Path]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        if rel.name == "__init__.py" and len(rel.parts) == 1:
            continue
        out.setdefault(rel.parts[0].removesuffix(".py"), []).append(path)
    return out


def _imports(path: Path) -> tuple[set[str], set[str]]:
    """(sibling modules imported, top-level external packages imported) by one file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    inside_package = len(path.relative_to(PACKAGE).parts) > 1
    siblings, external = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0:
                external.add((node.module or "").split(".")[0])
                continue
            depth = node.level - (1 if inside_package else 0)  # levels above the package root
            parts = (node.module or "").split(".") if node.module else []
            if depth == 0 and inside_package:  # `from .x import y` inside a subpackage: same subpackage
                continue
            if parts:
                siblings.add(parts[0])
            else:
                siblings.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                name = alias.name
                if name.startswith("dreamer_magic."):
                    siblings.add(name.split(".")[1])
                external.add(name.split(".")[0])
    siblings.discard("__version__")
    return siblings, external


def test_every_module_has_a_place_in_the_order():
    assert sorted(_modules()) == sorted(m for m in ORDER if m in _modules()), set(_modules()) - set(ORDER)


def test_each_module_imports_only_modules_above_it():
    rank = {name: i for i, name in enumerate(ORDER)}
    wrong = []
    for module, files in _modules().items():
        for path in files:
            siblings, _ = _imports(path)
            for other in sorted(siblings):
                if other not in rank:
                    wrong.append(f"{path.name} imports unknown module {other}")
                elif rank[other] >= rank[module]:
                    wrong.append(f"{path.relative_to(PACKAGE)} imports {other}, which is not above it")
    assert not wrong, "\n".join(wrong)


def test_only_the_notebook_side_imports_ipython():
    wrong = []
    for module, files in _modules().items():
        if module in NOTEBOOK_SIDE:
            continue
        for path in files:
            _, external = _imports(path)
            bad = external & {"IPython", "ipywidgets", "ipykernel", "traitlets"}
            if bad:
                wrong.append(f"{path.relative_to(PACKAGE)} imports {sorted(bad)}")
    assert not wrong, "\n".join(wrong)


def test_the_core_works_without_ipython():
    """A step runs in a process where IPython cannot be imported at all."""
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('IPython', 'ipywidgets', 'ipykernel'):\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import os, tempfile\n"
        "from dreamer_magic import folders, step\n"
        "folders.set_output_folder(tempfile.mkdtemp())\n"
        "@step('double')\n"
        "def double(x):\n"
        "    return x * 2\n"
        "assert double(21) == 42 and double(21) == 42\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[-1] == "ok"
    assert any("step double: ran" in line for line in lines) and any("step double: loaded from disk" in line for line in lines), (
        "@step in a plain script prints its status line, and a hit says so"
    )
