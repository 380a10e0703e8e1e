"""A real two-rank gloo job: the agents agree on the slowest rank through the process group's store."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import retry_gloo_abort
from tests.servers import free_port

REPO = Path(__file__).resolve().parents[2]
PROBE = REPO / "tests" / "scripts" / "store_probe.py"


def test_both_ranks_read_the_slowest_rank_and_each_busy_time_from_the_store(tmp_path: Path) -> None:
    argv = [
        sys.executable, "-m", "hooktrace.cli.main", "run", "--run-id", "store-probe", "--metrics-port", "0",
        "--out", str(tmp_path / "run"), "--nproc-per-node", "2", "--master-port", str(free_port()), str(PROBE),
    ]  # fmt: skip
    result = retry_gloo_abort(lambda: subprocess.run(argv, capture_output=True, text=True, timeout=180, cwd=tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    lines = sorted(re.findall(r"rank (\d) store (.*)", result.stdout))
    assert [rank for rank, _ in lines] == ["0", "1"], result.stdout
    for _, found in lines:
        values = json.loads(found)
        assert values["slowest"] == "1"
        assert int(values["busy_us/1"]) > int(values["busy_us/0"]) > 0
