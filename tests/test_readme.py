"""The README's tour runs as written, in a real IPython shell, and prints what the README shows.

Each ```python block is one cell (cell magics included), run in order in a fresh
``InteractiveShell`` whose working directory is a temporary folder (so the tour's default
``./output`` lands there). A ```text block right after a python block is that cell's expected
output: each of its lines must appear, in order, in what the cell printed or displayed, once
durations, sizes, fingerprints and dates are masked.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```\s*$", re.S | re.M)

_MASKS = [
    (re.compile(r"\d{4}-\d\d-\d\d[ T]\d\d:\d\d(:\d\d)?"), "<date>"),
    (re.compile(r"\b[0-9a-f]{8,}\b"), "<fingerprint>"),
    (re.compile(r"(<)?\d[\d.]* (B|KB|MB|GB|TB)\b"), "<size>"),
    (re.compile(r"(<)?\d[\d.]* (ms|s|min|h)\b( \d+ (s|min))?"), "<time>"),
    (re.compile(r"-{2,}"), "--"),
    (re.compile(r"\s+"), " "),
]


def mask(line: str) -> str:
    for pattern, repl in _MASKS:
        line = pattern.sub(repl, line)
    return line.strip()


def tour() -> list[tuple[str, str | None]]:
    """(python source, expected output or None) for each python block of the README."""
    blocks = [(m.group(1), m.group(2)) for m in FENCE.finditer(README.read_text())]
    cells = []
    for i, (lang, body) in enumerate(blocks):
        if lang == "python":
            expected = blocks[i + 1][1] if i + 1 < len(blocks) and blocks[i + 1][0] == "text" else None
            cells.append((body, expected))
    return cells


def test_readme_has_a_tour():
    cells = tour()
    assert len(cells) >= 4
    assert "%load_ext dreamer_magic" in cells[0][0]
    assert any(src.startswith("%%dreamer_step") for src, _ in cells)
    assert (README.parent / "docs" / "screenshot.png").name in README.read_text()


def test_readme_commands_match_the_scripts():
    text = README.read_text()
    assert "bash scripts/setup.sh" in text and ".venv/bin/python -m pytest" in text
    ci = (README.parent / ".ci" / "run").read_text()
    assert "bash scripts/setup.sh" in ci and ".venv/bin/python -m pytest" in ci


def test_readme_tour_runs(shell, tmp_path, capsys):
    for source, expected in tour():
        result = shell.run_cell(source, store_history=False)
        printed = capsys.readouterr().out
        assert result.success, f"README cell failed:\n{source}\n{result.error_before_exec or result.error_in_exec!r}\n{printed}"
        if expected is None:
            continue
        shown = printed + ("" if result.result is None else "\n" + str(result.result))
        got = [mask(line) for line in shown.splitlines() if line.strip()]
        pos = 0
        for line in (mask(x) for x in expected.splitlines() if x.strip()):
            try:
                pos = got.index(line, pos) + 1
            except ValueError:
                pytest.fail(f"README cell:\n{source}\nshould print {line!r}; it printed:\n{shown}")
    # the tour's default output folder is ./output under the working directory
    assert (tmp_path / "output" / "clean-reviews" / "step.json").is_file()
