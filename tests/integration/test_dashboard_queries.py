"""Every query of every committed dashboard returns data from a real run scraped by a real Prometheus.

One ``hooktrace run`` of examples/train_mlp.py (one rank) is scraped every second by Prometheus
through the run's file_sd ``targets.json``, with the recording rules of deploy/rules loaded. Each
panel target and each variable query is then run as an instant query, with the dashboard variables
set the way Grafana would (``$run_id`` = the run, the multi-value variables = their "All" value).

A few targets cannot have data in such a run: their series appear with an event (a clip, a
non-finite gradient, a drop, an exporter error). They are listed in MAY_BE_EMPTY with the reason;
they must still be valid PromQL.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from grafana.queries import PANEL_QUERIES, VARIABLE_QUERIES, Query, load_dashboard, substitute, variable_values
from tests.servers import RULES_FILE, PrometheusServer, free_port, require_binary, start_prometheus, stop_process

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "train_mlp.py"

STEPS = 200
EXAMPLE_ARGS = ("--steps", str(STEPS), "--step-sleep", "0.05", "--sleep-after", "300")
"""~10 s of training, so Prometheus scrapes the counters while they move (rates, the recording
rules' ``rate(...[5m]) > 0``); then the script idles and keeps /metrics up until the test stops it."""

MAY_BE_EMPTY: dict[tuple[str, str, str], str] = {
    ("hooktrace-training", "Gradient events", "C"): (
        "hooktrace_grad_clips_total is labelled by module: a series exists after the first clip "
        "(--on-explosion clip and a gradient spike)"
    ),
    ("hooktrace-training", "Clipped modules", "A"): "hooktrace_grad_clips_total: as above",
    ("hooktrace-training", "GPU memory reserved / device", "A"): (
        "hooktrace:memory_reserved:ratio needs the CUDA allocator's reserved bytes and the device's memory: "
        "a CPU run has neither"
    ),
    ("hooktrace-training", "Where gradients went non-finite", "A"): (
        "hooktrace_nonfinite_events_total is labelled by the first non-finite module: a series "
        "exists after the first NaN/Inf gradient"
    ),
}
"""(dashboard uid, panel title, refId) -> why a one-rank run without events leaves it empty."""

_LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(?:(?P<selector>.+?)\s*,\s*)?(?P<label>\w+)\s*\)\s*$", re.DOTALL)


def label_values_query(text: str) -> tuple[str, str]:
    """Grafana's ``label_values([selector, ]label)`` as PromQL listing the values: (query, label)."""
    match = _LABEL_VALUES.match(text)
    assert match, f"not a label_values() query: {text!r}"
    label = match["label"]
    selector = match["selector"] or f'{{{label}!=""}}'
    return f"count by ({label}) ({selector})", label


def _finite(result: list[dict[str, Any]]) -> list[float]:
    return [v for v in (float(series["value"][1]) for series in result) if math.isfinite(v)]


def _eventually(prometheus: PrometheusServer, promql: str, timeout: float = 20.0) -> list[dict[str, Any]]:
    """Poll promql until a series has a finite value (rules and scrapes lag a little); return the last."""
    deadline = time.monotonic() + timeout
    while True:
        result = prometheus.query(promql)
        if _finite(result) or time.monotonic() > deadline:
            return result
        time.sleep(0.5)


@dataclass(frozen=True)
class LiveRun:
    prometheus: PrometheusServer
    run_id: str
    log: Path


@pytest.fixture(scope="module")
def live_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveRun]:
    command = [sys.executable, "-m", "hooktrace.cli.main"]
    require_binary("prometheus")
    assert EXAMPLE.exists(), f"{EXAMPLE} is missing"
    tmp = tmp_path_factory.mktemp("dashboard-queries")
    out = tmp / "run"
    run_id = f"dash-{uuid.uuid4().hex[:8]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HOOKTRACE_", "OTEL_"))}
    argv = [
        *command, "run", "--run-id", run_id, "--metrics-port", str(free_port()), "--out", str(out),
        "--sample-every", "2", str(EXAMPLE), *EXAMPLE_ARGS,
    ]  # fmt: skip
    # Prometheus first: it reads targets.json as soon as the run writes it, and sees every step.
    with start_prometheus(tmp, scrape_targets_file=out / "targets.json", rule_files=[RULES_FILE]) as prometheus:
        log = tmp / "hooktrace-run.log"
        with log.open("wb") as sink:
            run = subprocess.Popen(argv, cwd=tmp, env=env, stdin=subprocess.DEVNULL, stdout=sink, stderr=sink)
            try:
                deadline = time.monotonic() + 180
                # Half way: the counters have moved over several scrapes (the last step of a run
                # may only be counted when it closes, so never wait for STEPS itself).
                under_way = f'hooktrace_steps_total{{run_id="{run_id}"}} >= {STEPS // 2}'
                prometheus.wait_for(under_way, deadline - time.monotonic(), run=run, run_log=log)
                rules = f'hooktrace:step_duration_seconds:mean5m{{run_id="{run_id}"}}'
                prometheus.wait_for(rules, deadline - time.monotonic(), run=run, run_log=log)
                yield LiveRun(prometheus, run_id, log)
            finally:
                stop_process(run)


def test_every_may_be_empty_entry_names_an_existing_target() -> None:
    keys = {query.key for query in PANEL_QUERIES}
    assert set(MAY_BE_EMPTY) <= keys, sorted(set(MAY_BE_EMPTY) - keys)


def test_substitution_sets_the_run_and_all_values_and_refuses_unknown_variables() -> None:
    values = {"run_id": "r-1", "rank": ".*", "__rate_interval": "2m"}
    text = 'rate(x{run_id=~"$run_id", rank=~"${rank:regex}"}[$__rate_interval]) [[rank]]'
    assert substitute(text, values) == 'rate(x{run_id=~"r-1", rank=~".*"}[2m]) .*'
    with pytest.raises(KeyError):
        substitute("$nope", values)
    assert label_values_query('label_values(m{a="$b"}, rank)') == ('count by (rank) (m{a="$b"})', "rank")
    assert label_values_query("label_values(rank)") == ('count by (rank) ({rank!=""})', "rank")


@pytest.mark.parametrize("query", PANEL_QUERIES, ids=str)
def test_every_panel_query_returns_data_from_a_live_run(live_run: LiveRun, query: Query) -> None:
    expr = substitute(query.expr, variable_values(load_dashboard(query.file), live_run.run_id))
    if query.key in MAY_BE_EMPTY:
        live_run.prometheus.query(expr)  # still valid PromQL
        return
    result = _eventually(live_run.prometheus, expr)
    assert result, f"no series for {expr!r}"
    assert _finite(result), f"no finite value for {expr!r}: {result}"


@pytest.mark.parametrize("query", VARIABLE_QUERIES, ids=str)
def test_every_variable_query_lists_values_from_a_live_run(live_run: LiveRun, query: Query) -> None:
    promql, label = label_values_query(
        substitute(query.expr, variable_values(load_dashboard(query.file), live_run.run_id))
    )
    values = {series["metric"].get(label, "") for series in _eventually(live_run.prometheus, promql)}
    assert values and "" not in values, f"{promql!r} lists {values}"
    if label == "run_id":
        assert live_run.run_id in values
