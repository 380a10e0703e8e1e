"""`make scale-sim` in a small configuration: 50 synthetic ranks scraped by a real Prometheus for 30 s.

The figures of the 100- and 1,000-rank runs belong to the README ("Scale"); this keeps the
simulation working and checks what it proves: the alerts fire for the right rank from step-level
series, per-module series come only from the chosen ranks, and every dashboard query runs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from hooktrace.export.series_budget import STEP_LEVEL_BUDGET
from tests.integration.test_dashboard_queries import MAY_BE_EMPTY, PANEL_QUERIES
from tests.servers import require_binary

REPO = Path(__file__).resolve().parents[2]


def test_fifty_simulated_ranks_fire_both_alerts_for_the_right_ranks_within_the_series_budget(tmp_path: Path) -> None:
    require_binary("prometheus")
    out = tmp_path / "sim.json"
    args = ["--ranks", "50", "--duration", "30", "--scrape-interval", "1", "--alert-for", "5s", "--json", str(out)]
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "scale_sim.py"), *args],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    report = json.loads(out.read_text())
    # straggler 30 (50 // 2 + 5), spike on rank 18 (50 // 3 + 2): neither is its node's first rank
    assert report["alerts"] == {"HooktraceStraggler": ["30"], "HooktraceGradientExplosion": ["18"]}
    assert report["ranks_seen"] == 50 and report["targets_down"] == []
    # auto: rank 0 and one rank per node (ranks 0, 8, ..., 48), then the straggler once known
    assert report["module_metrics_ranks"] == 8
    assert 0 < report["step_level_rank_max"] <= STEP_LEVEL_BUDGET < report["module_rank_max"]
    assert report["head_series"] > 50 * report["step_level_rank_max"] * 0.9
    assert report["memory_mib_max"] > 0 and set(report["rule_groups_ms"]) == {"hooktrace.recording", "hooktrace.alerts"}
    assert [q["query"] for q in report["dashboard_queries"]] == [str(q) for q in PANEL_QUERIES]
    must_have_data = {str(q) for q in PANEL_QUERIES if q.key not in MAY_BE_EMPTY}
    assert not [q for q in report["dashboard_queries"] if q["query"] in must_have_data and not q["series"]]
    assert "alerts for the right ranks (straggler rank 30, spike rank 18 at 10 s): yes" in result.stdout
