"""Every notebook in notebooks/ runs top to bottom offline, and a second run is all hits.

Each notebook is executed twice with nbclient against the same output folder (``DREAMER_OUTPUT``,
a temporary folder), each time in a fresh kernel on the standard ``python3`` kernelspec, as a
user would open it:

1. the first run computes; any error fails the test, except in a cell tagged
   ``raises-exception`` (a simulated crash, e.g. to show a trainer resuming);
2. the second run must load every step and trainer from disk (or restore it from a backup),
   print exactly what the first run printed, add nothing to the generation caches, and spend
   less time in the dreamer cells.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from datetime import datetime
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
HIT_STATES = ("loaded from disk", "restored from backup", "loaded from remote")
# widgets.status_text: "[dreamer] step clean: loaded from disk in 5 ms (saved 503 ms) — outputs: ..."
STATUS_LINE = re.compile(
    r"^\[dreamer\] (?:step|trainer) [^:]+: "
    r"(ran|loaded from disk|restored from backup|loaded from remote|resumed from \S+|failed|interrupted|running|waiting for another kernel)\b"
)
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"


def _ids(paths):
    return [p.stem for p in paths]


def is_dreamer_cell(cell) -> bool:
    return cell.cell_type == "code" and cell.source.lstrip().startswith(("%%dreamer_step", "%%dreamer_train"))


def expected_to_fail(cell) -> bool:
    """A cell tagged ``raises-exception`` (a simulated crash) may fail on the first run."""
    return "raises-exception" in cell.metadata.get("tags", [])


def status_outputs(cell) -> list[str]:
    """The text/plain of each dreamer status shown by a cell (``[dreamer] step x: ran in 1.2 s``)."""
    out = []
    for o in cell.get("outputs", []):
        text = o.get("data", {}).get("text/plain", "") if o.output_type in ("display_data", "execute_result") else ""
        if isinstance(text, list):
            text = "".join(text)
        if text.startswith("[dreamer] "):
            out.append(text)
    return out


def state_of(status_text: str) -> str:
    first = status_text.splitlines()[0]
    m = STATUS_LINE.match(first)
    assert m, f"unrecognised status line: {first!r}"
    return m.group(1)


def printed(cell) -> str:
    """What the cell printed to stdout."""
    return "".join(o.text for o in cell.get("outputs", []) if o.output_type == "stream" and o.name == "stdout")


def rich_outputs(cell) -> list[str]:
    """The text/plain of each rich output that is not a dreamer status (results, displays, replays)."""
    out = []
    for o in cell.get("outputs", []):
        if o.output_type not in ("display_data", "execute_result"):
            continue
        if WIDGET_MIME in o.get("data", {}):
            continue
        if o.get("metadata", {}).get("dreamer_magic_widget_final_state"):
            continue  # a live widget of the first run (skipped above), replayed in its final state
        text = o["data"].get("text/plain", "")
        text = "".join(text) if isinstance(text, list) else text
        if not text.startswith("[dreamer] "):
            out.append(text)
    return out


def cell_seconds(cell) -> float:
    timing = cell.metadata.get("execution", {})
    start, end = timing.get("iopub.execute_input"), timing.get("shell.execute_reply")
    assert start and end, f"no timing recorded for cell {cell.source[:60]!r}"
    return (datetime.fromisoformat(end.replace("Z", "+00:00")) - datetime.fromisoformat(start.replace("Z", "+00:00"))).total_seconds()


def cache_rows(output: Path) -> dict[str, int]:
    """Rows stored in each generation-cache database under ``output/.cache``."""
    import sqlite3

    rows = {}
    for db in sorted((output / ".cache").glob("*.sqlite")):
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            tables = [r[0] for r in con.execute("select name from sqlite_master where type='table' and name not like 'sqlite_%'")]
            rows[db.name] = sum(con.execute(f'select count(*) from "{t}"').fetchone()[0] for t in tables)
        finally:
            con.close()
    return rows


def execute(path: Path, workdir: Path) -> tuple[nbformat.NotebookNode, float]:
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb,
        kernel_name="python3",
        timeout=180,
        startup_timeout=120,
        record_timing=True,
        resources={"metadata": {"path": str(workdir)}},
    )
    start = time.perf_counter()
    client.execute()  # a fresh kernel each call; raises CellExecutionError on the first error
    return nb, time.perf_counter() - start


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Execute each notebook twice (fresh kernel each time, same output folder); cache the results."""
    cache: dict[str, tuple] = {}

    def get(path: Path):
        if path.name not in cache:
            workdir = tmp_path_factory.mktemp(path.stem)
            shutil.copy(path, workdir / path.name)
            output = workdir / "dreamer-output"
            old = os.environ.get("DREAMER_OUTPUT")
            os.environ["DREAMER_OUTPUT"] = str(output)
            try:
                first = execute(workdir / path.name, workdir)
                rows = cache_rows(output)
                second = execute(workdir / path.name, workdir)
            finally:
                if old is None:
                    os.environ.pop("DREAMER_OUTPUT", None)
                else:
                    os.environ["DREAMER_OUTPUT"] = old
            assert not (workdir / "output").exists(), "the notebook ignored DREAMER_OUTPUT and wrote ./output"
            cache[path.name] = (first, second, output, rows)
        return cache[path.name]

    return get


def test_there_are_notebooks():
    names = {p.name for p in NOTEBOOKS}
    assert "steps.ipynb" in names and "quickstart.ipynb" in names, names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_is_stored_clean(path):
    """Stored without outputs, on the standard python3 kernel, loading the extension itself."""
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and "%load_ext dreamer_magic" in code[0].source
    assert "DREAMER_OUTPUT" in code[0].source, "the first cell must let the tests choose the output folder"
    for cell in code:
        assert cell.outputs == [] and cell.execution_count is None, f"stored with outputs: {cell.source[:60]!r}"
        assert "execution" not in cell.metadata, f"stored with timing metadata: {cell.source[:60]!r}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_second_run_is_all_hits(path, runs):
    (first, _), (second, _), output, _ = runs(path)
    dreamer_cells = [i for i, c in enumerate(first.cells) if is_dreamer_cell(c)]
    assert dreamer_cells, "a notebook without a dreamer cell tests nothing"
    for i in dreamer_cells:
        one, two = status_outputs(first.cells[i]), status_outputs(second.cells[i])
        where = f"cell {i} ({first.cells[i].source.splitlines()[0]!r})"
        assert len(one) == 1 and len(two) == 1, f"{where}: expected one status each run, got {one} / {two}"
        allowed = ("ran", *HIT_STATES, *(("failed", "interrupted") if expected_to_fail(first.cells[i]) else ()))
        assert state_of(one[0]) in allowed or state_of(one[0]).startswith("resumed from"), f"{where}: {one[0]}"
        assert state_of(two[0]) in HIT_STATES, f"{where}: the second run did not hit:\n{two[0]}"
    assert any(state_of(status_outputs(first.cells[i])[0]) == "ran" for i in dreamer_cells), "the first run ran nothing"
    assert output.is_dir() and any(output.iterdir()), "nothing was written to the output folder"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_second_run_prints_the_same(path, runs):
    (first, _), (second, _), *_ = runs(path)
    for i, (one, two) in enumerate(zip(first.cells, second.cells)):
        if one.cell_type == "code" and not expected_to_fail(one):
            assert printed(two) == printed(one), f"cell {i} printed differently on the second run: {one.source[:80]!r}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_second_run_shows_the_same_rich_outputs(path, runs):
    """Results and displays (tables, HTML) of a step are replayed on a hit (SPEC §3)."""
    (first, _), (second, _), *_ = runs(path)
    for i, (one, two) in enumerate(zip(first.cells, second.cells)):
        if is_dreamer_cell(one) and not expected_to_fail(one):
            assert rich_outputs(two) == rich_outputs(one), f"cell {i} showed different rich outputs on the second run: {one.source[:80]!r}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_second_run_is_faster(path, runs):
    (first, _), (second, _), *_ = runs(path)
    cells = [i for i, c in enumerate(first.cells) if is_dreamer_cell(c)]
    one = sum(cell_seconds(first.cells[i]) for i in cells)
    two = sum(cell_seconds(second.cells[i]) for i in cells)
    assert two < one, f"dreamer cells took {two:.2f} s on the second run, {one:.2f} s on the first"
    # How long a whole notebook takes is a benchmark (benchmarks/bench_tutorials.py), not a test:
    # a wall-clock bound fails on a loaded machine without anything being wrong.


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_second_run_reads_generations_from_the_cache(path, runs):
    """Model generations and embeddings made by the first run are read back, not recomputed."""
    _, _, output, after_first = runs(path)
    assert cache_rows(output) == after_first, "the second run added generation-cache databases or rows"
