"""Render a comparison's ``report.html`` in headless Chromium and save a PNG screenshot, to check
by eye that the page shows its table and figures with nothing loaded from outside.

    .venv/bin/python bench/screenshot_report.py runs/demo/report/report.html [--out shot.png]

Exits 0 without doing anything (after saying so) when no Chromium is installed
(``apt-get install -y chromium`` on Debian); exits 1 when Chromium ran but wrote no image.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_browser() -> str | None:
    """The first Chromium-like executable on ``PATH``, or ``None``."""
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


def screenshot(html: Path, out: Path, browser: str, width: int = 1200, height: int = 2000,
               timeout: float = 120.0) -> None:
    """Write a ``width`` x ``height`` screenshot of ``html`` to ``out`` with headless Chromium
    (no GPU, no sandbox, no network-facing background services, a throw-away profile)."""
    with tempfile.TemporaryDirectory(prefix="prunekit-chromium-") as profile:
        cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--no-first-run", "--hide-scrollbars", f"--user-data-dir={profile}",
               f"--screenshot={out.resolve()}", f"--window-size={width},{height}",
               html.resolve().as_uri()]
        subprocess.run(cmd, check=False, timeout=timeout, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("html", type=Path, help="report.html to render")
    p.add_argument("--out", type=Path, default=None, help="PNG to write (default: beside the html)")
    p.add_argument("--width", type=int, default=1200)
    p.add_argument("--height", type=int, default=2000)
    args = p.parse_args(argv)
    if not args.html.is_file():
        print(f"screenshot_report: no such file: {args.html}", file=sys.stderr)
        return 2
    browser = find_browser()
    if browser is None:
        print("screenshot_report: no Chromium found (apt-get install -y chromium); skipped")
        return 0
    out = args.out or args.html.with_name(args.html.stem + "_screenshot.png")
    if out.exists():
        out.unlink()
    screenshot(args.html, out, browser, args.width, args.height)
    if not out.is_file() or out.stat().st_size == 0:
        print(f"screenshot_report: {browser} wrote no screenshot", file=sys.stderr)
        return 1
    print(f"wrote {out} ({args.width}x{args.height})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
