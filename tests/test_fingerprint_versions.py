"""A whole step's fingerprint is the same under every Python from 3.10 to 3.13.

Upgrading Python must not re-run every step (SPEC §3: code fingerprints are "stable across
Python versions"). The same step (a cell using f-strings, walrus, match, decorators, lambdas,
comprehensions and type hints, with plain input values) is fingerprinted by a small script
under each interpreter, in a venv under ``.venv-fingerprint/<version>`` that holds only what
``import dreamer_magic.steps`` needs; every digest must equal the pinned one.

``scripts/setup.sh`` creates those venvs; this test creates one that is missing. A Python
that is not installed skips its case, except under CI (``CI`` set), where it fails.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VENVS = ROOT / ".venv-fingerprint"
VERSIONS = ("3.10", "3.11", "3.12", "3.13")
PACKAGES = ("xxhash", "filelock")  # all that `import dreamer_magic.steps` needs

# Pinned, like tests/test_fingerprint.py's GOLDEN: a change here means every user's steps
# re-run, so it changes only with fingerprint.FORMAT_VERSION or the step components, on purpose.
GOLDEN_SOURCE = "00a0cec600028b3332d8f2722c8d284d"
GOLDEN_STEP = "87a7f3780e1cfeac69a62080b5e72b52"

CELL = '''\
import functools
from collections import Counter as C

THRESHOLD: float = 0.5  # a comment


@functools.lru_cache(maxsize=None)
def score(text: str, *, scale: int = 2, **extra: object) -> float:
    """Length, scaled."""
    return len(text) * scale / 3


class Point:
    x: int = 0

    def __init__(self, x: int, y: int = 0, /) -> None:
        self.x, self.y = x, y

    @property
    def norm(self) -> float:
        return (self.x ** 2 + self.y ** 2) ** 0.5


labels = {w: i for i, w in enumerate(words) if (n := len(w)) > 1}
counts = C(ch for w in words for ch in w)
msg = f"{len(labels)!r:>{width}} labels, {THRESHOLD=}, {{braces}} {n:} {'nested' + f'{n}'}" f"" u"!"
msg2 = f"a{{b" f"c" "d" f"{words!s}{width!a}" f"{THRESHOLD:{width}.{2}f}" rf"\\d{n}"
raw = rb"\\x00" b"a"
match labels:
    case {"a": 1, **rest}:
        kind = "a"
    case [1, *others] if others:
        kind = "list"
    case Point(x=0, y=_) | None:
        kind = "point"
    case str() as s:
        kind = s
    case _:
        kind = None
key = lambda item, *a, d=1, **k: (item[1], -item[0])
pairs: list[tuple[int, str]] = sorted(((v, k) for k, v in labels.items()), key=key)[::2]
big = 123456789012345678901234567890 * 0x1F + 1e10 + 1j
try:
    ratio = THRESHOLD / len(words)
except (ZeroDivisionError, TypeError) as e:
    raise RuntimeError("no words") from e
finally:
    done = True
with open(__file__) as a, open(__file__) as b:
    pass
print(score(msg), *pairs, sep="\\n", end="")
'''

SCRIPT = r'''
import json, sys
sys.path.insert(0, sys.argv[1])
import datetime, decimal, fractions, pathlib, uuid
from dreamer_magic.fingerprint import FORMAT_VERSION, fingerprint, normalise_source
from dreamer_magic.steps import StepSpec, components_of, fingerprint_of

inputs = {
    "words": ["a", "bb", "ccc", "héllo"],
    "width": 10,
    "threshold": 0.5,
    "cfg": {"b": 1, "a": (2, None, True), "s": {"x", "y", "z"}, "raw": b"\x00\xff"},
    "big": -(7 ** 6000),
    "ratio": 1.5 + 2j,
    "when": datetime.datetime(2024, 10, 27, 2, 30, fold=1, tzinfo=datetime.timezone.utc),
    "day": datetime.date(2024, 2, 29),
    "price": decimal.Decimal("1.10"),
    "share": fractions.Fraction(1, 3),
    "id": uuid.UUID(int=7),
    "path": pathlib.PurePosixPath("data/train.csv"),
}
spec = StepSpec(name="golden step", source=sys.stdin.read(), inputs=inputs, outputs=["labels", "msg"], version="1")
components = components_of(spec)
print(json.dumps({
    "python": sys.version.split()[0],
    "format": FORMAT_VERSION,
    "canonical": fingerprint(normalise_source(spec.source)),
    "inputs": components["inputs"],
    "step": fingerprint_of(components),
}))
'''


def _missing(message: str) -> None:
    """A missing interpreter or venv: a failure under CI (which must have them), a skip elsewhere."""
    if os.environ.get("CI"):
        pytest.fail(f"{message} (CI is set: CI machines must have Python 3.10-3.13 through pyenv)", pytrace=False)
    pytest.skip(message)


def interpreter(version: str) -> Path | None:
    """The newest installed patch release of ``version``: pyenv's, else ``pythonX.Y`` on PATH."""
    root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))

    def patch(path: Path) -> int:
        tail = path.parent.parent.name.rsplit(".", 1)[-1]
        return int(tail) if tail.isdigit() else -1

    found = sorted(root.glob(f"versions/{version}.*/bin/python"), key=patch)
    if found:
        return found[-1]
    on_path = shutil.which(f"python{version}")
    return Path(on_path) if on_path else None


def venv_python(version: str) -> Path:
    """``.venv-fingerprint/<version>/bin/python``, created (with :data:`PACKAGES`) if missing."""
    python = VENVS / version / "bin" / "python"
    probe = [str(python), "-c", "import " + ", ".join(PACKAGES)]
    if python.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return python
    base = interpreter(version)
    if base is None:
        _missing(f"Python {version} is not installed: no pyenv version {version}.* and no python{version} on PATH")
    VENVS.mkdir(exist_ok=True)
    with open(VENVS / ".lock", "w") as lock:  # two test processes must not build one venv at once
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (python.exists() and subprocess.run(probe, capture_output=True).returncode == 0):
            steps = [
                [str(base), "-m", "venv", "--clear", str(VENVS / version)],
                [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *PACKAGES],
            ]
            for step in steps:
                done = subprocess.run(step, capture_output=True, text=True)
                if done.returncode != 0:
                    _missing(f"could not build the Python {version} venv ({' '.join(step)}): {done.stderr[-500:]}")
    return python


def step_digests(python: str | Path) -> dict:
    """Run :data:`SCRIPT` isolated (``-I``: no PYTHONPATH, no user site; hash seeds random)."""
    done = subprocess.run(
        [str(python), "-I", "-c", SCRIPT, str(ROOT)],
        input=CELL,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.parametrize("version", VERSIONS)
def test_step_fingerprint_is_the_same_under_every_python(version):
    result = step_digests(venv_python(version))
    assert result["python"].startswith(version + ".")
    this_python = step_digests(sys.executable)
    assert result["inputs"] == this_python["inputs"], "each input fingerprints alike"
    assert result["canonical"] == GOLDEN_SOURCE, "the cell's code fingerprints alike"
    assert result["step"] == GOLDEN_STEP


def test_step_fingerprint_under_this_python_is_pinned():
    """Runs without pyenv: the pinned digests hold for the interpreter running the tests."""
    result = step_digests(sys.executable)
    assert result["format"] == 2
    assert (result["canonical"], result["step"]) == (GOLDEN_SOURCE, GOLDEN_STEP)


def test_the_cell_parses_on_the_oldest_python():
    """The cell must exercise real 3.10 syntax, not fall back to line-by-line hashing."""
    import ast

    from dreamer_magic.fingerprint import normalise_source

    ast.parse(CELL, feature_version=(3, 10))
    assert normalise_source(CELL).startswith("Module(")
