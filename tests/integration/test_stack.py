"""``hooktrace stack``: real Prometheus and Alertmanager from PATH, watching a real ``hooktrace run``."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from click.testing import CliRunner, Result

from hooktrace.cli.stack import stack_group
from tests.servers import REPO_ROOT, free_port, http_get_json, require_binary, wait_for_series

RECORDING_RULES = {
    "hooktrace:busy_seconds:mean5m",
    "hooktrace:step_duration_seconds:mean5m",
    "hooktrace:straggler_skew:ratio",
    "hooktrace:step_duration_seconds:ratio_to_median",
    "hooktrace:memory_reserved:ratio",
}
ALERTS = {
    "HooktraceGradientExplosion",
    "HooktraceNonFiniteGradients",
    "HooktraceStraggler",
    "HooktraceTrainingStalled",
    "HooktraceAgentDropping",
    "HooktraceMemoryNearLimit",
}


def stack(*args: str) -> Result:
    return CliRunner().invoke(stack_group, list(args), catch_exceptions=False)


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def recorded_pids(state: Path) -> dict[str, int]:
    return {p.stem: int(p.read_text()) for p in state.glob("*.pid")}


@contextmanager
def stack_up(state: Path, runs: Path) -> Iterator[str]:
    """``stack up`` on free ports; yields the Prometheus URL; ``stack down`` on exit, whatever happened."""
    require_binary("prometheus")
    require_binary("prometheus-alertmanager", "alertmanager")
    prometheus_port, alertmanager_port = free_port(), free_port()
    try:
        result = stack(
            "up", "--state-dir", str(state), "--runs-dir", str(runs), "--scrape-interval", "1",
            "--prometheus-port", str(prometheus_port), "--alertmanager-port", str(alertmanager_port),
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        yield f"http://127.0.0.1:{prometheus_port}"
    finally:
        stack("down", "--state-dir", str(state))


def wait_for_exemplars(url: str, selector: str, timeout: float = 30.0) -> list[str]:
    """The trace ids of the exemplars Prometheus stored for ``selector`` (it keeps them: exemplar-storage)."""
    deadline = time.monotonic() + timeout
    while True:
        now = time.time()
        params = urllib.parse.urlencode({"query": selector, "start": now - 300, "end": now})
        series = http_get_json(f"{url}/api/v1/query_exemplars?{params}")["data"]
        trace_ids = [e["labels"]["trace_id"] for s in series for e in s["exemplars"]]
        if trace_ids or time.monotonic() > deadline:
            assert trace_ids, f"no exemplar for {selector} after {timeout}s"
            return trace_ids
        time.sleep(0.5)


def test_stack_up_scrapes_a_real_run_with_the_rules_loaded_and_down_leaves_no_process(tmp_path: Path) -> None:
    state, runs = tmp_path / "state", tmp_path / "runs"
    run_log = tmp_path / "run.log"
    with stack_up(state, runs) as prometheus:
        pids = recorded_pids(state)
        assert set(pids) == {"prometheus", "alertmanager", "targets"}
        status = stack("status", "--state-dir", str(state))
        assert status.exit_code == 0, status.output
        assert prometheus in status.output and status.output.count(" running ") == 3

        with run_log.open("wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "hooktrace.cli.main", "run", "--metrics-port", str(free_port()),
                 "--run-id", "stacktest", "--out", str(runs / "r1"), "examples/train_mlp.py",
                 "--steps", "200", "--step-sleep", "0.02", "--sleep-after", "20"],
                cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        try:
            wait_for_series(
                prometheus, 'hooktrace_steps_total{run_id="stacktest", rank="0"} > 0', 90.0, run=proc, run_log=run_log
            )
            trace_ids = wait_for_exemplars(prometheus, 'hooktrace_step_duration_seconds_bucket{run_id="stacktest"}')
            assert all(len(t) == 32 for t in trace_ids)
        finally:
            proc.terminate()
            proc.wait(timeout=30)

        groups = http_get_json(f"{prometheus}/api/v1/rules")["data"]["groups"]
        rules = {rule["name"] for group in groups for rule in group["rules"]}
        assert rules == RECORDING_RULES | ALERTS
        flags = http_get_json(f"{prometheus}/api/v1/status/flags")["data"]
        assert "exemplar-storage" in flags["enable-feature"]
        alertmanagers = http_get_json(f"{prometheus}/api/v1/alertmanagers")["data"]["activeAlertmanagers"]
        assert len(alertmanagers) == 1

    assert recorded_pids(state) == {}
    assert [name for name, pid in pids.items() if not gone(pid)] == []
    after = stack("status", "--state-dir", str(state))
    assert after.exit_code == 1 and after.output.count(" stopped") == 3


def test_stack_up_names_the_flag_in_one_line_when_a_port_is_taken(tmp_path: Path) -> None:
    require_binary("prometheus")
    require_binary("prometheus-alertmanager", "alertmanager")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = CliRunner().invoke(
            stack_group,
            [
                "up",
                "--state-dir",
                str(tmp_path),
                "--prometheus-port",
                str(port),
                "--alertmanager-port",
                str(free_port()),
            ],
        )
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"Error: port {port} on 127.0.0.1 is in use; pick a free one with --prometheus-port"
    ]
    assert recorded_pids(tmp_path) == {}


def test_stack_down_leaves_alone_a_process_that_now_has_a_recorded_pid(tmp_path: Path) -> None:
    stranger = subprocess.Popen(["sleep", "30"])
    deadline = time.monotonic() + 10
    while b"sleep" not in Path(f"/proc/{stranger.pid}/cmdline").read_bytes():  # exec has happened
        assert time.monotonic() < deadline
        time.sleep(0.01)
    try:
        entry = {"pid": stranger.pid, "argv": ["/usr/bin/prometheus", "--config.file=x"]}
        (tmp_path / "stack.json").write_text(json.dumps({"prometheus": entry}))
        (tmp_path / "prometheus.pid").write_text(f"{stranger.pid}\n")
        result = stack("down", "--state-dir", str(tmp_path))
        assert result.exit_code == 0
        assert "left alone" in result.output
        assert stranger.poll() is None
        assert recorded_pids(tmp_path) == {}
    finally:
        stranger.kill()
        stranger.wait()


def test_stack_status_exits_1_when_nothing_was_started(tmp_path: Path) -> None:
    result = stack("status", "--state-dir", str(tmp_path))
    assert result.exit_code == 1
    assert [line.split()[:2] for line in result.output.splitlines()[1:]] == [
        ["prometheus", "stopped"],
        ["targets", "stopped"],
        ["alertmanager", "stopped"],
    ]


def test_stack_up_refuses_equal_ports_naming_both_flags(tmp_path: Path) -> None:
    result = stack("up", "--state-dir", str(tmp_path), "--prometheus-port", "19999", "--alertmanager-port", "19999")
    assert result.exit_code == 1
    assert "--prometheus-port and --alertmanager-port must differ" in result.output
