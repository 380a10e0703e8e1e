"""`make bench`'s overhead benchmarks run and report every mode (a tiny configuration: their
figures belong to `make bench`, not to tests; this keeps them from rotting unnoticed)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def bench(script: str, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "warning:" not in result.stderr, result.stderr[-2000:]  # steps lost, hook errors
    return result.stdout


def test_overhead_benchmark_reports_each_mode_against_bare() -> None:
    out = bench("bench_overhead.py", "--workloads", "cnn", "--rounds", "2", "--control")
    line = next(line for line in out.splitlines() if line.startswith("overhead cnn"))
    for mode in ("hooktrace default", "hooktrace --sample-every 1", "torch.profiler", "control: 2nd bare copy"):
        assert re.search(re.escape(mode) + r": [+-]\d+\.\d% \[[+-]\d+\.\d, [+-]\d+\.\d\]", line), line


def test_anatomy_benchmark_times_the_agents_code() -> None:
    out = bench("bench_anatomy.py", "--workloads", "cnn", "--steps", "30")
    line = next(line for line in out.splitlines() if line.startswith("anatomy cnn"))
    numbers = re.search(
        r"inside hooktrace (\d+) us per step \(([\d.]+) %\): unsampled step (\d+) us, sampled step (\d+) us \| "
        r"gradient norms (\d+) us every step, flow norms (\d+) us per sampled step: norms alone ([\d.]+) %",
        line,
    )
    assert numbers, line
    unsampled, sampled, capture, flow = (int(numbers[i]) for i in (3, 4, 5, 6))
    # a smoke test: the parts are timed inside the totals by construction, so only that they ran
    assert capture > 0 and flow > 0 and unsampled > 0
    assert sampled > unsampled  # module hooks run on sampled steps only
