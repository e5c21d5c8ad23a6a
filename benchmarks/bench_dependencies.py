"""Dependency tracing and checking: what it adds to a run and to a hit.

Run::

    HF_HUB_OFFLINE=1 PYTHONPATH=. .venv/bin/python benchmarks/bench_dependencies.py [--files 100] [--repeats 7]

Prints medians over ``--repeats`` runs (the machine is shared: medians, not minima):

* ``check()`` of N unchanged traced files (size and mtime only, nothing read), and of the whole
  record of a realistic body (files, a folder, user functions, numpy's version, an RNG draw).
  Target (issue 9): 100 unchanged files add well under 5 ms to a hit.
* ``check()`` when every file was touched (same content, new mtime: each file is digested).
* ``record()`` of N files (each digested once, xxh3-128).
* The tracing overhead on a Python-heavy body: 1M calls of a small function in a user module,
  untraced and traced (``sys.monitoring`` on 3.12+, ``cProfile``'s C hook on 3.10/3.11).
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from dreamer_magic.dependencies import check, trace

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import median_time, ms  # noqa: E402

HOT = '''
def add(x):
    return x + 1


def body(n):
    s = 0
    for _ in range(n):
        s = add(s)
    return s
'''




def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=100)
    parser.add_argument("--size", type=int, default=64 * 1024, help="bytes per file")
    parser.add_argument("--calls", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    print(f"Python {sys.version.split()[0]}, {args.files} files of {args.size // 1024} KiB, "
          f"median of {args.repeats}")

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        os.chdir(work)
        data = work / "data"
        data.mkdir()
        payload = os.urandom(args.size)
        for i in range(args.files):
            (data / f"part-{i:04d}.bin").write_bytes(payload[i:] + payload[:i])
        (work / "hot_module.py").write_text(HOT)
        sys.path.insert(0, str(work))
        hot = importlib.import_module("hot_module")

        def traced_reads():
            with trace(output_folder=work / "output") as t:
                for path in sorted(data.iterdir()):
                    path.read_bytes()
            return t

        t = traced_reads()
        start = time.perf_counter()
        recorded = t.record()
        record_s = time.perf_counter() - start
        assert len(recorded["files"]) == args.files and check(recorded) == []
        files_only = {"files": recorded["files"]}

        check_files = median_time(lambda: check(files_only), args.repeats * 10)
        print(f"check {args.files} unchanged files          {ms(check_files)}  (target well under 5 ms)")

        import random

        try:
            import numpy as np
        except ImportError:  # a bare interpreter (3.12/3.13 through pyenv): no library to count
            np = None
        with trace(output_folder=work / "output") as t:
            for path in sorted(data.iterdir()):
                path.read_bytes()
            hot.body(1000)
            if np is not None:
                np.linspace(0, 1, 10)
            random.random()
        realistic = t.record()
        state = random.getstate()
        random.setstate(state)
        check_all = median_time(lambda: check(realistic), args.repeats * 10)
        print(f"check a whole record ({len(realistic['files'])} files, 1 folder, "
              f"{sum(len(e['functions']) for e in realistic['code'])} functions, "
              f"{len(realistic['libraries'])} libraries, RNG)  {ms(check_all)}")

        def touch_all():
            for path in data.iterdir():
                st = path.stat()
                os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))

        touched = []
        for _ in range(args.repeats):
            touch_all()
            start = time.perf_counter()
            assert check(files_only) == []
            touched.append(time.perf_counter() - start)
        print(f"check {args.files} touched files (digested)  {ms(statistics.median(touched))}")
        print(f"record {args.files} files (digested once)    {ms(record_s)}")

        base = median_time(lambda: hot.body(args.calls), args.repeats)

        def traced_body():
            with trace() as t:
                hot.body(args.calls)
            return t

        traced = median_time(traced_body, args.repeats)
        t = traced_body()
        assert [f["qualname"] for e in t.record()["code"] for f in e["functions"]] == ["add", "body"]
        how = "sys.monitoring" if sys.version_info >= (3, 12) else "cProfile"
        print(f"{args.calls:,} small calls untraced         {ms(base)}")
        print(f"{args.calls:,} small calls traced ({how}) {ms(traced)}  ({traced / base:.2f}x)")
        sys.path.remove(str(work))
        os.chdir(os.path.dirname(os.path.abspath(__file__)))


if __name__ == "__main__":
    main()
