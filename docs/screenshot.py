"""Take the README's screenshot of an HTML run report, in headless Chromium.

    make demo
    .venv/bin/python docs/screenshot.py demo-output/report.html docs/report.png

It drives Chromium as the report's browser test does (`tests/helpers_browser.py`),
and refuses a page that logs anything to the console.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from helpers_browser import png_pixels, render


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("page", type=Path, help="the report (python -m jorbmp report --html)")
    parser.add_argument("png", type=Path, help="where to write the screenshot")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=1900)
    args = parser.parse_args()
    shown = render(args.page, args.width, args.height)
    if shown.console:
        print("\n".join(["the page logged:", *shown.console]), file=sys.stderr)
        return 1
    width, height, _, _ = png_pixels(shown.png)  # a PNG that decodes
    args.png.write_bytes(shown.png)
    print(f"wrote {args.png} ({width}x{height}, {len(shown.png):,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
