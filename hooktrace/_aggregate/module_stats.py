"""Per-module statistics of one rank: steady-state medians, with the first step and compile steps apart.

A step is one of three kinds for module statistics:

- **warm-up**: step 1 (first calls allocate, autotune, build caches; torch.compile compiles);
- **compile**: a later step during which torch.compile compiled a graph (``StepRecord.compiled``);
- **steady**: every other sampled step.

Only steady steps feed the medians (``total_s``, ``self_s``, ``calls_per_step``, the p90s) and the
``hooktrace_module_duration_seconds`` series; warm-up and compile figures are kept beside them,
never folded in. A partial step (the run ended inside it) is not a step: callers never pass one.

Memory is bounded over any number of steps: per (module, phase) a ring of the per-step values of
the most recent ``RING`` steady sampled steps, plus a few counters. A ring rather than a streaming
quantile estimator (P²): the quantiles are exact, which matters on short runs where an estimator
has seen too few values to be right (a 3-step test, a 20-step smoke run), and they describe recent
steady state like the step breakdown's ring of recent steps. The price is fixed: 3 x ``RING``
int64 values (6 KiB) per (module, phase), and sorting them only when a summary is built.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from hooktrace._aggregate.step_record import ModuleSpan, StepRecord

RING = 256
"""Steady sampled steps kept per (module, phase): 2,560 steps at the default ``--sample-every 10``."""

WARMUP, COMPILE, STEADY = "warmup", "compile", "steady"


def step_kind(record: StepRecord) -> str:
    """``warmup`` for step 1 (compiled or not), ``compile`` for a later step that compiled, else ``steady``."""
    if record.step <= 1:
        return WARMUP
    return COMPILE if record.compiled else STEADY


def quantile(values: Iterable[float], q: float) -> float | None:
    """The ``q`` quantile, interpolated between the closest ranks (numpy's default); None if empty."""
    ordered = sorted(values)
    if not ordered:
        return None
    pos = q * (len(ordered) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


class Ring:
    """The most recent ``capacity`` integers, in a fixed-size ``array`` (no per-value objects)."""

    __slots__ = ("_next", "capacity", "values")

    def __init__(self, capacity: int = RING) -> None:
        self.capacity = capacity
        self.values = array("q")
        self._next = 0

    def append(self, value: int) -> None:
        if len(self.values) < self.capacity:
            self.values.append(value)
        else:
            self.values[self._next] = value
            self._next = (self._next + 1) % self.capacity

    def quantile(self, q: float, scale: float = 1.0) -> float | None:
        found = quantile(self.values, q)
        return None if found is None else found * scale


def _seconds(ns: int | None) -> float | None:
    return None if ns is None else ns / 1e9


@dataclass(slots=True)
class ModuleStats:
    """One module in one phase. Per step: its inclusive time, self time and calls, summed over calls."""

    module: str
    label: str
    module_type: str
    phase: str
    calls: int = 0
    """Every call on the sampled steps folded in (warm-up and compile steps included)."""
    steps: int = 0
    """Steady sampled steps in which it ran (all of them, not only those in the rings)."""
    totals: Ring = field(default_factory=Ring)
    selfs: Ring = field(default_factory=Ring)
    step_calls: Ring = field(default_factory=Ring)
    warmup_total_ns: int | None = None
    warmup_self_ns: int | None = None
    compile_total_ns: int = 0
    compile_self_ns: int = 0
    compile_steps: int = 0
    label_ns: int = 0
    """Steady-state time this module adds to its metric label: 0 while an ancestor stands for it."""
    label_calls: int = 0
    activation: Ring | None = None
    """Forward-kind phases with ``--memory on``: inclusive bytes saved for backward per steady step."""
    self_activation: Ring | None = None
    activation_last: tuple[int, int] | None = None
    """(inclusive, self) bytes of the latest measured step, whatever its kind."""
    activation_max: int = 0
    allocated_delta: int | None = None
    """CUDA: allocated bytes after minus before the module's calls, latest sampled step (summed over calls)."""

    def observe_bytes(self, kind: str, inclusive: int, own: int) -> None:
        """Fold one step's activation bytes in (medians over steady steps, like times)."""
        self.activation_last = (inclusive, own)
        self.activation_max = max(self.activation_max, inclusive)
        if kind == STEADY:
            if self.activation is None or self.self_activation is None:
                self.activation, self.self_activation = Ring(), Ring()
            self.activation.append(inclusive)
            self.self_activation.append(own)

    def observe(self, kind: str, total_ns: int, self_ns: int, calls: int, stands_for_label: bool) -> None:
        """Fold one step's figures in; ``stands_for_label`` is False when an ancestor covers the label."""
        self.calls += calls
        if kind == WARMUP:
            self.warmup_total_ns, self.warmup_self_ns = total_ns, self_ns
        elif kind == COMPILE:
            self.compile_total_ns += total_ns
            self.compile_self_ns += self_ns
            self.compile_steps += 1
        else:
            self.steps += 1
            self.totals.append(total_ns)
            self.selfs.append(self_ns)
            self.step_calls.append(calls)
            if stands_for_label:
                self.label_ns += total_ns
                self.label_calls += calls

    def row(self, rank: int) -> dict[str, Any]:
        """A ``summary.json`` ``modules`` row (DESIGN §7); medians are None without a steady step."""
        total = self.totals.quantile(0.5, 1e-9)
        own = self.selfs.quantile(0.5, 1e-9)
        row: dict[str, Any] = {
            "module": self.module,
            "module_type": self.module_type,
            "phase": self.phase,
            "rank": rank,
            "total_s": total,
            "self_s": own,
            "total_p90_s": self.totals.quantile(0.9, 1e-9),
            "self_p90_s": self.selfs.quantile(0.9, 1e-9),
            "calls_per_step": self.step_calls.quantile(0.5),
            "steps": self.steps,
            "calls": self.calls,
            "per_step_s": total,  # the older name of total_s
            "self_per_step_s": own,  # the older name of self_s
            "warmup_total_s": _seconds(self.warmup_total_ns),
            "warmup_self_s": _seconds(self.warmup_self_ns),
            "compile_total_s": self.compile_total_ns / 1e9,
            "compile_self_s": self.compile_self_ns / 1e9,
            "compile_steps": self.compile_steps,
        }
        if self.activation_last is not None:
            # the steady median when there is one, else the latest measured step (bytes have no warm-up)
            inclusive, own_bytes = self.activation_last
            if self.activation is not None and self.self_activation is not None:
                inclusive = int(self.activation.quantile(0.5) or 0)
                own_bytes = int(self.self_activation.quantile(0.5) or 0)
            row["activation_bytes"] = inclusive
            row["self_activation_bytes"] = own_bytes
            row["activation_bytes_max"] = self.activation_max
        if self.allocated_delta is not None:
            row["allocated_delta_bytes"] = self.allocated_delta
        return row


def row_order(row: dict[str, Any]) -> tuple[bool, float, float]:
    """Sort key of module rows: steady medians first, slowest first; then by first-step time."""
    total = row.get("total_s")
    return total is None, -(total or 0.0), -(row.get("warmup_total_s") or 0.0)


def covered(spans: Iterable[ModuleSpan]) -> set[tuple[int, str]]:
    """``(index, phase)`` of the modules whose label an ancestor stands for in this step.

    A label is a display name cut to ``--depth`` dotted parts (or ``__other__``), so the modules
    that share a label with a module and contain it are exactly its dotted-prefix ancestors with
    that label. When one of them was called in the same phase, its inclusive time already holds
    this module's: adding both would count the subtree twice. A never-called container (a
    ``ModuleList``) covers nothing, so its called children stand for the label side by side.
    """
    spans = list(spans)
    called = {(span.module, span.phase): span.label for span in spans}
    out: set[tuple[int, str]] = set()
    for span in spans:
        name = span.module
        while "." in name:
            name = name.rpartition(".")[0]
            if called.get((name, span.phase)) == span.label:
                out.add((span.index, span.phase))
                break
    return out


class ModuleTimes:
    """Every (module, phase) of a rank. Worker thread only (``add``); readers call the others after it."""

    def __init__(self) -> None:
        self.stats: dict[tuple[int, str], ModuleStats] = {}

    def __len__(self) -> int:
        return len(self.stats)

    def add(self, record: StepRecord) -> None:
        """Fold in the spans of one sampled, complete step."""
        kind = step_kind(record)
        per_step: dict[tuple[int, str], list[int]] = {}  # -> [inclusive ns, self ns, calls]
        for span in record.spans:
            key = (span.index, span.phase)
            entry = per_step.get(key)
            if entry is None:
                entry = per_step[key] = [0, 0, 0]
                if key not in self.stats:
                    self.stats[key] = ModuleStats(span.module, span.label, span.module_type, span.phase)
            entry[0] += max(0, span.end_ns - span.start_ns)
            entry[1] += span.self_ns
            entry[2] += 1
        hidden = covered(record.spans) if kind == STEADY else set()
        measured = record.activation_bytes is not None
        deltas: dict[tuple[int, str], int] = {}
        for span in record.spans:
            if span.allocated_delta is not None:
                deltas[(span.index, span.phase)] = deltas.get((span.index, span.phase), 0) + span.allocated_delta
        for key, delta in deltas.items():
            self.stats[key].allocated_delta = delta
        for key, (total_ns, self_ns, calls) in per_step.items():
            stats = self.stats[key]
            stats.observe(kind, total_ns, self_ns, calls, key not in hidden)
            if measured and key[1] != "backward":  # no saves counted for a call: it kept nothing
                stats.observe_bytes(kind, *record.module_bytes.get(key, (0, 0)))

    def label_durations(self) -> dict[tuple[str, str], tuple[float, int]]:
        """(label, phase) -> (seconds, calls) over steady steps: each label counts the modules that
        stand for it (see ``covered``), so a cut label is its covering module, never a sum of levels."""
        sums: dict[tuple[str, str], list[int]] = {}
        for stats in self.stats.values():
            if stats.steps:
                entry = sums.setdefault((stats.label, stats.phase), [0, 0])
                entry[0] += stats.label_ns
                entry[1] += stats.label_calls
        return {key: (ns / 1e9, calls) for key, (ns, calls) in sums.items() if calls}

    def rows(self, rank: int) -> list[dict[str, Any]]:
        """Summary rows, slowest steady median first (see ``row_order``)."""
        return sorted((stats.row(rank) for stats in self.stats.values()), key=row_order)
