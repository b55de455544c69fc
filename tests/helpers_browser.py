"""Headless Chromium for the HTML report's real-browser test (and the README's
screenshot, `docs/screenshot.py`): render a page to its DOM, its console messages and a
PNG, and decode that PNG in pure Python (zlib), so no browser driver or imaging
package is needed."""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import tempfile
import zlib
from pathlib import Path

# Debian's package is `chromium`; other systems name the binary differently.
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
INSTALL = "apt-get install -y chromium (as root; .ci/run does this before make test)"
# A console message in Chromium's log: `INFO:CONSOLE:12] "text", source: ...` (the
# level of the message is not shown, so every message counts).
CONSOLE = re.compile(r":CONSOLE[:(]")


def find_chromium() -> str | None:
    """The path of a Chromium binary (``$CHROMIUM`` first), or None."""
    for name in (os.environ.get("CHROMIUM", ""), *CHROMIUM_NAMES):
        if name and (path := shutil.which(name)):
            return path
    return None


class Rendered:
    """What Chromium made of a page: its DOM after load, console messages, screenshot."""

    def __init__(self, dom: str, console: list[str], png: bytes) -> None:
        self.dom, self.console, self.png = dom, console, png


def render(page: Path, width: int = 1280, height: int = 1800, timeout: float = 60) -> Rendered:
    """Load ``page`` (a local file) in headless Chromium; raise RuntimeError (with the
    reason) if Chromium is missing or fails."""
    chromium = find_chromium()
    if chromium is None:
        raise RuntimeError(f"Chromium not found (tried {', '.join(CHROMIUM_NAMES)}): {INSTALL}")
    with tempfile.TemporaryDirectory(prefix="jorbmp-chromium-") as profile:
        shot = Path(profile) / "shot.png"
        cmd = [
            chromium,
            "--headless",
            "--no-sandbox",  # CI runs as root, where Chromium's sandbox refuses to start
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
            "--no-first-run",
            f"--user-data-dir={profile}",
            "--enable-logging=stderr",
            "--v=0",
            f"--window-size={width},{height}",
            f"--screenshot={shot}",
            "--dump-dom",
            page.resolve().as_uri(),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0 or not shot.exists():
            tail = "\n".join(proc.stderr.splitlines()[-5:])
            raise RuntimeError(f"{chromium} failed (exit {proc.returncode}): {tail}")
        console = [line for line in proc.stderr.splitlines() if CONSOLE.search(line)]
        return Rendered(proc.stdout, console, shot.read_bytes())


def png_pixels(data: bytes) -> tuple[int, int, int, bytes]:
    """Decode an 8-bit RGB or RGBA, non-interlaced PNG: (width, height, channels, the
    pixel bytes row after row)."""
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG")
    pos, idat = 8, []
    width = height = channels = 0
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", body)
            if depth != 8 or colour not in (2, 6) or interlace:
                raise ValueError(f"unsupported PNG (depth {depth}, colour type {colour})")
            channels = 3 if colour == 2 else 4
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
    raw = zlib.decompress(b"".join(idat))
    stride = width * channels
    out = bytearray()
    prev = bytearray(stride)
    for y in range(height):
        base = y * (stride + 1)
        kind, line = raw[base], bytearray(raw[base + 1 : base + 1 + stride])
        _unfilter(kind, line, prev, channels)
        out += line
        prev = line
    return width, height, channels, bytes(out)


def _unfilter(kind: int, line: bytearray, prev: bytearray, bpp: int) -> None:
    """Undo one PNG row filter in place (types 0-4: none, sub, up, average, Paeth)."""
    n = len(line)
    if kind == 0:
        return
    if kind == 1:
        for i in range(bpp, n):
            line[i] = (line[i] + line[i - bpp]) & 0xFF
    elif kind == 2:
        for i in range(n):
            line[i] = (line[i] + prev[i]) & 0xFF
    elif kind == 3:
        for i in range(n):
            left = line[i - bpp] if i >= bpp else 0
            line[i] = (line[i] + ((left + prev[i]) >> 1)) & 0xFF
    elif kind == 4:
        for i in range(n):
            a = line[i - bpp] if i >= bpp else 0
            b = prev[i]
            c = prev[i - bpp] if i >= bpp else 0
            p = a + b - c
            pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
            pred = a if pa <= pb and pa <= pc else b if pb <= pc else c
            line[i] = (line[i] + pred) & 0xFF
    else:
        raise ValueError(f"bad PNG filter type {kind}")


def luminance_variance(width: int, height: int, channels: int, pixels: bytes) -> float:
    """The variance of the pixels' grey levels (0 for a blank page), over a sample."""
    greys = [
        (299 * pixels[i] + 587 * pixels[i + 1] + 114 * pixels[i + 2]) // 1000
        for i in range(0, len(pixels) - channels + 1, channels * 7)
    ]
    mean = sum(greys) / len(greys)
    return sum((g - mean) ** 2 for g in greys) / len(greys)
