"""``hooktrace top --once`` against a real ``hooktrace run`` subprocess, found through its targets.json."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from click.testing import CliRunner

from hooktrace.cli.top import top_command
from tests.servers import free_port

REPO = Path(__file__).resolve().parents[2]
MLP = REPO / "examples" / "train_mlp.py"


def test_top_once_shows_rank_0_and_module_rows_of_a_running_job(tmp_path: Path) -> None:
    out, port = tmp_path / "run", free_port()
    argv = [sys.executable, "-m", "hooktrace.cli.main", "run", "--metrics-port", str(port), "--out", str(out),
            str(MLP), "--steps", "200", "--step-sleep", "0.02"]  # fmt: skip
    job = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    frame = ""
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and job.poll() is None:
            if (out / "targets.json").exists():
                options = ["--targets", str(out / "targets.json"), "--once", "--top", "10"]  # every module shown
                result = CliRunner().invoke(top_command, options)
                frame = result.output
                if result.exit_code == 0 and ["forward", "Sequential"] in _starts(frame, 2):
                    break
            time.sleep(0.2)
    finally:
        _, stderr = job.communicate(timeout=60)
    assert job.returncode == 0, stderr
    assert "1/1 ranks up" in frame, frame
    assert ["0", f"127.0.0.1:{port}", "up"] in _starts(frame, 3), frame  # rank, target, status
    for module in ("Sequential", "0", "2", "4"):
        assert ["forward", module] in _starts(frame, 2), frame


def _starts(frame: str, words: int) -> list[list[str]]:
    """The first ``words`` words of every line of a frame (table cells are separated by spaces)."""
    return [line.split()[:words] for line in frame.splitlines()]
