"""`make bench`'s overhead benchmarks run and report every mode (a tiny configuration: their
figures belong to `make bench`, not to tests; this keeps them from rotting unnoticed)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RATIO = r"[+-]\d+\.\d% \[[+-]\d+\.\d, [+-]\d+\.\d\]"
TRACEML_INSTALLED = importlib.util.find_spec("traceml_ai") is not None


def bench(script: str, *args: str, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "warning:" not in result.stderr, result.stderr[-2000:]  # steps lost, hook errors
    return result.stdout


def rows(out: str, workload: str) -> dict[str, str]:
    """The indented mode lines under ``overhead WORKLOAD:``, by mode name."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"overhead {workload}:"))
    found = {}
    for line in lines[start + 1 :]:
        if not line.startswith("  "):
            break
        mode, _, rest = line.strip().partition("  ")
        found[mode] = rest.strip()
    return found


def _traceml_processes() -> set[int]:
    """Processes with "traceml" in their command line (its aggregator, the peer's child)."""
    found = set()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            if b"traceml" in cmdline and b"pytest" not in cmdline:
                found.add(int(proc.name))
    return found


def test_overhead_benchmark_reports_each_mode_against_bare() -> None:
    before = _traceml_processes()
    out = bench("bench_overhead.py", "--workloads", "mlp", "--rounds", "2", "--steps", "20", "--control")
    found = rows(out, "mlp")
    for mode in ("hooktrace default", "hooktrace --sample-every 1 --flow-every 0", "torch.profiler (CPU)"):
        assert re.match(RATIO, found[mode]), found
    assert re.match(RATIO, found["control: 2nd bare copy"]), found
    for mode in ("hooktrace default", "hooktrace --sample-every 1 --flow-every 0"):  # what the agent says itself
        assert re.search(r"self-reported [+-]\d+\.\d% \([\d.]+% of its step time; ", found[mode]), found[mode]
    traceml = [mode for mode in found if mode.startswith("TraceML trace_step")]
    if TRACEML_INSTALLED:
        assert len(traceml) == 1 and re.match(RATIO, found[traceml[0]]), found
        assert _traceml_processes() <= before  # its aggregator and its child process are gone
    else:
        assert not traceml
        assert "TraceML trace_step: skipped, traceml-ai is not installed (pip install -e '.[bench]'" in out


def test_overhead_benchmark_without_traceml_says_so_in_one_line_and_measures_the_rest(tmp_path: Path) -> None:
    """An installed-but-unimportable traceml_ai (shadowed here) is the same as none."""
    shadow = tmp_path / "traceml_ai"
    shadow.mkdir()
    (shadow / "__init__.py").write_text("raise ImportError('not installed')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))}
    out = bench("bench_overhead.py", "--workloads", "mlp", "--rounds", "1", "--steps", "10", env=env)
    skipped = [line for line in out.splitlines() if "TraceML" in line]
    assert skipped == ["TraceML trace_step: skipped, traceml-ai is not installed (pip install -e '.[bench]' adds it)"]
    assert re.match(RATIO, rows(out, "mlp")["hooktrace default"])


def test_anatomy_benchmark_times_the_agents_code() -> None:
    out = bench("bench_anatomy.py", "--workloads", "cnn", "--steps", "100")  # step 101 is a flow step
    line = next(line for line in out.splitlines() if line.startswith("anatomy cnn"))
    numbers = re.search(
        r"inside hooktrace (\d+) us per step \(([\d.]+) %\): unsampled step (\d+) us, sampled step (\d+) us, "
        r"flow step (\d+) us \| gradient norms (\d+) us every step, flow norms (\d+) us per flow step "
        r"\((\d+) of them\): norms alone ([\d.]+) %",
        line,
    )
    assert numbers, line
    unsampled, sampled, flow_step, capture, flow, flow_steps = (int(numbers[i]) for i in (3, 4, 5, 6, 7, 8))
    # a smoke test: the parts are timed inside the totals by construction, so only that they ran
    assert capture > 0 and flow > 0 and unsampled > 0 and flow_steps == 1
    assert flow_step > sampled > unsampled  # module hooks on sampled steps only, flow norms on top


def test_gpu_check_runs_its_checks_on_a_tiny_model_on_the_cpu() -> None:
    """`make gpu-check` is for a lent GPU; the same code runs here on a tiny model so it cannot rot."""
    out = bench("gpu_check.py", "--device", "cpu", "--tiny", "--rounds", "1", "--steps", "2", "--no-tests")
    assert "sync-debug loop: 20 steps with the agent attached, no host sync, no hook error" in out
    modes = re.findall(r"^overhead (.+): [+-][\d.]+ %$", out, flags=re.M)
    assert modes == [
        "hooktrace default",
        "hooktrace --memory off",
        "hooktrace --sample-every 1 --flow-every 0",
        "hooktrace --sample-every 1 --flow-every 0 --memory-every 1",
        "hooktrace --sample-every 1 --flow-every 0 --memory off",
        "torch.profiler",
    ]


def test_grad_norm_benchmark_runs_on_a_small_model_of_the_same_shape() -> None:
    """`make bench` runs it on a 100M-parameter model; the same code runs here small, so it cannot rot."""
    out = bench("bench_grad_norms.py", "--small")
    assert re.search(r"grad norms, \d+M params in \d+ tensors: capture [\d.]+ ms on the training thread", out), out
