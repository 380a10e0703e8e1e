"""The Prometheus rules file: valid, unit-tested, and true to the names in DESIGN §4."""

from __future__ import annotations

import re
import subprocess
from typing import Any

import pytest
import yaml

from tests.servers import REPO_ROOT, RULES_FILE, RULES_TEST_FILE, require_binary

# DESIGN §4: dashboards, docs and users rely on these names.
DESIGN_ALERTS = {
    "HooktraceGradientExplosion",
    "HooktraceNonFiniteGradients",
    "HooktraceStraggler",
    "HooktraceTrainingStalled",
    "HooktraceAgentDropping",
    "HooktraceMemoryNearLimit",
}
DESIGN_RECORDING_RULES = {
    "hooktrace:step_duration_seconds:mean5m",
    "hooktrace:straggler_skew:ratio",
    "hooktrace:step_duration_seconds:ratio_to_median",
}


def _rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES_FILE.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def _alerts() -> list[dict[str, Any]]:
    return [rule for rule in _rules() if "alert" in rule]


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    promtool = require_binary("promtool")
    return subprocess.run([promtool, *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=False)


def test_promtool_check_rules_accepts_the_rules_file() -> None:
    result = _promtool("check", "rules", str(RULES_FILE.relative_to(REPO_ROOT)))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_rule_unit_tests_pass() -> None:
    result = _promtool("test", "rules", str(RULES_TEST_FILE.relative_to(REPO_ROOT)))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_and_recording_rule_named_in_the_design_exists() -> None:
    assert {rule["alert"] for rule in _alerts()} == DESIGN_ALERTS
    # DESIGN's three, plus the busy time the straggler rules are built on and the memory ratio
    assert {rule["record"] for rule in _rules() if "record" in rule} == DESIGN_RECORDING_RULES | {
        "hooktrace:busy_seconds:mean5m",
        "hooktrace:memory_reserved:ratio",
    }


@pytest.mark.parametrize("rule", _rules(), ids=lambda rule: rule.get("alert") or rule.get("record"))
def test_no_rule_depends_on_the_job_label(rule: dict[str, Any]) -> None:
    assert not re.search(r"\bjob\b", rule["expr"]), rule["expr"]


@pytest.mark.parametrize("alert", _alerts(), ids=lambda alert: alert["alert"])
def test_every_alert_has_a_severity_and_a_summary_naming_run_id_and_rank(alert: dict[str, Any]) -> None:
    assert alert["labels"]["severity"] in {"warning", "critical"}
    summary = alert["annotations"]["summary"]
    assert "{{ $labels.run_id }}" in summary, summary
    assert "{{ $labels.rank }}" in summary, summary
    assert alert["annotations"]["description"].strip()


def test_the_unit_tests_cover_every_alert_firing_and_not_firing_and_every_recording_rule() -> None:
    tests = yaml.safe_load(RULES_TEST_FILE.read_text())["tests"]
    alert_cases = [case for test in tests for case in test.get("alert_rule_test", [])]
    fired = {case["alertname"] for case in alert_cases if case["exp_alerts"]}
    silent = {case["alertname"] for case in alert_cases if not case["exp_alerts"]}
    checked_exprs = " ".join(case["expr"] for test in tests for case in test.get("promql_expr_test", []))
    assert fired == DESIGN_ALERTS
    assert silent == DESIGN_ALERTS
    assert all(name in checked_exprs for name in DESIGN_RECORDING_RULES)


def test_the_explosion_alert_describes_the_agents_spike_rule_with_its_module_floor() -> None:
    from hooktrace.health.monitor import MODULE_FLOOR

    alert = next(rule for rule in _alerts() if rule["alert"] == "HooktraceGradientExplosion")
    assert "hooktrace_grad_spike_steps_total" in alert["expr"]  # steps with any grad_spike event
    description = " ".join(alert["annotations"]["description"].split())
    assert f"a module's norm of at least {MODULE_FLOOR:.0%} of the total" in description
    assert "--explode-factor times its rolling median" in description
