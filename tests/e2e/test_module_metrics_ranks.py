"""--module-metrics-ranks 0 on a real two-rank gloo run scraped by a real Prometheus with the rules.

Rank 1 exports step-level series only, within the README's budget; every dashboard panel and the
straggler and gradient rules still have data for both ranks (module panels: from rank 0).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from grafana.queries import DASHBOARD_FILES, PANEL_QUERIES, Query, substitute, variable_values
from hooktrace.export.series_budget import STEP_LEVEL_BUDGET
from tests.integration.test_dashboard_queries import MAY_BE_EMPTY
from tests.servers import (
    RULES_FILE,
    PrometheusServer,
    free_port,
    http_get_json,
    require_binary,
    start_prometheus,
    stop_process,
)

REPO = Path(__file__).resolve().parents[2]
DDP = REPO / "examples" / "train_ddp.py"
STEPS = 200
MODULE_FAMILIES = (
    "hooktrace_module_duration_seconds",
    "hooktrace_module_type_duration_seconds",
    "hooktrace_module_activation_bytes",
)


@dataclass(frozen=True)
class TwoRanks:
    prometheus: PrometheusServer
    run_id: str
    targets: dict[str, str]
    """rank -> host:port of its /metrics."""


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwoRanks]:
    require_binary("prometheus")
    tmp = tmp_path_factory.mktemp("module-metrics-ranks")
    out, run_id = tmp / "run", f"mmr-{uuid.uuid4().hex[:8]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HOOKTRACE_", "OTEL_"))}
    argv = [
        sys.executable, "-m", "hooktrace.cli.main", "run", "--run-id", run_id, "--out", str(out),
        "--metrics-port", str(free_port()), "--sample-every", "2", "--module-metrics-ranks", "0",
        "--nproc-per-node", "2", "--master-port", str(free_port()),
        str(DDP), "--steps", str(STEPS), "--slow-rank", "1", "--slow-s", "0.03", "--sleep-after", "300",
    ]  # fmt: skip
    with start_prometheus(tmp, scrape_targets_file=out / "targets.json", rule_files=[RULES_FILE]) as prometheus:
        log = tmp / "run.log"
        with log.open("wb") as sink:
            run = subprocess.Popen(argv, cwd=tmp, env=env, stdin=subprocess.DEVNULL, stdout=sink, stderr=sink)
            try:
                deadline = time.monotonic() + 240
                for rank in ("0", "1"):
                    done = f'hooktrace_steps_total{{run_id="{run_id}", rank="{rank}"}} >= {STEPS - 1}'
                    prometheus.wait_for(done, deadline - time.monotonic(), run=run, run_log=log)
                ratio = f'count(hooktrace:step_duration_seconds:ratio_to_median{{run_id="{run_id}"}}) == 2'
                prometheus.wait_for(ratio, deadline - time.monotonic(), run=run, run_log=log)
                entries = json.loads((out / "targets.json").read_text())
                targets = {e["labels"]["rank"]: e["targets"][0] for e in entries if e["labels"]["run_id"] == run_id}
                yield TwoRanks(prometheus, run_id, targets)
            finally:
                stop_process(run)


def _series(target: str) -> list[str]:
    with urllib.request.urlopen(f"http://{target}/metrics", timeout=10) as response:
        text = response.read().decode()
    return [line for line in text.splitlines() if line and not line.startswith("#")]


def test_rank_1_exports_no_per_module_series_and_stays_within_the_budget(two_ranks: TwoRanks) -> None:
    rank1, rank0 = _series(two_ranks.targets["1"]), _series(two_ranks.targets["0"])
    assert not [line for line in rank1 if line.startswith(MODULE_FAMILIES)]
    assert not [line for line in rank1 if 'module="' in line and 'module="__total__"' not in line]
    assert len(rank1) <= STEP_LEVEL_BUDGET, f"{len(rank1)} series on rank 1"
    assert any(line.startswith(MODULE_FAMILIES) for line in rank0) and len(rank0) > len(rank1)


def _module_level(query: Query) -> bool:
    """A panel of per-module series: module times, module-type histograms, activations, module norms."""
    return any(family in query.expr for family in MODULE_FAMILIES) or 'module!="__total__"' in query.expr


def _ranks_with_data(prometheus: PrometheusServer, expr: str, want: set[str], timeout: float = 20.0) -> set[str]:
    """Poll until ``want`` ranks (or, for series without a rank, any series) have a value."""
    deadline = time.monotonic() + timeout
    while True:
        result = prometheus.query(expr)
        ranks = {s["metric"].get("rank", "any") for s in result if s["value"][1] not in ("NaN", "+Inf", "-Inf")}
        if want <= ranks or ("any" in ranks) or time.monotonic() > deadline:
            return ranks
        time.sleep(0.5)


@pytest.mark.parametrize("query", [q for q in PANEL_QUERIES if q.key not in MAY_BE_EMPTY], ids=str)
def test_every_dashboard_panel_has_data_for_both_ranks_or_from_rank_0_for_module_panels(
    two_ranks: TwoRanks, query: Query
) -> None:
    model = json.loads(next(p for p in DASHBOARD_FILES if p.name == query.file).read_text())
    expr = substitute(query.expr, variable_values(model, two_ranks.run_id))
    want = {"0"} if _module_level(query) else {"0", "1"}
    ranks = _ranks_with_data(two_ranks.prometheus, expr, want)
    assert ranks == want or ranks == {"any"}, f"{expr!r} has data for ranks {ranks}, want {want}"


def test_the_straggler_and_gradient_rules_see_both_ranks_from_step_level_series(two_ranks: TwoRanks) -> None:
    prometheus, run = two_ranks.prometheus, f'run_id="{two_ranks.run_id}"'
    ratios = {s["metric"]["rank"]: float(s["value"][1]) for s in prometheus.query(
        f"hooktrace:step_duration_seconds:ratio_to_median{{{run}}}")}  # fmt: skip
    assert set(ratios) == {"0", "1"} and ratios["1"] > 1.2 > ratios["0"], ratios
    spikes = prometheus.query(f"sum by (run_id, rank) (increase(hooktrace_grad_spike_steps_total{{{run}}}[2m]))")
    assert {s["metric"]["rank"] for s in spikes} == {"0", "1"}
    alerts: list[dict[str, Any]] = http_get_json(f"{prometheus.url}/api/v1/alerts")["data"]["alerts"]
    straggling = {a["labels"]["rank"] for a in alerts if a["labels"]["alertname"] == "HooktraceStraggler"}
    assert straggling == {"1"}, alerts  # pending: the rule's for: 5m has not passed yet
