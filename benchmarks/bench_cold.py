"""The first hit in a freshly restarted kernel, side by side with ``pickle.load`` of the same frame.

    .venv/bin/python benchmarks/bench_cold.py [--rows 1000000] [--tiny-rows 10000] [--rounds 5]
        [--shells terminal,kernel] [--dtypes str,object]

Each round starts, for every system, a fresh process in the same state (IPython, pandas,
``%load_ext dreamer_magic``, the input frame unpickled into the namespace), then times ONE
cell in it, from IPython's ``pre_run_cell`` to ``post_run_cell`` (CPU: ``process_time``;
wall: ``perf_counter``):

* ``magic``: a hit of ``%%dreamer_step`` whose input and output are the frame (1M rows: a
  text column and two numeric ones), saved beforehand by a run in another process;
* ``pickle``: ``kept = pickle.load(f)`` of the same output frame.

Systems are interleaved within each round (their order alternates), in a plain
``InteractiveShell`` (``terminal``) and in a real ipykernel started with jupyter_client
(``kernel``), for pandas 3's default ``str`` text and for ``object`` text. Bytecode is compiled
first. Printed: medians and [min-max] of magic/pickle ratios of CPU and wall time (target 1:
<= 1.1x for ``str``, <= 1.5x for ``object``), and for the ``--tiny-rows`` frame the fixed cost of
a hit, magic minus pickle, cold (first hit in the process) and warm (later hits; target 6:
<= 1.5 ms). ``--rows 100000 --rounds 3`` for a quick run.
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import shutil
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "benchmarks" / "_work" / "cold"
CELL = "%%dreamer_step cold-hit\nkept = frame[frame.stars > 0].reset_index(drop=True)\n"

# Run in every fresh process (shell or kernel) before the timed cell: the same state for both systems.
SETUP = textwrap.dedent(
    """
    import pickle, time
    import pandas
    get_ipython().run_line_magic("load_ext", "dreamer_magic")
    get_ipython().run_line_magic("config", "DreamerMagics.output_folder = {output!r}")
    with open({input!r}, "rb") as _f:
        frame = pickle.load(_f)
    _times = []
    def _pre(*a, _t=time):
        _times.append((_t.process_time(), _t.perf_counter()))
    def _post(*a, _t=time):
        c, w = _times.pop()
        _times.append((_t.process_time() - c, _t.perf_counter() - w))
    get_ipython().events.register("pre_run_cell", _pre)
    get_ipython().events.register("post_run_cell", _post)
    """
)


def timed_cell(system: str, output_pickle: Path) -> str:
    if system == "magic":
        return CELL
    return f"with open({str(output_pickle)!r}, 'rb') as _f:\n    kept = pickle.load(_f)\n"


PACKAGE = [str(ROOT)]  # where dreamer_magic is imported from (--package: another checkout, to compare)


def environment() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=f"{PACKAGE[0]}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", HF_HUB_OFFLINE="1")
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # a user's kernel runs cached bytecode
    env["PYTHONPYCACHEPREFIX"] = str(WORK / "pycache")  # ... kept here, not in the checkouts
    return env


TERMINAL = textwrap.dedent(
    """
    import json, sys
    from IPython.core.interactiveshell import InteractiveShell
    from traitlets.config import Config
    config = Config(); config.HistoryManager.enabled = False
    ip = InteractiveShell.instance(config=config)
    spec = json.loads(sys.stdin.read())
    ip.run_cell(spec["setup"], store_history=False, silent=True)
    for cell in spec["cells"]:
        result = ip.run_cell(cell, store_history=False)
        if not result.success:
            raise SystemExit("cell failed")
    print("TIMES", json.dumps(ip.user_ns["_times"]))
    """
)


def run_terminal(setup: str, cells: list[str]) -> list[tuple[float, float]]:
    spec = json.dumps({"setup": setup, "cells": cells})
    done = subprocess.run(
        [sys.executable, "-c", TERMINAL], input=spec, capture_output=True, text=True, env=environment(), cwd=WORK
    )
    if done.returncode:
        raise RuntimeError(done.stdout + done.stderr)
    line = [ln for ln in done.stdout.splitlines() if ln.startswith("TIMES ")][-1]
    return [tuple(t) for t in json.loads(line[6:])]


def run_kernel(setup: str, cells: list[str]) -> list[tuple[float, float]]:
    from jupyter_client.manager import KernelManager

    km = KernelManager(kernel_name="python3")
    km.start_kernel(env=environment(), cwd=str(WORK), stderr=subprocess.DEVNULL)
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=120)
        texts: list[str] = []

        def collect(msg: dict) -> None:
            if msg["msg_type"] == "stream":
                texts.append(msg["content"]["text"])
            elif msg["msg_type"] == "error":
                raise RuntimeError("\n".join(msg["content"]["traceback"]))

        kc.execute_interactive(setup, silent=True, store_history=False, timeout=300, output_hook=collect)
        for cell in cells:
            kc.execute_interactive(cell, store_history=False, timeout=300, output_hook=collect)
        texts.clear()
        kc.execute_interactive("print('TIMES', __import__('json').dumps(_times))", silent=False, output_hook=collect)
        line = [ln for ln in "".join(texts).splitlines() if ln.startswith("TIMES ")][-1]
        return [tuple(t) for t in json.loads(line[6:])]
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def make_inputs(rows: int, dtype: str) -> tuple[Path, Path, Path]:
    """The input pickle, the output pickle and an output folder holding the step's saved run."""
    base = WORK / f"{rows}-{dtype}"
    paths = base / "input.pkl", base / "output.pkl", base / "output"
    if all(p.exists() for p in paths):
        return paths
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    code = textwrap.dedent(
        f"""
        import pickle, numpy as np, pandas as pd
        rng = np.random.default_rng(0)
        words = np.array(["good", "bad", "fine", "great", "awful", "ok", "superb", "meh"])
        text = [f"review {{i}}: {{words[i % 8]}} {{words[(i * 7) % 8]}}" for i in range({rows})]
        frame = pd.DataFrame({{"text": text, "stars": rng.integers(1, 6, {rows}), "score": rng.random({rows})}})
        frame = frame.astype({{"text": {dtype!r}}})
        with open({str(paths[0])!r}, "wb") as f:
            pickle.dump(frame, f, protocol=pickle.HIGHEST_PROTOCOL)
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=environment())
    setup = SETUP.format(output=str(paths[2]), input=str(paths[0]))
    dump = f"with open({str(paths[1])!r}, 'wb') as _f:\n    pickle.dump(kept, _f, protocol=pickle.HIGHEST_PROTOCOL)\n"
    run_terminal(setup, [CELL, dump])  # the run that saves; then the output pickled
    return paths


def spread(values: list[float], digits: int = 2) -> str:
    return f"{statistics.median(values):.{digits}f}x [{min(values):.{digits}f}-{max(values):.{digits}f}]"


def bench(shell: str, rows: int, dtype: str, rounds: int, repeats: int) -> dict[str, list]:
    """Ratios (or differences) over ``rounds`` rounds; each round one fresh process per system."""
    inp, out_pickle, output = make_inputs(rows, dtype)
    setup = SETUP.format(output=str(output), input=str(inp))
    runner = run_terminal if shell == "terminal" else run_kernel
    runner(setup, [CELL])  # warm the file cache and the bytecode; not counted
    results: dict[str, list] = {"magic": [], "pickle": []}
    for r in range(rounds):
        order = ["magic", "pickle"] if r % 2 == 0 else ["pickle", "magic"]
        for system in order:
            results[system].append(runner(setup, [timed_cell(system, out_pickle)] * repeats))
    return results


def report_large(shell: str, rows: int, dtype: str, results: dict[str, list]) -> None:
    cpu = [m[0][0] / p[0][0] for m, p in zip(results["magic"], results["pickle"])]
    wall = [m[0][1] / p[0][1] for m, p in zip(results["magic"], results["pickle"])]
    target = 1.1 if dtype == "str" else 1.5
    mc = statistics.median(m[0][0] for m in results["magic"]) * 1000
    pc = statistics.median(p[0][0] for p in results["pickle"]) * 1000
    print(
        f"{shell:8} {rows:>9,} rows {dtype:6}  magic/pickle CPU {spread(cpu)}  wall {spread(wall)}"
        f"   (magic {mc:.0f} ms CPU, pickle {pc:.0f} ms; target <= {target}x)"
    )


def report_tiny(shell: str, rows: int, results: dict[str, list]) -> None:
    cold = [(m[0][1] - p[0][1]) * 1000 for m, p in zip(results["magic"], results["pickle"])]
    warm = [
        (statistics.median(t[1] for t in m[1:]) - statistics.median(t[1] for t in p[1:])) * 1000
        for m, p in zip(results["magic"], results["pickle"])
    ]
    warm_cpu = [
        (statistics.median(t[0] for t in m[1:]) - statistics.median(t[0] for t in p[1:])) * 1000
        for m, p in zip(results["magic"], results["pickle"])
    ]
    fmt = lambda v: f"{statistics.median(v):.2f} ms [{min(v):.2f}-{max(v):.2f}]"  # noqa: E731
    print(
        f"{shell:8} {rows:>9,} rows str     fixed cost of a hit (magic - pickle): warm wall {fmt(warm)}, "
        f"warm CPU {fmt(warm_cpu)}, first hit wall {fmt(cold)}  (target warm <= 1.5 ms)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--tiny-rows", type=int, default=10_000, help="0: skip the fixed-cost measure")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--shells", default="terminal,kernel")
    parser.add_argument("--dtypes", default="str,object")
    parser.add_argument("--package", default=str(ROOT), help="the checkout whose dreamer_magic is measured")
    args = parser.parse_args()
    PACKAGE[0] = str(Path(args.package).resolve())
    WORK.mkdir(parents=True, exist_ok=True)
    sys.pycache_prefix = str(WORK / "pycache")
    compileall.compile_dir(str(Path(PACKAGE[0]) / "dreamer_magic"), quiet=1)
    print(f"python {sys.version.split()[0]}, {args.rounds} rounds; ratios: median [min-max]")
    for shell in args.shells.split(","):
        for dtype in args.dtypes.split(","):
            report_large(shell, args.rows, dtype, bench(shell, args.rows, dtype, args.rounds, 1))
        if args.tiny_rows:
            report_tiny(shell, args.tiny_rows, bench(shell, args.tiny_rows, "str", args.rounds, 21))


if __name__ == "__main__":
    main()
