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


@pytest.mark.parametrize("size", [32, 64])
def test_kernelspec_has_a_logo(size):
    """JupyterLab's launcher shows logo-64x64.png / logo-32x32.png from the kernelspec folder
    (shipped with the whole folder by the wheel's shared-data)."""
    import struct
    import zlib

    path = REPO / "jupyter-config/kernels" / NAME / f"logo-{size}x{size}.png"
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, i = {}, 8
    while i < len(data):
        (length,) = struct.unpack(">I", data[i : i + 4])
        kind, body = data[i + 4 : i + 8], data[i + 8 : i + 8 + length]
        assert struct.unpack(">I", data[i + 8 + length : i + 12 + length])[0] == zlib.crc32(kind + body) & 0xFFFFFFFF
        chunks[kind] = chunks.get(kind, b"") + body
        i += 12 + length
    width, height, depth, colour = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert (width, height, depth, colour) == (size, size, 8, 6)  # RGBA
    pixels = zlib.decompress(chunks[b"IDAT"])
    assert len(pixels) == size * (1 + 4 * size)
    alphas = {pixels[r * (1 + 4 * size) + 1 + 4 * c + 3] for r in range(size) for c in range(size)}
    assert 0 in alphas and 255 in alphas  # a shape on a transparent ground, not a blank square


def test_kernelspec_folder_ships_whole():
    text = (REPO / "pyproject.toml").read_text()
    assert '"jupyter-config/kernels/python3-dreamer_magic" = "share/jupyter/kernels/python3-dreamer_magic"' in text
