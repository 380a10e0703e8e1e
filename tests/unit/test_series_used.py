"""Every metric family a rank serves is read by a dashboard panel or a Prometheus rule.

A family nobody reads still costs series on every rank of every job (README "Scale"): one that no
panel or rule uses is cut, or listed in ``KEPT_UNREAD`` with the reason it is kept. The families are
the exporter's own list (``HooktraceCollector.describe``); the readers are the committed dashboards'
panel and variable queries and the expressions of the shipped rules.
"""

from __future__ import annotations

from typing import Any

import yaml
from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from grafana.queries import PANEL_QUERIES, VARIABLE_QUERIES
from hooktrace.assets import read_asset
from hooktrace.export.prometheus import HooktraceCollector
from tests.unit.test_dashboards import metric_names
from tests.unit.test_prometheus_export import INFO, make_snapshot

KEPT_UNREAD: dict[str, str] = {}
"""Family -> why it is served although no dashboard panel or rule reads it.

Empty: every family is read today. ``hooktrace_info`` (the ``$run_id`` and ``$rank`` variables, the
straggler rules) and the scrape-health families (``hooktrace_scrape_size_bytes``,
``hooktrace_module_labels``, ``hooktrace_module_labels_truncated``, ``hooktrace_export_errors``: the
Agent row) all have readers. A family kept for another reader (an external tool, a future panel)
goes here, with that reader named."""

_SAMPLE_SUFFIXES = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("", "_sum", "_count"),
    "info": ("_info",),
}
"""The sample names a family of each type puts on ``/metrics`` (prometheus_client, no ``_created``)."""


def served_names(family: Metric) -> set[str]:
    return {family.name + suffix for suffix in _SAMPLE_SUFFIXES[family.type]}


def rule_expressions() -> list[str]:
    rules = yaml.safe_load(read_asset("hooktrace.rules.yml"))
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


def read_names() -> set[str]:
    """Every series name a dashboard query or a rule expression selects."""
    texts = [query.expr for query in (*PANEL_QUERIES, *VARIABLE_QUERIES)] + rule_expressions()
    return set().union(*map(metric_names, texts))


def unread(families: list[Metric], read: set[str]) -> list[str]:
    return sorted(family.name for family in families if not served_names(family) & read)


def _families() -> list[Metric]:
    return list(HooktraceCollector(INFO).describe())


def test_every_served_family_is_read_by_a_dashboard_or_a_rule_or_kept_for_a_stated_reason() -> None:
    families = _families()
    assert len(families) > 20, "the exporter's family list is empty: the check would pass vacuously"
    # equal, not a subset: a kept family that gains a reader, or is no longer served, leaves the list
    assert unread(families, read_names()) == sorted(KEPT_UNREAD)


def test_an_added_family_that_nothing_reads_is_caught() -> None:
    added = GaugeMetricFamily("hooktrace_nobody_reads_this", "A family no panel or rule uses.", labels=["rank"])
    assert unread([*_families(), added], read_names()) == sorted([*KEPT_UNREAD, "hooktrace_nobody_reads_this"])


def test_the_family_list_is_what_a_scrape_serves() -> None:
    collector = HooktraceCollector(INFO)
    full: dict[str, Any] = {"module_activation_bytes": {"blocks.0.attn": 4096}, "memory_bytes": {"parameters": 8}}
    collector.update(make_snapshot(**full))
    collector.scrape_size_bytes = 1234
    rendered = {family.name: family.type for family in collector.collect()}
    described = {family.name: family.type for family in _families()}
    assert rendered == described


def test_the_readers_come_from_both_the_dashboards_and_the_rules() -> None:
    dashboards = set().union(*(metric_names(query.expr) for query in (*PANEL_QUERIES, *VARIABLE_QUERIES)))
    rules = set().union(*map(metric_names, rule_expressions()))
    assert "hooktrace_module_type_duration_seconds_bucket" in dashboards - rules  # the module-time heatmap
    assert "hooktrace:busy_seconds:mean5m" in rules - dashboards  # the straggler alert
