"""Plain rows computed from a :class:`RunData`: what the tree, the diff and the HTML page show.

No rendering here, so the terminal, ``--json`` and the charts all agree on every number.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

from hooktrace.report.load import RunData

PHASES = ("data", "forward", "backward", "optimizer", "allreduce", "eval")
"""Step phases in the order a step runs them (``eval`` is time spent in eval-mode forwards)."""


def fmt_s(seconds: float | None) -> str:
    """A duration the way the run summary prints it: ``2.15 ms``, ``70 us``, ``1.20 s``."""
    if seconds is None:
        return "-"
    if abs(seconds) >= 1:
        return f"{seconds:.2f} s"
    if abs(seconds) >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.0f} us"


def fmt_count(n: int) -> str:
    """``4096`` -> ``4.1K``, ``124000000`` -> ``124.0M``."""
    for unit, size in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def steady_lines(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Steps that measure steady state: not the first (warm-up), not a compile step, not partial."""
    first = lines[0]["step"] if lines else 0
    kept = [s for s in lines if s.get("step") != first and not s.get("compiled") and not s.get("partial")]
    return kept or lines


def rank_breakdown(run: RunData) -> list[dict[str, Any]]:
    """Per rank: median step time and median phases (the summary's, else computed from steps)."""
    by_rank = {r["rank"]: r for r in run.summary.get("ranks", [])}
    out = []
    for rank in run.ranks:
        row = by_rank.get(rank)
        if row is not None:
            out.append({"rank": rank, "step_time_s": row.get("step_time_s"), "phases": dict(row.get("phases", {}))})
            continue
        lines = steady_lines(run.steps.get(rank, []))
        phases: dict[str, float] = {}
        for phase in PHASES:
            value = median([v for s in lines if (v := (s.get("phases") or {}).get(phase)) is not None])
            if value is not None:
                phases[phase] = value
        durations = [s["duration_s"] for s in lines if s.get("duration_s") is not None]
        out.append({"rank": rank, "step_time_s": median(durations), "phases": phases})
    return out


def run_step_time(run: RunData) -> float | None:
    """The run's median step time: the median over ranks of each rank's median."""
    return median([r["step_time_s"] for r in rank_breakdown(run) if r["step_time_s"] is not None])


@dataclass(slots=True)
class ModuleTime:
    """One module's timing, medians over ranks of each rank's steady-state median."""

    module: str
    module_type: str = ""
    self_s: dict[str, float] = field(default_factory=dict)
    """Phase (forward/backward) -> median self time per step."""
    total_s: dict[str, float] = field(default_factory=dict)
    """Phase -> median inclusive time per step (children included)."""
    calls_per_step: float | None = None
    warmup: set[str] = field(default_factory=set)
    """Phases whose figures are step-1 (warm-up) figures: no rank had a steady-state median."""

    def both(self, kind: str = "total") -> float:
        """Forward + backward, inclusive (``total``) or ``self``."""
        values = self.total_s if kind == "total" else self.self_s
        return values.get("forward", 0.0) + values.get("backward", 0.0)


def module_times(run: RunData) -> dict[str, ModuleTime]:
    """Module name -> its times: medians over ranks of the steady-state medians. A module and phase
    that no rank timed past step 1 gets its step-1 figures instead, and says so in ``warmup``."""
    collect: dict[tuple[str, str], dict[str, list[float]]] = {}
    types: dict[str, str] = {}
    for row in run.modules:
        if row.get("phase") not in ("forward", "backward"):
            continue
        cell = collect.setdefault(
            (row["module"], row["phase"]),
            {"total": [], "self": [], "warm_total": [], "warm_self": [], "calls": []},
        )
        for kind in ("total", "self"):
            if row.get(f"{kind}_s") is not None:
                cell[kind].append(row[f"{kind}_s"])
            elif row.get(f"warmup_{kind}_s") is not None:
                cell[f"warm_{kind}"].append(row[f"warmup_{kind}_s"])
        calls = row.get("calls_per_step")
        if calls and row["phase"] == "forward":
            cell["calls"].append(float(calls))
        types[row["module"]] = row.get("module_type", "")
    out: dict[str, ModuleTime] = {}
    for (module, phase), cell in collect.items():
        item = out.setdefault(module, ModuleTime(module, types.get(module, "")))
        for kind, into in (("total", item.total_s), ("self", item.self_s)):
            value = median(cell[kind])
            if value is None and (value := median(cell[f"warm_{kind}"])) is not None:
                item.warmup.add(phase)
            if value is not None:
                into[phase] = value
        if cell["calls"]:
            item.calls_per_step = median(cell["calls"])
    return out


def first_rank_lines(run: RunData) -> list[dict[str, Any]]:
    """The steps of the lowest rank (gradient norms agree across ranks after all-reduce)."""
    return run.steps[min(run.steps)] if run.steps else []


def module_norms(run: RunData) -> dict[str, list[tuple[int, float]]]:
    """Module -> ``(step, gradient norm)`` over the steps that recorded per-module norms."""
    out: dict[str, list[tuple[int, float]]] = {}
    for line in first_rank_lines(run):
        for module, value in (line.get("module_grad_norms") or {}).items():
            if value is not None:
                out.setdefault(module, []).append((line["step"], value))
    return out


def events(run: RunData) -> list[dict[str, Any]]:
    """Every event of every rank's steps, with its step and rank."""
    out = []
    for rank, lines in sorted(run.steps.items()):
        for line in lines:
            for event in line.get("events") or []:
                out.append({"step": line["step"], "rank": rank, **event})
    if not out:  # steps.jsonl missing: the summary keeps the events too
        out = [dict(e) for e in run.summary.get("events", [])]
    return out


def event_counts(run: RunData) -> dict[str, int]:
    counts: dict[str, int] = {}
    for event in events(run):
        counts[event["kind"]] = counts.get(event["kind"], 0) + 1
    return counts


def header(run: RunData) -> dict[str, Any]:
    """The facts a report opens with: id, ranks, device, steps, wall time, overhead, drops.

    Steps tile a rank's training time (each starts where the previous one ended), so the wall time
    from the first step's start to the last one's end is the sum of their durations."""
    ranks = run.summary.get("ranks", [])
    wall = None
    for lines in run.steps.values():
        if lines and "duration_s" in lines[0]:
            span = sum(s.get("duration_s") or 0.0 for s in lines)
            wall = span if wall is None else max(wall, span)
    return {
        "run_id": run.run_id,
        "ranks": len(run.ranks),
        "world_size": run.summary.get("world_size", len(run.ranks)),
        "device": run.summary.get("device", "unknown"),
        "steps": run.step_count(),
        "wall_s": wall,
        "overhead_ratio": run.summary.get("overhead_ratio"),
        "dropped": sum(sum(r.get("dropped", {}).values()) for r in ranks),
        "hook_errors": sum(r.get("hook_errors", 0) for r in ranks),
        "events": event_counts(run),
    }


def summary_from_files(run: RunData) -> dict[str, Any]:
    """A summary (``summary.json``'s shape) rebuilt from steps and traces, for a run that wrote no
    ``rank<r>.summary.json``: what ``hooktrace report`` prints for a run killed before its first checkpoint."""
    counts: dict[int, dict[str, int]] = {}
    for event in events(run):
        per_rank = counts.setdefault(event["rank"], {})
        per_rank[event["kind"]] = per_rank.get(event["kind"], 0) + 1
    ranks = []
    for row in rank_breakdown(run):
        lines = run.steps.get(row["rank"], [])
        last = next((s["grad_norm"] for s in reversed(lines) if s.get("grad_norm") is not None), None)
        ranks.append({**row, "grad_norm": last, "event_counts": counts.get(row["rank"], {})})
    return {
        "run_id": run.run_id,
        "world_size": len(run.ranks),
        "steps": run.step_count(),
        "device": "unknown",
        "ranks": ranks,
        "modules": run.modules,
        "events": events(run),
        "overhead_ratio": 0.0,
        "notes": list(run.missing),
    }
