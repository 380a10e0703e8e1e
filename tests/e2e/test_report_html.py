"""`hooktrace report --html` of real runs, opened in a real headless Chromium with no network.

``UPDATE_DOCS_SCREENSHOT=1`` also copies the screenshot to docs/report.png (the README's).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest

from tests.browser import chromium, console_lines, distinct_colours, require_chromium
from tests.e2e.test_cli_run import hooktrace

REPO = Path(__file__).resolve().parents[2]
TRANSFORMER = REPO / "examples" / "train_transformer.py"
SLOW = REPO / "tests" / "scripts" / "slow_module.py"
EXTERNAL = re.compile(r"^\s*(https?:|//|ftp:)", re.IGNORECASE)


class _References(HTMLParser):
    """Every URL a page would load: script/img/iframe/source ``src``, link ``href``, CSS ``url()``."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self._in_style = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag in ("script", "img", "iframe", "source", "embed", "video", "audio") and values.get("src"):
            self.urls.append(str(values["src"]))
        if tag == "link" and values.get("href"):
            self.urls.append(str(values["href"]))
        if values.get("style"):
            self.urls += re.findall(r"url\(([^)]*)\)", str(values["style"]))
        self._in_style = tag == "style"

    def handle_data(self, data: str) -> None:
        if self._in_style:
            self.urls += re.findall(r"url\(([^)]*)\)", data)
            self.urls += re.findall(r"@import\s+['\"]?([^'\";]+)", data)

    def handle_endtag(self, tag: str) -> None:
        self._in_style = False


@pytest.fixture(scope="module")
def transformer_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("transformer")
    result = hooktrace(
        "run", "--metrics-port", "0", "--out", str(out), "--sample-every", "5", "--flow-every", "25",
        str(TRANSFORMER), "--steps", "150",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return out


def _open(binary: str, page: Path, tmp_path: Path) -> tuple[str, Path, str]:
    """The page's DOM after its scripts ran, its screenshot, and Chromium's log of both runs."""
    dom = chromium(binary, page, "--dump-dom", "--window-size=1400,2000", profile=tmp_path / "profile-dom")
    assert dom.returncode == 0, dom.stderr[-3000:]
    shot = tmp_path / "report.png"
    snap = chromium(binary, page, f"--screenshot={shot}", "--window-size=1400,2000", profile=tmp_path / "profile-shot")
    assert snap.returncode == 0 and shot.exists(), snap.stderr[-3000:]
    return dom.stdout, shot, dom.stderr + snap.stderr


def test_the_html_report_opens_offline_in_chromium_with_its_charts_drawn(transformer_run: Path, tmp_path: Path) -> None:
    binary = require_chromium()
    started = time.monotonic()
    result = hooktrace("report", str(transformer_run), "--html")
    assert result.returncode == 0, result.stderr
    page = transformer_run / "report.html"
    assert result.stdout.strip() == str(page)
    assert time.monotonic() - started < 30
    assert page.stat().st_size <= 10 * 1024 * 1024
    text = page.read_text(encoding="utf-8")
    refs = _References()
    refs.feed(text)
    assert [u for u in refs.urls if EXTERNAL.match(u)] == []
    assert refs.urls == []  # everything inline: not even a local file is referenced
    charts = text.count("class='chart'")
    assert charts >= 7  # step time, 2 module bars, tree, norm, heatmap, flow, ranks

    dom, shot, log = _open(binary, page, tmp_path)
    assert console_lines(log) == []  # no script error, no warning, nothing logged
    assert re.search(r"<html[^>]*data-errors", dom) is None  # the page's own error catcher saw nothing
    assert f'data-charts="{charts}"' in dom  # the boot script reached its end
    assert dom.count('class="main-svg"') >= charts  # plotly drew an SVG in every chart
    assert "icicle" in dom and "heatmaplayer" in dom.lower()
    assert distinct_colours(shot) > 200  # charts, not a blank page
    if os.environ.get("UPDATE_DOCS_SCREENSHOT"):
        (REPO / "docs").mkdir(exist_ok=True)
        shutil.copyfile(shot, REPO / "docs" / "report.png")


def test_a_blank_page_fails_the_same_checks(tmp_path: Path) -> None:
    """The checks above can fail: a page whose script throws is caught by each of them."""
    binary = require_chromium()
    page = tmp_path / "broken.html"
    page.write_text("<html><body><div class='chart'></div><script>Plotly.newPlot('x', [])</script></body></html>")
    dom, shot, log = _open(binary, page, tmp_path)
    assert any("Plotly is not defined" in line for line in console_lines(log))
    assert 'class="main-svg"' not in dom
    assert distinct_colours(shot) <= 2


def _wait_for(path: Path, needle: str, count: int, proc: subprocess.Popen[str], timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text(encoding="utf-8").count(needle) >= count:
            return
        assert proc.poll() is None, f"the run ended early: {proc.returncode}"
        time.sleep(0.2)
    raise AssertionError(f"{path} never held {count} x {needle!r}")


def test_a_killed_run_still_gives_a_report(tmp_path: Path) -> None:
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "hooktrace.cli.main", "run", "--metrics-port", "0", "--out", str(out),
            "--sample-every", "2", str(SLOW), "--steps", "1000000", "--slow-ms", "2", "--step-sleep-ms", "5",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        _wait_for(out / "rank0.steps.jsonl", '"step"', 6, proc)
        _wait_for(out / "rank0.trace.json", '"forward slow"', 3, proc)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert not (out / "rank0.trace.json").read_text().rstrip().endswith("]")  # killed: never closed

    html = hooktrace("report", str(out), "--html", str(tmp_path / "r.html"))
    assert html.returncode == 0, html.stderr
    page = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert "What this directory lacks" in page and "not closed: the run was killed" in page
    tree = hooktrace("report", str(out), "--tree")
    assert tree.returncode == 0, tree.stderr
    slow = next(line for line in tree.stdout.splitlines() if line.lstrip().startswith("(slow):"))
    assert re.search(r"\d+(\.\d+)? ms / \d+(\.\d+)? ms", slow), slow  # its forward time, from the trace file
    if not list(out.glob("rank*.summary.json")):  # killed before its first 10-second checkpoint
        assert "no rank*.summary.json" in page and "tree rebuilt from module names" in tree.stdout
        plain = hooktrace("report", str(out))
        assert plain.returncode == 0, plain.stderr
        assert "forward slow" in plain.stdout and "Note: no rank*.summary.json" in plain.stdout
