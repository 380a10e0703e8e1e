"""Chart specifications (Plotly figure JSON: ``{"data": [...], "layout": {...}}``) from report rows.

Plain dicts, built without importing Plotly's Python package, so that building a report of
10,000 steps and 1,000 modules takes well under a second. Every chart is bounded: series longer
than :data:`MAX_POINTS` are averaged in buckets, a chart marks :data:`MAX_EVENTS` events (the most
severe first), the heatmap keeps :data:`MAX_HEAT_MODULES` rows and :data:`MAX_HEAT_STEPS` columns
(each the largest norm of its bucket of steps), the icicle :data:`MAX_TREE_MODULES` modules; the
titles say so.
"""

from __future__ import annotations

import math
from typing import Any, TypeVar

from hooktrace.report.load import RunData
from hooktrace.report.rows import PHASES, module_norms, module_times, rank_breakdown
from hooktrace.report.tree import natural_key, synthetic_structure

MAX_POINTS = 2000
MAX_RANK_CHARTS = 8
MAX_EVENTS = 1000
MAX_BARS = 20
MAX_HEAT_MODULES = 200
MAX_HEAT_STEPS = 500
MAX_TREE_MODULES = 1000
MAX_FLOW_STEPS = 8

PHASE_COLORS = {
    "data": "#9e9e9e",
    "forward": "#1f77b4",
    "backward": "#ff7f0e",
    "optimizer": "#2ca02c",
    "allreduce": "#d62728",
    "eval": "#9467bd",
    "other": "#e0e0e0",
}
LIGHT = {"forward": "#aec7e8", "backward": "#ffbb78"}
"""Inclusive bars: the phase's colour, lighter."""
EVENT_SYMBOLS = {"grad_spike": "triangle-up", "nonfinite": "x", "grad_clip": "diamond", "amp_skip": "circle-open"}
SEVERITY = ("nonfinite", "grad_spike", "grad_mismatch", "amp_skip", "hook_error", "grad_clip")
"""Event kinds, most severe first: when a chart cannot mark every event, these are kept first."""

Figure = dict[str, Any]
T = TypeVar("T")


def rnd(value: float | None) -> float | None:
    """Six significant digits: the file stays small, the hover stays exact enough."""
    return None if value is None or not math.isfinite(value) else float(f"{value:.6g}")


def layout(title: str, **extra: Any) -> dict[str, Any]:
    layout: dict[str, Any] = {
        "title": {"text": title, "font": {"size": 15}},
        "margin": {"l": 60, "r": 20, "t": 70, "b": 45},
        "hovermode": "closest",
        "font": {"family": "system-ui, -apple-system, Segoe UI, sans-serif", "size": 12},
        "legend": {"orientation": "h", "y": -0.2},
    }
    layout.update(extra)
    return layout


def buckets(n: int, limit: int = MAX_POINTS) -> int:
    """How many consecutive points to average so that ``n`` points become at most ``limit``."""
    return max(1, math.ceil(n / limit))


def reduce_series(xs: list[int], ys: list[float | None], size: int, how: str = "mean") -> tuple[list[int], list[Any]]:
    if size == 1:
        return xs, [rnd(y) for y in ys]
    out_x, out_y = [], []
    for start in range(0, len(xs), size):
        chunk = [y for y in ys[start : start + size] if y is not None]
        out_x.append(xs[start])
        value = (max(chunk) if how == "max" else sum(chunk) / len(chunk)) if chunk else None
        out_y.append(rnd(value))
    return out_x, out_y


def spread(items: list[T], limit: int) -> list[T]:
    """At most ``limit`` of ``items``, evenly spaced from the first to the last (all when they fit)."""
    if len(items) <= limit:
        return list(items)
    if limit <= 1:
        return list(items[:limit])
    return [items[round(i * (len(items) - 1) / (limit - 1))] for i in range(limit)]


def keep_events(marks: list[tuple[int, float, dict[str, Any]]], limit: int = MAX_EVENTS) -> tuple[list[Any], str]:
    """At most ``limit`` of ``(step, y, event)`` marks, and a title note when some were left out.

    The most severe kinds are kept first (:data:`SEVERITY`: every non-finite, then every spike, ...);
    a kind that no longer fits whole is thinned evenly over the run, not cut after its first ones."""
    if len(marks) <= limit:
        return marks, ""
    rank = {kind: i for i, kind in enumerate(SEVERITY)}
    by_kind: dict[str, list[tuple[int, float, dict[str, Any]]]] = {}
    for mark in marks:
        by_kind.setdefault(mark[2]["kind"], []).append(mark)
    kept: list[tuple[int, float, dict[str, Any]]] = []
    for kind in sorted(by_kind, key=lambda k: (rank.get(k, len(rank)), k)):
        kept += spread(by_kind[kind], limit - len(kept))
    kept.sort(key=lambda m: m[0])
    return kept, f"{len(kept):,} of {len(marks):,} events marked (the most severe first, the rest spread over the run)"


def shown_ranks(run: RunData) -> list[int]:
    """Ranks drawn one chart each: all up to 8, else the lowest ones and the straggler."""
    ranks = run.ranks
    if len(ranks) <= MAX_RANK_CHARTS:
        return ranks
    straggler = (run.summary.get("straggler") or {}).get("rank")
    keep = ranks[: MAX_RANK_CHARTS - 1]
    return [*keep, straggler] if straggler is not None and straggler not in keep else ranks[:MAX_RANK_CHARTS]


def _phases(line: dict[str, Any]) -> dict[str, float | None]:
    """A step's phases (a value is None where it was not finite: JSON has no NaN)."""
    return line.get("phases") or {}


def step_figure(run: RunData, rank: int) -> Figure:
    """One rank's step time over steps, stacked by phase, with its events marked."""
    lines = run.steps.get(rank, [])
    xs = [s["step"] for s in lines]
    size = buckets(len(xs))
    data: list[dict[str, Any]] = []
    for phase in (*PHASES, "other"):
        if phase == "other":
            ys = [max(0.0, (s["duration_s"] or 0.0) - sum(v or 0.0 for v in _phases(s).values())) * 1e3 for s in lines]
        else:
            if not any(phase in _phases(s) for s in lines):
                continue
            ys = [(_phases(s).get(phase) or 0.0) * 1e3 for s in lines]
        bx, by = reduce_series(xs, list(ys), size)
        data.append(
            {
                "type": "scatter",
                "mode": "lines",
                "name": phase,
                "x": bx,
                "y": by,
                "stackgroup": "phases",
                "line": {"width": 0.5, "color": PHASE_COLORS[phase]},
                "hovertemplate": f"step %{{x}}<br>{phase} %{{y:.3f}} ms",
            }
        )
    marks, cut = keep_events(
        [(s["step"], (s["duration_s"] or 0.0) * 1e3, e) for s in lines for e in s.get("events") or []]
    )
    for kind in sorted({e["kind"] for _, _, e in marks}):
        these = [(x, y, e) for x, y, e in marks if e["kind"] == kind]
        data.append(
            {
                "type": "scatter",
                "mode": "markers",
                "name": kind,
                "x": [x for x, _, _ in these],
                "y": [rnd(y) for _, y, _ in these],
                "marker": {"symbol": EVENT_SYMBOLS.get(kind, "star"), "size": 10, "color": "#000"},
                "text": [
                    f"{kind} {e.get('first_module', e.get('module', ''))} ({e.get('phase', '')}) {e.get('value')}"
                    for _, _, e in these
                ],
                "hovertemplate": "step %{x}<br>%{text}<extra></extra>",
            }
        )
    note = f" (mean of every {size} steps)" if size > 1 else ""
    yaxis: dict[str, Any] = {"title": {"text": "ms"}}
    durations = sorted((s["duration_s"] or 0.0) * 1e3 for s in lines)
    if durations:
        typical = durations[int(0.98 * (len(durations) - 1))]
        if durations[-1] > 3 * typical > 0:  # a few huge steps would flatten the rest: zoom out to see them
            yaxis["range"] = [0, rnd(typical * 1.5)]
            note += f"; y cut at {typical * 1.5:.3g} ms (double-click to see all, up to {durations[-1]:.3g} ms)"
    return {
        "data": data,
        "layout": layout(
            f"Rank {rank}: step time by phase{note}; {cut or 'events marked'}",
            xaxis={"title": {"text": "step"}, "rangeslider": {"visible": len(xs) > 200}},
            yaxis=yaxis,
            legend={"orientation": "v", "x": 1.01, "y": 1},  # clear of the range slider
        ),
    }


def module_bars(run: RunData, phase: str) -> Figure:
    """The slowest modules of one phase: self and inclusive time side by side."""
    times = [t for t in module_times(run).values() if phase in t.total_s]
    times.sort(key=lambda t: -t.total_s[phase])
    top = list(reversed(times[:MAX_BARS]))
    names = [t.module for t in top]
    data = [
        {
            "type": "bar",
            "orientation": "h",
            "name": "self",
            "y": names,
            "x": [rnd(t.self_s.get(phase, 0) * 1e3) for t in top],
            "marker": {"color": PHASE_COLORS[phase]},
            "hovertemplate": "%{y}<br>self %{x:.3f} ms<extra></extra>",
        },
        {
            "type": "bar",
            "orientation": "h",
            "name": "inclusive",
            "y": names,
            "x": [rnd(t.total_s[phase] * 1e3) for t in top],
            "marker": {"color": LIGHT[phase]},
            "hovertemplate": "%{y}<br>inclusive %{x:.3f} ms<extra></extra>",
        },
    ]
    return {
        "data": data,
        "layout": layout(
            f"Slowest modules, {phase} (top {len(top)} of {len(times)}; median ms per step)",
            barmode="group",
            height=max(300, 28 * len(top) + 120),
            xaxis={"title": {"text": "ms per step"}},
            yaxis={"automargin": True, "type": "category"},  # module names like "0" are names, not numbers
        ),
    }


def structure_of(run: RunData) -> list[dict[str, Any]]:
    """The model structure, or one rebuilt from module names (a run killed before its summary)."""
    if run.model:
        return run.model
    times = module_times(run)
    names = sorted(set(times) | set(module_norms(run)), key=natural_key)
    return synthetic_structure(names, {m: t.module_type for m, t in times.items()})


def icicle_figure(run: RunData) -> Figure:
    """The module tree as an icicle sized by self time (forward + backward): time as area."""
    times = module_times(run)
    structure = structure_of(run)
    by_name = {e["module"]: e for e in structure}
    keep = set(by_name)
    note = ""
    if len(keep) > MAX_TREE_MODULES:
        ranked = sorted(by_name, key=lambda m: -(times[m].both() if m in times else 0.0))
        keep = set()
        for name in ranked:
            chain = []
            while name and name not in keep:
                chain.append(name)
                name = by_name[name].get("parent") or ""
            if len(keep) + len(chain) <= MAX_TREE_MODULES:
                keep.update(chain)
        note = f" ({len(keep)} of {len(by_name)} modules: the slowest and their parents)"
    entries = [e for e in structure if e["module"] in keep]
    self_ms = [(times[e["module"]].both("self") if e["module"] in times else 0.0) * 1e3 for e in entries]
    inclusive = _inclusive_ms(entries, times)
    data = [
        {
            "type": "icicle",
            "ids": [e["module"] for e in entries],
            "labels": [e["module"].rsplit(".", 1)[-1] + f" ({e['type']})" for e in entries],
            "parents": [e.get("parent") or "" for e in entries],
            "values": [rnd(v) for v in self_ms],
            "branchvalues": "remainder",
            "maxdepth": 5,
            "tiling": {"orientation": "v"},
            "marker": {
                "colors": [rnd(v) for v in inclusive],
                "colorscale": "YlOrRd",
                "reversescale": True,  # plotly.js lists YlOrRd dark first: the slow modules in red
                "showscale": True,
                "colorbar": {"title": {"text": "ms with children"}},
            },
            "customdata": [[rnd(a), rnd(b)] for a, b in zip(self_ms, inclusive, strict=True)],
            "hovertemplate": "%{id}<br>self %{customdata[0]:.3f} ms<br>with children %{customdata[1]:.3f} ms"
            "<extra></extra>",
        }
    ]
    return {
        "data": data,
        "layout": layout(f"Module tree sized by time per step, forward + backward{note}; click to zoom", height=520),
    }


def _inclusive_ms(entries: list[dict[str, Any]], times: dict[str, Any]) -> list[float]:
    """Each module's time with its children; a container never called (ModuleList) sums its children."""
    children: dict[str, list[str]] = {}
    for entry in entries:
        children.setdefault(entry.get("parent") or "", []).append(entry["module"])
    memo: dict[str, float] = {}

    def total(name: str) -> float:
        if name not in memo:
            timed = times.get(name)
            memo[name] = timed.both() * 1e3 if timed is not None and timed.total_s else 0.0
            if not memo[name]:
                memo[name] = sum(total(child) for child in children.get(name, []))
        return memo[name]

    return [total(e["module"]) for e in entries]


def ranks_figure(run: RunData) -> Figure:
    """Each rank's median step, stacked by phase: ranks side by side."""
    rows = rank_breakdown(run)
    names = [f"rank {r['rank']}" for r in rows]
    data = []
    for phase in PHASES:
        if any(phase in r["phases"] for r in rows):
            data.append(
                {
                    "type": "bar",
                    "name": phase,
                    "x": names,
                    "y": [rnd(r["phases"].get(phase, 0.0) * 1e3) for r in rows],
                    "marker": {"color": PHASE_COLORS[phase]},
                }
            )
    return {
        "data": data,
        "layout": layout(
            "Ranks side by side: median step by phase (ms)", barmode="stack", yaxis={"title": {"text": "ms"}}
        ),
    }
