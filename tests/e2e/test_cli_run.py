"""`hooktrace run` end to end, in real subprocesses: behaves like python, writes the run's files."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import read_steps, read_trace

REPO = Path(__file__).resolve().parents[2]
MLP = REPO / "examples" / "train_mlp.py"


def hooktrace(*args: str, cwd: Path | None = None, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hooktrace.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        **kwargs,  # type: ignore[call-overload]
    )


def test_run_passes_argv_name_path_and_exit_code_through_and_writes_files(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = hooktrace(
        "run",
        "--metrics-port",
        "0",
        "--out",
        str(out),
        "--sample-every",
        "5",
        str(MLP),
        "--steps",
        "20",
        "--print-argv",
        "--exit-code",
        "3",
    )
    assert result.returncode == 3, result.stderr
    assert f"argv: ['{MLP}', '--steps', '20', '--print-argv', '--exit-code', '3']" in result.stdout
    assert "name: __main__" in result.stdout
    assert f"path0: {MLP.parent}" in result.stdout
    assert "hooktrace: run" in result.stderr and "20 steps" in result.stderr
    steps = read_steps(out)
    assert [s["step"] for s in steps] == list(range(1, 21))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 20 and summary["world_size"] == 1
    assert {"0", "2", "4"} <= {m["module"] for m in summary["modules"]}
    names = {e["name"] for e in read_trace(out) if e.get("ph") == "X"}
    assert {"step 1", "step 6", "forward 0", "backward 4", "forward Sequential"} <= names


def test_run_module_mode_behaves_like_python_dash_m(tmp_path: Path) -> None:
    pkg = tmp_path / "mypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "train.py").write_text((MLP).read_text())
    result = hooktrace(
        "run",
        "--metrics-port",
        "0",
        "--out",
        str(tmp_path / "o"),
        "-m",
        "mypkg.train",
        "--steps",
        "3",
        "--print-argv",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "name: __main__" in result.stdout
    assert len(read_steps(tmp_path / "o")) == 3


def test_a_script_that_raises_shows_its_own_traceback_and_exit_code_and_keeps_files(tmp_path: Path) -> None:
    script = tmp_path / "crash.py"
    script.write_text(MLP.read_text().replace("    time.sleep(args.sleep_after)", "    raise ValueError('bad batch')"))
    result = hooktrace("run", "--metrics-port", "0", "--out", str(tmp_path / "o"), str(script), "--steps", "4")
    assert result.returncode == 1
    assert "Traceback (most recent call last):" in result.stderr
    assert "ValueError: bad batch" in result.stderr
    assert "hooktrace/cli" not in result.stderr and "runpy" not in result.stderr
    assert len(read_steps(tmp_path / "o")) == 4
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["steps"] == 4


def test_sigterm_flushes_files_and_prints_the_summary(tmp_path: Path) -> None:
    out = tmp_path / "o"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "hooktrace.cli.main",
            "run",
            "--metrics-port",
            "0",
            "--out",
            str(out),
            str(MLP),
            "--steps",
            "100000",
            "--step-sleep",
            "0.002",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not (out / "rank0.steps.jsonl").exists() or (out / "rank0.steps.jsonl").stat().st_size == 0:
            assert time.monotonic() < deadline, "no step was written"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM
    assert "hooktrace: run" in err
    steps = read_steps(out)
    assert steps and [s["step"] for s in steps] == list(range(1, len(steps) + 1))
    # a SIGTERM that lands before the step's optimizer step leaves that step partial: its line is
    # written and says so, and it is not counted as a step
    assert not any(s.get("partial") for s in steps[:-1])
    partial = bool(steps[-1].get("partial"))
    read_trace(out)  # closed, valid JSON
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == len(steps) - partial
    assert summary["ranks"][0]["partial_steps"] == partial


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "missing.py"], "can't open file 'missing.py'"),
        (["run", "--bogus", "x.py"], "No such option '--bogus'"),
        (
            ["run", "--sample-every", "0", str(MLP)],
            "--sample-every / HOOKTRACE_SAMPLE_EVERY must be a positive integer",
        ),
        (["run", "--backward", "maybe", str(MLP)], "'maybe' is not one of 'auto', 'full', 'off'"),
        (["run", "-m", "no_such_module_xyz"], "no module named 'no_such_module_xyz'"),
        (["run"], "missing SCRIPT"),
        (["run", "-m"], "missing MODULE"),
    ],
)
def test_bad_input_gets_one_clear_line_and_exit_code_2(args: list[str], message: str, tmp_path: Path) -> None:
    result = hooktrace(*args, cwd=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_a_taken_metrics_port_moves_to_the_next_one_with_one_line(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = hooktrace("run", "--metrics-port", str(port), "--out", str(tmp_path / "o"), str(MLP), "--steps", "3")
    assert result.returncode == 0, result.stderr
    assert result.stderr.count(f"port {port} is taken") == 1
    targets = json.loads((tmp_path / "o" / "targets.json").read_text())
    assert targets[0]["targets"][0] != f"127.0.0.1:{port}"


def test_environment_variables_configure_the_run(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "HOOKTRACE_OUT": str(tmp_path / "env-out"),
        "HOOKTRACE_METRICS_PORT": "0",
        "HOOKTRACE_SAMPLE_EVERY": "2",
        "HOOKTRACE_RUN_ID": "from-env",
    }
    result = hooktrace("run", str(MLP), "--steps", "4", env=env)
    assert result.returncode == 0, result.stderr
    steps = read_steps(tmp_path / "env-out")
    assert [s["sampled"] for s in steps] == [True, False, True, False]
    assert json.loads((tmp_path / "env-out" / "summary.json").read_text())["run_id"] == "from-env"


def test_report_prints_the_summary_of_a_run_directory(tmp_path: Path) -> None:
    hooktrace("run", "--metrics-port", "0", "--out", str(tmp_path / "o"), str(MLP), "--steps", "3")
    result = hooktrace("report", str(tmp_path / "o"))
    assert result.returncode == 0 and "3 steps" in result.stdout and "Slowest modules" in result.stdout
