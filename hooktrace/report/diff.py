"""``hooktrace diff BASE NEW``: what got slower or faster between two runs.

Compares the median step time, each phase's median, and each module's median self time per step
(forward and backward apart), then ranks the modules by the size of their change. A module timed
only on step 1 (warm-up) in either run is not compared (a step-1 figure against a median would be a
large change of nothing): it is listed in ``warmup_only`` and a note. Timing noise
is real (another process, a warm cache), so a change counts only when it is at least
``noise_pct`` percent of the base value and at least ``min_share_pct`` percent of the base step
time; ``--fail-above PCT`` fails a CI job when a counted change slowed something by more than PCT.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from hooktrace.report.load import RunData
from hooktrace.report.rows import PHASES, fmt_s, median, module_times, rank_breakdown, run_step_time

SHOWN_MODULES = 15
"""Modules listed in the text output (``--json`` has them all)."""


@dataclass(slots=True)
class Change:
    """One compared quantity: ``kind`` is step, phase or module; ``name`` e.g. ``backward fc1``."""

    kind: str
    name: str
    base_s: float | None
    new_s: float | None
    delta_s: float | None = None
    pct: float | None = None
    significant: bool = False


@dataclass(slots=True)
class Diff:
    """The comparison of two runs, as ``--json`` prints it."""

    base: str
    new: str
    noise_pct: float
    min_share_pct: float
    floor_s: float
    """Changes smaller than this (``min_share_pct`` of the base step time) are noise."""
    step: Change
    phases: list[Change]
    modules: list[Change]
    """Every module in both runs, largest absolute change first."""
    only_base: list[str] = field(default_factory=list)
    only_new: list[str] = field(default_factory=list)
    warmup_only: list[str] = field(default_factory=list)
    """Module rows not compared: on one side or both only a step-1 (warm-up) figure, no steady median."""
    fail_above: float | None = None
    failed: list[Change] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _change(kind: str, name: str, base: float | None, new: float | None, noise: float, floor: float) -> Change:
    change = Change(kind, name, base, new)
    if base is None or new is None:
        return change
    change.delta_s = new - base
    change.pct = (new - base) / base * 100 if base > 0 else (0.0 if new == base else None)  # None: from zero
    change.significant = abs(change.delta_s) >= floor and (change.pct is None or abs(change.pct) >= noise)
    return change


def _slowed_above(change: Change, limit: float) -> bool:
    if not change.significant or change.delta_s is None or change.delta_s <= 0:
        return False
    return change.pct is None or change.pct > limit


def _phase_medians(run: RunData) -> dict[str, float]:
    """Each phase's median over ranks of the ranks' medians (``statistics.median``, as the step time:
    with two ranks, the mean of both, not the slower one)."""
    values: dict[str, list[float]] = {}
    for row in rank_breakdown(run):
        for phase, value in row["phases"].items():
            values.setdefault(phase, []).append(value)
    return {phase: m for phase, v in values.items() if (m := median(v)) is not None}


def compare(
    base: RunData,
    new: RunData,
    *,
    noise_pct: float = 10.0,
    min_share_pct: float = 1.0,
    fail_above: float | None = None,
) -> Diff:
    """Compare ``new`` against ``base``; with ``fail_above``, ``failed`` lists counted slowdowns above it."""
    base_step, new_step = run_step_time(base), run_step_time(new)
    floor = (base_step or 0.0) * min_share_pct / 100
    step = _change("step", "step", base_step, new_step, noise_pct, floor)
    base_phases, new_phases = _phase_medians(base), _phase_medians(new)
    phases = [
        _change("phase", phase, base_phases.get(phase), new_phases.get(phase), noise_pct, floor)
        for phase in PHASES
        if phase in base_phases or phase in new_phases
    ]
    base_times, new_times = module_times(base), module_times(new)
    modules: list[Change] = []
    warmup_only: list[str] = []
    for module in sorted(set(base_times) & set(new_times)):
        for phase in ("forward", "backward"):
            b, n = base_times[module].self_s.get(phase), new_times[module].self_s.get(phase)
            if b is None or n is None:
                continue
            if phase in base_times[module].warmup or phase in new_times[module].warmup:
                warmup_only.append(f"{phase} {module}")  # step 1 against a median: a change of nothing
                continue
            modules.append(_change("module", f"{phase} {module}", b, n, noise_pct, floor))
    modules.sort(key=lambda c: -abs(c.delta_s or 0.0))
    diff = Diff(
        base=base.run_id,
        new=new.run_id,
        noise_pct=noise_pct,
        min_share_pct=min_share_pct,
        floor_s=floor,
        step=step,
        phases=phases,
        modules=modules,
        only_base=sorted(set(base_times) - set(new_times)),
        only_new=sorted(set(new_times) - set(base_times)),
        fail_above=fail_above,
        warmup_only=warmup_only,
        notes=[f"base: {m}" for m in base.missing] + [f"new: {m}" for m in new.missing],
    )
    if warmup_only:
        names = ", ".join(warmup_only[:10]) + (" ..." if len(warmup_only) > 10 else "")
        diff.notes.append(
            f"{len(warmup_only)} module row{'s' if len(warmup_only) != 1 else ''} not compared: only a warm-up "
            f"(step 1) figure on one side, no steady-state median (too few sampled steps?): {names}"
        )
    if fail_above is not None:
        diff.failed = [c for c in [step, *phases, *modules] if _slowed_above(c, fail_above)]
    return diff


def _pct(change: Change) -> str:
    if change.pct is None:
        return "-" if change.delta_s is None else "from 0"
    return f"{change.pct:+.1f}%"


def _line(change: Change, width: int) -> str:
    mark = ""
    if change.significant and change.delta_s is not None:
        mark = "  slower" if change.delta_s > 0 else "  faster"
    delta = "" if change.delta_s is None else f"{'+' if change.delta_s >= 0 else '-'}{fmt_s(abs(change.delta_s))}"
    return (
        f"  {change.name.ljust(width)}  {fmt_s(change.base_s):>9} -> {fmt_s(change.new_s):>9}"
        f"  {_pct(change):>8}  {delta:>10}{mark}"
    )


def render_diff(diff: Diff, top: int = SHOWN_MODULES) -> str:
    """The terminal comparison: step, phases, then the modules that changed most."""
    lines = [
        f"hooktrace diff: {diff.base} -> {diff.new}",
        f"Noise: changes under {diff.noise_pct:g}% or under {diff.min_share_pct:g}% of the base step "
        f"({fmt_s(diff.floor_s)}) are not counted",
        "Step and phases (median per step):",
    ]
    width = max([len(c.name) for c in [diff.step, *diff.phases, *diff.modules[:top]]] + [4])
    lines += [_line(c, width) for c in [diff.step, *diff.phases]]
    counted = [c for c in diff.modules if c.significant]
    shown = diff.modules[:top]
    lines.append(
        f"Modules (median self time per step, largest change first; {len(counted)} of "
        f"{len(diff.modules)} changed beyond the noise, top {len(shown)} shown):"
    )
    lines += [_line(c, width) for c in shown]
    if diff.only_base:
        lines.append(f"Only in base: {', '.join(diff.only_base[:10])}{' ...' if len(diff.only_base) > 10 else ''}")
    if diff.only_new:
        lines.append(f"Only in new: {', '.join(diff.only_new[:10])}{' ...' if len(diff.only_new) > 10 else ''}")
    lines += [f"Note: {note}" for note in diff.notes]
    if diff.fail_above is not None:
        if diff.failed:
            modules = [c for c in diff.failed if c.kind == "module"]  # already ranked by change
            ranked = [*modules[:3], *(c for c in diff.failed if c.kind != "module")]
            names = ", ".join(f"{c.name} ({_pct(c)})" for c in ranked)
            lines.append(f"FAIL: {len(diff.failed)} slowed by more than {diff.fail_above:g}%: {names}")
        else:
            lines.append(f"OK: nothing slowed by more than {diff.fail_above:g}%")
    return "\n".join(lines)
