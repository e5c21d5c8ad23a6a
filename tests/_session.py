"""Run notebook cells in a fresh process with a real IPython shell: one "kernel session".

A restart is the point of most stale-hit tests, so each session is a new Python process:
``InteractiveShell`` with the extension loaded, cells run with ``run_cell`` exactly as typed
(magics included), the output folder under ``cwd``. The result says, for every dreamer cell,
what happened and why, and for every name asked for, its fingerprint and repr at the end, so a
test can assert "the state after the hit equals the state after a run".

    from _session import session
    first = session(tmp_path, ["x = 1", "%%dreamer_step s\\ny = x + 1"], dump=["y"])
    first.states == ["ran"]; first.values["y"]["repr"] == "2"
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

_SCRIPT = r'''
import json, sys, traceback
from IPython.core.interactiveshell import InteractiveShell
from traitlets.config import Config

spec = json.loads(sys.stdin.read())
config = Config()
config.HistoryManager.enabled = False
ip = InteractiveShell.instance(config=config)
ip.run_line_magic("load_ext", "dreamer_magic")
ip.run_line_magic("dreamer", "output " + spec["output"])
import dreamer_magic
from dreamer_magic.fingerprint import fingerprint

report = {"statuses": [], "errors": [], "values": {}}
for cell in spec["cells"]:
    before = dreamer_magic.last_status()
    result = ip.run_cell(cell, store_history=False)
    error = result.error_in_exec or result.error_before_exec
    if error is not None:
        report["errors"].append(f"{type(error).__name__}: {error}")
    if cell.lstrip().startswith(("%%dreamer_step", "%%dreamer_train")):
        status = dreamer_magic.last_status()
        if status is None or status is before:
            report["statuses"].append({"state": "no status", "reasons": [], "notes": [], "error": str(error)})
        else:
            report["statuses"].append({
                "name": status.name, "state": status.state, "reasons": [str(r) for r in status.reasons],
                "notes": [str(n) for n in status.notes], "error": status.error,
            })
for name in spec["dump"]:
    if name not in ip.user_ns:
        report["values"][name] = None
        continue
    value = ip.user_ns[name]
    try:
        fp = fingerprint(value)
    except Exception as e:
        fp = f"unfingerprintable: {e}"
    report["values"][name] = {"fingerprint": fp, "repr": repr(value)[:2000], "type": type(value).__qualname__}
print("\n@@REPORT@@" + json.dumps(report))
'''


@dataclass
class Session:
    statuses: list[dict]
    errors: list[str]
    values: dict[str, dict | None]
    stdout: str = ""
    stderr: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def states(self) -> list[str]:
        return [s["state"] for s in self.statuses]

    def reasons(self, i: int = -1) -> str:
        """The why-lines and notes of the ``i``-th dreamer cell, as one string."""
        s = self.statuses[i]
        return " | ".join(s["reasons"] + s["notes"])

    def same_values(self, other: "Session") -> bool:
        return {k: (v or {}).get("fingerprint") for k, v in self.values.items()} == {
            k: (v or {}).get("fingerprint") for k, v in other.values.items()
        }


def session(
    cwd: str | os.PathLike,
    cells: list[str],
    *,
    dump: list[str] | tuple[str, ...] = (),
    env: dict | None = None,
    python: str = sys.executable,
    timeout: float = 240,
) -> Session:
    """Run ``cells`` in a fresh process with cwd ``cwd`` and the output folder ``cwd/output``."""
    cwd = Path(cwd)
    spec = {"cells": [textwrap.dedent(c).strip("\n") + "\n" for c in cells], "dump": list(dump), "output": str(cwd / "output")}
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONHASHSEED": "random", **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(cwd), full_env.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [python, "-c", _SCRIPT], input=json.dumps(spec), capture_output=True, text=True, cwd=cwd, env=full_env, timeout=timeout
    )
    out = proc.stdout
    if "@@REPORT@@" not in out:
        raise AssertionError(f"the session crashed (exit {proc.returncode}):\n{out[-3000:]}\n{proc.stderr[-3000:]}")
    body, _, tail = out.rpartition("\n@@REPORT@@")
    report = json.loads(tail)
    return Session(report["statuses"], report["errors"], report["values"], body, proc.stderr)
