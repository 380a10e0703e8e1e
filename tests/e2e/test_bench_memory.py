"""`make bench`'s memory benchmark runs and reports its figures (tiny blocks: the figures belong
to `make bench`; this keeps the script from rotting unnoticed)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_the_memory_benchmark_reports_the_cost_of_a_sampled_step() -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_memory.py"), "--workloads", "mlp", "--rounds", "1",
         "--block", "3"],
        capture_output=True, text=True, timeout=300, cwd=REPO, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    line = result.stdout.strip().splitlines()[-1]
    assert re.match(r"memory mlp +sampled step [\d.]+ ms with --memory on, [\d.]+ ms off: [+-]\d+ us", line), line
    saves = re.search(r"(\d+) module calls, (\d+) saves, (\d+) unpacks", line)
    assert saves is not None and int(saves[1]) > 0 and int(saves[2]) > 0 and saves[2] == saves[3], line
    assert "activations 0.20 MiB" in line
