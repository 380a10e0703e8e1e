"""A real headless Chromium for the HTML report's tests, and a look at its screenshots (Pillow).

Debian's ``chromium`` (``make test`` installs it through ``tests/ensure_servers.sh``). Missing on a
developer machine, the test skips; with ``CI`` set it fails, like the Prometheus tests.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

_FLAGS = (
    "--headless",
    "--no-sandbox",  # CI runs as root, where Chromium's sandbox refuses to start
    "--disable-gpu",
    "--hide-scrollbars",
    "--no-first-run",
    "--disable-extensions",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--host-resolver-rules=MAP * ~NOTFOUND",  # offline: any fetch of a host name fails
)


def require_chromium() -> str:
    """The Chromium binary; skip the test without it, or fail it when ``CI`` is set."""
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name) or shutil.which(name, path="/usr/bin")
        if path is not None:
            return path
    reason = "chromium not found on PATH or in /usr/bin (`make test` installs it, or: sudo apt-get install chromium)"
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


def chromium(
    binary: str, page: Path, *args: str, profile: Path, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Open ``page`` in headless Chromium with ``args`` (``--dump-dom``, ``--screenshot=...``); console
    messages go to stderr (``--enable-logging=stderr``) as ``INFO:CONSOLE`` lines."""
    return subprocess.run(
        [
            binary,
            *_FLAGS,
            f"--user-data-dir={profile}",
            "--enable-logging=stderr",
            "--v=0",
            "--virtual-time-budget=15000",  # lets the page's scripts run to the end before the dump
            *args,
            page.resolve().as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "HOME": str(profile)},
    )


def console_lines(stderr: str) -> list[str]:
    """The page's console messages (errors, warnings, logs) from Chromium's stderr log."""
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


def distinct_colours(path: Path) -> int:
    """How many different pixel colours a PNG screenshot holds (a blank page has one or two)."""
    from PIL import Image

    with Image.open(path) as image:
        colours = image.convert("RGB").getcolors(maxcolors=1 << 24)
    return len(colours or [])
