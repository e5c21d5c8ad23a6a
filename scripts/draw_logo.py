"""Draw the kernelspec logos (a crescent moon on a blue disc) as PNGs, with no imaging library.

    python scripts/draw_logo.py   # writes jupyter-config/kernels/python3-dreamer_magic/logo-{32x32,64x64}.png

JupyterLab's launcher and kernel picker show ``logo-64x64.png`` and ``logo-32x32.png`` from the
kernelspec folder. Each pixel is 4x4 supersampled for smooth edges; the output is deterministic.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

FOLDER = Path(__file__).resolve().parents[1] / "jupyter-config" / "kernels" / "python3-dreamer_magic"
BLUE = (21, 101, 192)  # render.BLUE, the colour of a card that ran
MOON = (255, 244, 214)


def _coverage(x: float, y: float) -> tuple[float, float]:
    """(disc, moon) membership of a point in the unit square."""
    disc = (x - 0.5) ** 2 + (y - 0.5) ** 2 <= 0.48**2
    lit = (x - 0.47) ** 2 + (y - 0.5) ** 2 <= 0.30**2
    shadow = (x - 0.60) ** 2 + (y - 0.42) ** 2 <= 0.25**2
    return float(disc), float(disc and lit and not shadow)


def draw(size: int, samples: int = 4) -> bytes:
    rows = []
    for py in range(size):
        row = bytearray([0])  # filter type 0
        for px in range(size):
            disc = moon = 0.0
            for sy in range(samples):
                for sx in range(samples):
                    d, m = _coverage((px + (sx + 0.5) / samples) / size, (py + (sy + 0.5) / samples) / size)
                    disc, moon = disc + d, moon + m
            n = samples * samples
            disc, moon = disc / n, moon / n
            colour = [round(b + (m - b) * (moon / disc if disc else 0)) for b, m in zip(BLUE, MOON)]
            row += bytes(colour + [round(255 * disc)])
        rows.append(bytes(row))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", size, size, 8, 6, 0, 0, 0)  # 8-bit RGBA
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"".join(rows), 9)) + chunk(b"IEND", b"")


if __name__ == "__main__":
    for size in (32, 64):
        (FOLDER / f"logo-{size}x{size}.png").write_bytes(draw(size))
