"""Restart + Run All against the first run, for the tutorial notebooks (issue 10).

Each notebook is copied to a temporary folder and executed twice with nbclient, a fresh kernel
each time (a restart), against one output folder: the first run computes, the second should load
every step and trainer from disk. Printed per notebook: the whole run's wall time, the time spent
in the dreamer cells, and what each dreamer cell did on the second run.

    PYTHONPATH=$PWD HF_HUB_OFFLINE=1 python benchmarks/bench_tutorials.py [NOTEBOOK ...]

Default: every ``notebooks/tutorial_*.ipynb``.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import nbformat

REPO = Path(__file__).resolve().parents[1]


def _seconds(cell) -> float:
    timing = cell.metadata.get("execution", {})
    start, end = timing.get("iopub.execute_input"), timing.get("shell.execute_reply")
    if not (start and end):
        return 0.0
    parse = lambda s: datetime.fromisoformat(s.replace("Z", "+00:00"))  # noqa: E731
    return (parse(end) - parse(start)).total_seconds()


def _is_dreamer(cell) -> bool:
    return cell.cell_type == "code" and cell.source.lstrip().startswith(("%%dreamer_step", "%%dreamer_train"))


def _status(cell) -> str:
    for o in cell.get("outputs", []):
        text = o.get("data", {}).get("text/plain", "") if o.output_type in ("display_data", "execute_result") else ""
        text = "".join(text) if isinstance(text, list) else text
        if text.startswith("[dreamer] "):
            lines = text.splitlines()
            why = [line.strip() for line in lines[1:] if line.strip().startswith("why:")]
            return " ".join([lines[0][len("[dreamer] "):], *why])
    return "(no status)"


def run(path: Path, workdir: Path) -> tuple[nbformat.NotebookNode, float]:
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, kernel_name="python3", timeout=300, startup_timeout=120, record_timing=True,
                            resources={"metadata": {"path": str(workdir)}})
    start = time.perf_counter()
    client.execute()  # a fresh kernel per call
    return nb, time.perf_counter() - start


def bench(path: Path) -> None:
    with tempfile.TemporaryDirectory(prefix=f"bench-{path.stem}-") as tmp:
        workdir = Path(tmp)
        shutil.copy(path, workdir / path.name)
        os.environ["DREAMER_OUTPUT"] = str(workdir / "dreamer-output")
        first, t1 = run(workdir / path.name, workdir)
        second, t2 = run(workdir / path.name, workdir)
    cells = [i for i, c in enumerate(first.cells) if _is_dreamer(c)]
    d1 = sum(_seconds(first.cells[i]) for i in cells)
    d2 = sum(_seconds(second.cells[i]) for i in cells)
    print(f"{path.name}")
    print(f"  first run (kernel start + Run All): {t1:6.1f} s   dreamer cells {d1:6.2f} s")
    print(f"  restart + Run All:                  {t2:6.1f} s   dreamer cells {d2:6.2f} s   ({t1 / t2:.1f}x faster overall)")
    for i in cells:
        print(f"    {_seconds(first.cells[i]):6.2f} s -> {_seconds(second.cells[i]):5.2f} s  {_status(second.cells[i])}")


def main(argv: list[str]) -> None:
    paths = [Path(a) for a in argv] or sorted((REPO / "notebooks").glob("tutorial_*.ipynb"))
    for path in paths:
        bench(path.resolve())


if __name__ == "__main__":
    main(sys.argv[1:])
