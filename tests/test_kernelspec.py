"""The "Python 3 (dreamer_magic)" kernelspec (SPEC §1) is installed by pip and starts a kernel
with the extension already loaded."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

NAME = "python3-dreamer_magic"
REPO = Path(__file__).resolve().parents[1]


def test_kernelspec_is_installed_into_the_environment():
    from jupyter_client.kernelspec import KernelSpecManager

    specs = KernelSpecManager().find_kernel_specs()
    assert NAME in specs, (
        f"kernelspec {NAME!r} not found (found {sorted(specs)}); "
        "reinstall with `bash scripts/setup.sh` (pip install -e '.[test]')"
    )
    installed = Path(specs[NAME])
    # installed by pip into this environment, not into a user's or a system folder
    assert installed.resolve().is_relative_to(Path(sys.prefix).resolve()), installed
    shipped = json.loads((REPO / "jupyter-config/kernels" / NAME / "kernel.json").read_text())
    assert json.loads((installed / "kernel.json").read_text()) == shipped
    assert shipped["display_name"] == "Python 3 (dreamer_magic)"
    assert shipped["argv"][-2:] == ["--ext", "dreamer_magic"]


@pytest.mark.timeout(120)
def test_kernel_from_the_spec_has_the_magics_loaded(tmp_path):
    from jupyter_client.manager import start_new_kernel

    km, kc = start_new_kernel(kernel_name=NAME, cwd=str(tmp_path), startup_timeout=90)
    try:
        outputs: list[str] = []

        def collect(msg):
            if msg["msg_type"] == "stream":
                outputs.append(msg["content"]["text"])
            elif msg["msg_type"] == "error":
                outputs.append("\n".join(msg["content"]["traceback"]))

        code = (
            "ip = get_ipython()\n"
            "print('step', ip.find_cell_magic('dreamer_step') is not None)\n"
            "print('train', ip.find_cell_magic('dreamer_train') is not None)\n"
            "print('line', ip.find_line_magic('dreamer') is not None)\n"
            "%dreamer output out\n"
        )
        reply = kc.execute_interactive(code, timeout=60, output_hook=collect)
        text = "".join(outputs)
        assert reply["content"]["status"] == "ok", text
        assert "step True" in text and "train True" in text and "line True" in text, text
        assert f"output folder: {tmp_path / 'out'}" in text, text
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
