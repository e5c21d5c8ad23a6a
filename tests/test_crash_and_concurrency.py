"""Real processes: SIGKILL at any moment of a save, and two kernels running one step at once."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path


from dreamer_magic.folders import read_meta

HERE = Path(__file__).parent
SCRIPT = str(HERE / "_run_step.py")


def start(output: Path, line: str, cell: str, tmp_path: Path, setup: str = "") -> subprocess.Popen:
    cell_file = tmp_path / f"cell-{time.monotonic_ns()}.py"
    cell_file.write_text(cell)
    return subprocess.Popen(
        [sys.executable, SCRIPT, str(output), line, str(cell_file), setup],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


BIG = (
    "import numpy as np, pandas as pd\n"
    "n = 600_000\n"
    "frame = pd.DataFrame({'text': ['row %d' % i for i in range(n)], 'v': np.arange(n) * VERSION})\n"
    "arr = np.full(3_000_000, VERSION, dtype=np.int64)\n"
    "print('BODY DONE', flush=True)\n"
)


def test_sigkill_during_save_never_leaves_a_complete_looking_folder(tmp_path, ip):
    output = tmp_path / "output"
    final = output / "big"
    first = start(output, "big --version 1", BIG.replace("VERSION", "1"), tmp_path)
    assert first.wait(timeout=120) == 0
    delays = [0.0, 0.03, 0.08, 0.15, 0.25, 0.4, 0.6]
    for version, delay in enumerate(delays, start=2):
        proc = start(output, f"big --version {version}", BIG.replace("VERSION", str(version)), tmp_path)
        for line in proc.stdout:  # wait for the body to finish: the save starts now
            if "BODY DONE" in line:
                break
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        meta, problem = read_meta(final, "step.json")
        # the previous result is never lost, and what is in place is complete, never half-written
        assert final.exists()
        assert meta is not None, problem
        version_saved = int(meta["version"])
        assert version_saved <= version
        arr = __import__("numpy").load(final / meta["outputs"]["arr"]["path"])
        assert int(arr[0]) == version_saved
    # the next run recovers on its own: stale temporary folders are cleaned, the step completes
    ip.run_cell_magic("dreamer_step", "big --version 99", BIG.replace("VERSION", "99"))
    assert ip._dreamer_magics._last_status.state == "ran"
    assert int(ip.user_ns["arr"][0]) == 99
    leftovers = [p.name for p in output.iterdir() if ".tmp-" in p.name]
    assert leftovers == []
    ip.run_cell_magic("dreamer_step", "big --version 99", BIG.replace("VERSION", "99"))
    assert ip._dreamer_magics._last_status.state == "loaded from disk"


def test_two_kernels_one_runs_the_other_waits_and_loads(tmp_path):
    output = tmp_path / "output"
    counter = tmp_path / "runs.txt"
    go = tmp_path / "go"
    cell = (
        "import os, time\n"
        f"open({str(counter)!r}, 'a').write('ran\\n')\n"
        "print('BODY STARTED', flush=True)\n"
        f"deadline = time.time() + 120\n"
        f"while not os.path.exists({str(go)!r}) and time.time() < deadline:\n"
        "    time.sleep(0.05)\n"
        "result = sum(range(1000))\n"
        "print('result is', result)\n"
    )
    first = start(output, "shared", cell, tmp_path)
    seen = []
    for line in first.stdout:  # the first kernel holds the step: its body is running
        seen.append(line)
        if "BODY STARTED" in line:
            break
    second = start(output, "shared", cell, tmp_path)
    waited = []
    for line in second.stdout:  # the second kernel says it waits for the first
        waited.append(line)
        if "waiting for another kernel" in line:
            break
    assert waited and "waiting for another kernel" in waited[-1], waited
    go.write_text("go")  # now let the first finish
    outs = ["".join(seen) + first.communicate(timeout=120)[0], "".join(waited) + second.communicate(timeout=120)[0]]
    assert all(p.returncode == 0 for p in (first, second)), outs
    assert counter.read_text().count("ran") == 1, "the body ran once"
    states = [line.split("STATE: ")[1].strip() for out in outs for line in out.splitlines() if "STATE:" in line]
    assert states == ["ran", "loaded from disk"], outs
    assert all("result is 499500" in out for out in outs), "both show the output (replayed for the waiter)"
