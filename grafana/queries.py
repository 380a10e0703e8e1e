"""Every PromQL query of the committed dashboards, and the variable values Grafana would send.

Read from the JSON under ``grafana/dashboards/`` (what users import), not from ``build.py``, so the
Grafana SDK is not needed. Used by the tests that run each query against a real Prometheus and by
``benchmarks/scale_sim.py``, which times them over a thousand simulated ranks.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "DASHBOARD_DIR",
    "DASHBOARD_FILES",
    "GRAFANA_GLOBALS",
    "PANEL_QUERIES",
    "VARIABLE_QUERIES",
    "Query",
    "load_dashboard",
    "substitute",
    "variable_values",
]

DASHBOARD_DIR = Path(__file__).resolve().parent / "dashboards"
DASHBOARD_FILES = sorted(DASHBOARD_DIR.glob("*.json"))

GRAFANA_GLOBALS = {
    "__rate_interval": "2m",  # long enough to reach back over the training seconds
    "__interval": "15s",
    "__range": "10m",
    "__range_s": "600",
    "__range_ms": "600000",
}
"""Grafana's own variables, as a 10-minute dashboard would set them."""

_VARIABLE = re.compile(r"\$\{(\w+)(?::[^}]*)?\}|\$(\w+)|\[\[(\w+)(?::[^\]]*)?\]\]")


@dataclass(frozen=True)
class Query:
    """One PromQL text of a committed dashboard: a panel target, or a query variable's."""

    file: str
    uid: str
    panel: str
    ref: str
    expr: str

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.uid, self.panel, self.ref)

    def __str__(self) -> str:
        return f"{self.uid}: {self.panel} {self.ref}".strip()


@functools.cache
def load_dashboard(file: str) -> dict[str, Any]:
    """The committed dashboard ``file`` (a name under ``grafana/dashboards/``)."""
    model: dict[str, Any] = json.loads((DASHBOARD_DIR / file).read_text(encoding="utf-8"))
    return model


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def _panel_queries() -> list[Query]:
    queries = []
    for path in DASHBOARD_FILES:
        model = load_dashboard(path.name)
        for panel in _panels(model["panels"]):
            for target in panel.get("targets", []):
                queries.append(Query(path.name, model["uid"], panel["title"], target["refId"], target["expr"]))
    return queries


def _variable_queries() -> list[Query]:
    queries = []
    for path in DASHBOARD_FILES:
        model = load_dashboard(path.name)
        for variable in model["templating"]["list"]:
            if variable["type"] == "query":
                query = variable["query"]
                expr = query.get("query", "") if isinstance(query, dict) else query
                queries.append(Query(path.name, model["uid"], f"${variable['name']}", "", expr))
    return queries


PANEL_QUERIES = _panel_queries()
VARIABLE_QUERIES = _variable_queries()


def variable_values(model: dict[str, Any], run_id: str) -> dict[str, str]:
    """What Grafana puts in each variable for this run: the run id, or the "All" value."""
    values = dict(GRAFANA_GLOBALS)
    for variable in model["templating"]["list"]:
        name = variable["name"]
        if name == "run_id":
            values[name] = run_id
        elif variable["type"] == "datasource":
            values[name] = "prometheus"
        elif variable.get("includeAll"):
            values[name] = variable.get("allValue") or ".*"
        else:
            raise ValueError(f"no value for ${name}: give it one in grafana/queries.py variable_values()")
    return values


def substitute(text: str, values: dict[str, str]) -> str:
    """Replace $var, ${var}, ${var:format} and [[var]] the way Grafana would (unknown: KeyError)."""

    def replace(match: re.Match[str]) -> str:
        name = next(group for group in match.groups() if group)
        return values[name]

    return _VARIABLE.sub(replace, text)
