"""The committed Grafana dashboards: reproducible from grafana/build.py and true to DESIGN §4.

Only the regeneration test needs the Grafana Foundation SDK; every other check reads the committed
JSON, which is what ``hooktrace dashboards DIR`` ships.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = ROOT / "grafana" / "build.py"
DASHBOARD_DIR = ROOT / "grafana" / "dashboards"
DASHBOARD_FILES = sorted(DASHBOARD_DIR.glob("*.json"))

_HISTOGRAMS = ("step_duration_seconds", "phase_duration_seconds", "module_type_duration_seconds")
_PLAIN = (
    "info",
    "steps_total",
    "grad_norm",
    "grad_norm_ratio",
    "grad_spike_steps_total",
    "nonfinite_grad_steps_total",
    "nonfinite_events_total",
    "grad_clips_total",
    "amp_skipped_steps_total",
    "optimizer_steps_total",
    "dropped_total",
    "hook_errors_total",
    "overhead_seconds_total",
    "module_activation_bytes",
    "memory_bytes",
)
DESIGN_METRICS = (
    {f"hooktrace_{name}" for name in _PLAIN}
    | {f"hooktrace_{h}_{suffix}" for h in _HISTOGRAMS for suffix in ("bucket", "sum", "count")}
    | {"hooktrace_module_duration_seconds_sum", "hooktrace_module_duration_seconds_count"}
)
"""DESIGN §4 as series names (histograms and the summary by their _bucket/_sum/_count series)."""

RECORDING_RULES = {
    "hooktrace:step_duration_seconds:mean5m",
    "hooktrace:straggler_skew:ratio",
    "hooktrace:step_duration_seconds:ratio_to_median",
    "hooktrace:memory_reserved:ratio",
}
SELF_METRICS = {
    "hooktrace_export_errors_total",
    "hooktrace_scrape_size_bytes",
    "hooktrace_module_labels",
    "hooktrace_module_labels_truncated",
}
KNOWN_METRICS = DESIGN_METRICS | RECORDING_RULES | SELF_METRICS
RANKLESS_METRICS = {"hooktrace:straggler_skew:ratio"}
"""Series aggregated over ranks (by run_id only), so they cannot take the rank matcher."""

UNITS = {"s", "ops", "percent", "bytes", "short", "none"}
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}

_VARIABLE = re.compile(r"\$\{(\w+)(?::[^}]*)?\}|\$(\w+)|\[\[(\w+)(?::[^\]]*)?\]\]")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_IDENTIFIER = re.compile(r"(?<![\w.])[A-Za-z_:][A-Za-z0-9_:]*")
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless"}
_KEYWORDS |= {"offset", "inf", "nan"}


def _load(path: Path) -> dict[str, Any]:
    model: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return model


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, the ones inside collapsed rows included."""
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def _dashboards() -> list[tuple[str, dict[str, Any]]]:
    return [(path.name, _load(path)) for path in DASHBOARD_FILES]


def _targets(model: dict[str, Any]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for panel in _panels(model["panels"]):
        for target in panel.get("targets", []):
            yield panel, target


def _variable_query(variable: dict[str, Any]) -> str:
    query = variable.get("query", "")
    return str(query.get("query", "") if isinstance(query, dict) else query)


def _queries(model: dict[str, Any]) -> Iterator[str]:
    """Every PromQL text of a dashboard: panel targets and query variables."""
    for _, target in _targets(model):
        yield target["expr"]
    for variable in model["templating"]["list"]:
        if variable["type"] == "query":
            yield _variable_query(variable)


def _variables_used(text: str) -> set[str]:
    names = {next(group for group in match.groups() if group) for match in _VARIABLE.finditer(text)}
    return {name for name in names if not name.startswith("__")}  # $__rate_interval etc. are Grafana's


def metric_names(promql: str) -> set[str]:
    """Series names a PromQL expression selects (good enough for hooktrace's own queries).

    Strips strings, label matchers, ranges and grouping clauses, then drops function names
    (followed by ``(``) and keywords: what is left are metric names.
    """
    text = _STRING.sub('""', promql)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = _GROUPING.sub(" ", text)
    # Grafana's label_values([metric, ]label): keep the metric, drop the label name.
    text = re.sub(r"\blabel_values\s*\(\s*(?:([\w:]+)\s*,\s*)?\w+\s*\)", r" \1 ", text)
    names = set()
    for match in _IDENTIFIER.finditer(text):
        rest = text[match.end() :].lstrip()
        if not rest.startswith("(") and match.group().lower() not in _KEYWORDS:
            names.add(match.group())
    return names


def _selectors(promql: str) -> Iterator[tuple[str, str]]:
    """(metric name, label matchers) of every hooktrace selector in promql."""
    for match in re.finditer(r"(hooktrace[a-z0-9_:]*)\s*(\{[^}]*\})?", promql):
        yield match.group(1), match.group(2) or ""


@pytest.fixture(params=DASHBOARD_FILES, ids=lambda path: path.name)
def dashboard(request: pytest.FixtureRequest) -> dict[str, Any]:
    return _load(request.param)


def _build_module() -> ModuleType:
    if importlib.util.find_spec("grafana_foundation_sdk") is None:
        reason = "grafana_foundation_sdk is not installed (pip install the dev extras)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    spec = importlib.util.spec_from_file_location("hooktrace_grafana_build", BUILD_SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_metric_name_parser_finds_series_and_skips_functions_labels_and_keywords() -> None:
    expr = (
        'sum by (rank) (rate(hooktrace_steps_total{run_id=~"$run_id", phase="a b"}[5m]))\n'
        "/ on (run_id) group_left () hooktrace:straggler_skew:ratio offset 5m > bool 0"
    )
    assert metric_names(expr) == {"hooktrace_steps_total", "hooktrace:straggler_skew:ratio"}
    assert metric_names('label_values(hooktrace_info{run_id=~"$run_id"}, rank)') == {"hooktrace_info"}
    assert metric_names("up") == {"up"}


def test_there_is_a_committed_training_dashboard() -> None:
    assert "hooktrace-training.json" in {path.name for path in DASHBOARD_FILES}


def test_regenerating_the_dashboards_reproduces_the_committed_json_byte_for_byte() -> None:
    build = _build_module()
    models = build.build_dashboards()
    assert sorted(models) == [path.name for path in DASHBOARD_FILES], "stale or missing dashboard files"
    for name, model in models.items():
        committed = (DASHBOARD_DIR / name).read_text(encoding="utf-8")
        assert build.render(model) == committed, f"{name} is stale: run `python grafana/build.py`"


def test_write_dashboards_writes_every_dashboard_into_the_given_directory(tmp_path: Path) -> None:
    build = _build_module()
    written = build.write_dashboards(tmp_path / "out")
    assert [path.name for path in written] == [path.name for path in DASHBOARD_FILES]
    for path in written:
        assert path.read_bytes() == (DASHBOARD_DIR / path.name).read_bytes()


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=lambda path: path.name)
def test_committed_json_is_in_canonical_form(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True) + "\n"


def test_dashboard_uids_panel_ids_and_panel_titles_are_unique() -> None:
    uids = [model["uid"] for _, model in _dashboards()]
    assert len(uids) == len(set(uids))
    for name, model in _dashboards():
        ids = [panel["id"] for panel in _panels(model["panels"])]
        assert len(ids) == len(set(ids)), name
        titles = [panel["title"] for panel in _panels(model["panels"])]  # the live test keys on them
        assert len(titles) == len(set(titles)), name
        for panel in _panels(model["panels"]):
            refs = [target["refId"] for target in panel.get("targets", [])]
            assert len(refs) == len(set(refs)) and all(refs), (name, panel["title"])


def test_every_variable_used_is_defined_in_templating(dashboard: dict[str, Any]) -> None:
    defined = {variable["name"] for variable in dashboard["templating"]["list"]}
    texts = list(_queries(dashboard))
    for panel in _panels(dashboard["panels"]):
        texts += [panel["title"], panel.get("repeat", ""), json.dumps(panel.get("datasource", ""))]
        for target in panel.get("targets", []):
            texts += [target.get("legendFormat", ""), json.dumps(target.get("datasource", ""))]
    used = set().union(*map(_variables_used, texts))
    assert used, "no variable found: the parser is broken"
    assert used <= defined, f"undefined variables: {sorted(used - defined)}"


def test_every_panel_and_target_reads_the_datasource_variable(dashboard: dict[str, Any]) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for panel in _panels(dashboard["panels"]):
        if panel["type"] != "row":
            assert panel.get("datasource") == DATASOURCE, panel["title"]
    for panel, target in _targets(dashboard):
        assert target.get("datasource") == DATASOURCE, (panel["title"], target["refId"])
    for variable in variables.values():
        if variable["type"] == "query":
            assert variable.get("datasource") == DATASOURCE, variable["name"]


def test_every_panel_has_a_unit(dashboard: dict[str, Any]) -> None:
    for panel in _panels(dashboard["panels"]):
        if panel["type"] not in ("row", "text"):
            unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit")
            assert unit in UNITS, f"{panel['title']!r}: unit {unit!r}"


def test_no_query_matches_the_scrape_job(dashboard: dict[str, Any]) -> None:
    for query in _queries(dashboard):
        assert not re.search(r"\bjob\b", query), query


def test_every_metric_queried_is_a_design_metric_a_recording_rule_or_a_self_metric(
    dashboard: dict[str, Any],
) -> None:
    for query in _queries(dashboard):
        names = metric_names(query)
        assert names, f"no metric found in {query!r}"
        assert names <= KNOWN_METRICS, f"unknown metrics {sorted(names - KNOWN_METRICS)} in {query!r}"


def test_every_hooktrace_selector_filters_run_id_and_rank(dashboard: dict[str, Any]) -> None:
    for _, target in _targets(dashboard):
        for name, matchers in _selectors(target["expr"]):
            assert 'run_id=~"$run_id"' in matchers, f"{name} lacks the run_id matcher"
            if name not in RANKLESS_METRICS:
                assert 'rank=~"$rank"' in matchers, f"{name} lacks the rank matcher"


def test_legends_name_every_label_a_series_is_grouped_by(dashboard: dict[str, Any]) -> None:
    for panel, target in _targets(dashboard):
        if target.get("format") == "table":
            continue  # tables show labels as columns
        expr, legend = target["expr"], target.get("legendFormat", "")
        groupings = re.findall(r"\bby\s*\(([^)]*)\)", expr)
        labels = {label.strip() for group in groupings for label in group.split(",")} - {"", "le"}
        if not groupings and not expr.startswith(("max(", "min(", "sum(", "avg(")):
            # An ungrouped selector keeps every label: rank varies, and so does any label that
            # a multi-value variable selects.
            labels = {"rank"} | set(re.findall(r'(\w+)=~"\$\w+"', expr)) - {"run_id"}
        for label in labels:
            assert f"{{{{{label}}}}}" in legend, f"{panel['title']!r} {target['refId']}: legend lacks {label}"


def test_the_training_dashboard_has_the_documented_variables_and_rows() -> None:
    model = _load(DASHBOARD_DIR / "hooktrace-training.json")
    assert model["uid"] == "hooktrace-training"
    variables = {v["name"]: v for v in model["templating"]["list"]}
    assert list(variables) == ["datasource", "run_id", "rank", "module", "module_type"]
    assert _variable_query(variables["run_id"]) == "label_values(hooktrace_info, run_id)"
    for name in ("rank", "module", "module_type"):
        assert variables[name]["multi"] and variables[name]["includeAll"], name
    rows = [panel["title"] for panel in model["panels"] if panel["type"] == "row"]
    assert rows == ["Overview", "Modules (sampled steps)", "Gradient health", "Memory", "Agent"]


def test_panels_fit_the_24_column_grid(dashboard: dict[str, Any]) -> None:
    for panel in _panels(dashboard["panels"]):
        grid = panel["gridPos"]
        assert grid["w"] > 0 and grid["h"] > 0 and grid["x"] + grid["w"] <= 24, panel["title"]
