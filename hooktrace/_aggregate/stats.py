"""Running aggregates of one rank: the source of metrics snapshots and of the run summary.

Bounded over any number of steps: per (module, phase) a ring of recent steady-state per-step
values (``module_stats``), fixed histograms, a ring of recent step times for medians, and at most
``MAX_EVENTS`` kept events (the rest only counted). A partial step (the run ended inside it) is
not a step: it adds its events and gradient norms, nothing else.
"""

from __future__ import annotations

import statistics
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

from hooktrace._aggregate.memory_stats import MemoryStats
from hooktrace._aggregate.module_stats import ModuleTimes
from hooktrace._aggregate.snapshot import (
    MODULE_TYPE_BUCKETS,
    PHASE_BUCKETS,
    PHASES,
    STEP_BUCKETS,
    Histogram,
    MetricsSnapshot,
    RankInfo,
)
from hooktrace._aggregate.step_record import StepEvent, StepRecord

MAX_EVENTS = 1000
RECENT_STEPS = 4096


@dataclass(slots=True)
class RankStats:
    """Everything the summary and the metrics need, updated once per step on the worker."""

    info: RankInfo
    steps: int = 0
    sampled_steps: int = 0
    micro_batches: int = 0
    step_hist: Histogram = field(default_factory=lambda: Histogram(STEP_BUCKETS))
    phase_hist: dict[str, Histogram] = field(default_factory=dict)
    phase_totals: dict[str, float] = field(default_factory=dict)
    recent_steps: deque[float] = field(default_factory=lambda: deque(maxlen=RECENT_STEPS))
    recent_busy: deque[float] = field(default_factory=lambda: deque(maxlen=RECENT_STEPS))
    """Step time minus exposed all-reduce wait: in synchronous DDP every rank has the same step
    time, and the straggler is the rank that the others wait for."""
    recent_phases: dict[str, deque[float]] = field(default_factory=dict)
    modules: ModuleTimes = field(default_factory=ModuleTimes)
    partial_steps: int = 0
    compile_steps: int = 0
    optimizer_steps: Counter[str] = field(default_factory=Counter)
    """Steps per optimizer name (``Adam#0``); empty when steps came from backward alone."""
    clipped_steps: int = 0
    """Steps whose gradients the script changed after backward (clipping): norms are from before."""
    type_hist: dict[tuple[str, str], Histogram] = field(default_factory=dict)
    grad_norms: dict[str, float] = field(default_factory=dict)
    grad_norm_ratio: float | None = None
    counters: Counter[str] = field(default_factory=Counter)
    nonfinite_events: Counter[tuple[str, str]] = field(default_factory=Counter)
    grad_clips: Counter[str] = field(default_factory=Counter)
    dropped: Counter[str] = field(default_factory=Counter)
    export_errors: Counter[str] = field(default_factory=Counter)
    events: list[dict[str, Any]] = field(default_factory=list)
    event_counts: Counter[str] = field(default_factory=Counter)
    hook_errors: int = 0
    overhead_s: float = 0.0
    train_time_s: float = 0.0
    module_labels: int = 0
    modules_truncated: int = 0
    memory: MemoryStats = field(default_factory=MemoryStats)

    def __post_init__(self) -> None:
        for phase in PHASES:
            self.phase_hist[phase] = Histogram(PHASE_BUCKETS)

    def add(self, record: StepRecord) -> None:
        """Fold one step in (a partial one only for its events and norms)."""
        self._add_health(record)
        if record.partial:
            self.partial_steps += 1
            return
        self.steps += 1
        self.compile_steps += int(record.compiled)
        self.clipped_steps += int(record.clipped_by_script)
        optimizer = record.optimizer
        if optimizer:
            if "," in optimizer:
                self.optimizer_steps.update(optimizer.split(","))
            else:  # one optimizer: no list for Counter.update to walk
                self.optimizer_steps[optimizer] += 1
        self.micro_batches += record.micro_batches
        self.memory.add(record)
        duration = record.duration_s
        self.train_time_s += duration
        self.overhead_s += record.overhead_s
        self.step_hist.observe(duration, record.trace_id)
        self.recent_steps.append(duration)
        self.recent_busy.append(duration - record.phases.get("allreduce", 0.0))
        for phase, seconds in record.phases.items():
            hist = self.phase_hist.get(phase)
            if hist is not None:
                hist.observe(seconds, record.trace_id)
            self.phase_totals[phase] = self.phase_totals.get(phase, 0.0) + seconds
            self.recent_phases.setdefault(phase, deque(maxlen=RECENT_STEPS)).append(seconds)
        if record.spans:
            self.sampled_steps += 1
            self._add_spans(record)

    def _add_health(self, record: StepRecord) -> None:
        """Gradient norms and events: what happened counts even in a partial step."""
        self.grad_norms.update(record.module_grad_norms)
        if record.grad_norm is not None:
            self.grad_norms["__total__"] = record.grad_norm
        if record.grad_norm_ratio is not None:
            self.grad_norm_ratio = record.grad_norm_ratio
        if not record.events:
            return
        kinds = {event.kind for event in record.events}
        if "grad_spike" in kinds:
            self.counters["grad_spike_steps"] += 1
        if "nonfinite" in kinds:
            self.counters["nonfinite_grad_steps"] += 1
        if "amp_skip" in kinds:
            self.counters["amp_skipped_steps"] += 1
        for event in record.events:
            self._add_event(record.step, event)

    def _add_spans(self, record: StepRecord) -> None:
        self.modules.add(record)
        for span in record.spans:
            inclusive = span.end_ns - span.start_ns
            hist = self.type_hist.get((span.module_type, span.phase))
            if hist is None:
                hist = self.type_hist[(span.module_type, span.phase)] = Histogram(MODULE_TYPE_BUCKETS)
            hist.observe(inclusive / 1e9)

    def _add_event(self, step: int, event: StepEvent) -> None:
        self.event_counts[event.kind] += 1
        if event.kind == "nonfinite":
            self.nonfinite_events[(event.module, event.phase)] += 1
        elif event.kind == "grad_clip":
            self.grad_clips[event.module] += 1
        if len(self.events) < MAX_EVENTS:
            self.events.append({"step": step, "rank": self.info.rank, **event.as_json()})
        else:
            self.dropped["events"] += 1

    def snapshot(self) -> MetricsSnapshot:
        """An immutable copy for exporters (swapped in after each step)."""
        return MetricsSnapshot(
            info=self.info,
            steps_total=self.steps,
            step_duration=self.step_hist.copy(),
            phase_duration={phase: hist.copy() for phase, hist in self.phase_hist.items()},
            module_duration=self.modules.label_durations(),
            module_type_duration={key: hist.copy() for key, hist in self.type_hist.items()},
            grad_norm=dict(self.grad_norms),
            grad_norm_ratio=self.grad_norm_ratio,
            grad_spike_steps_total=self.counters["grad_spike_steps"],
            nonfinite_grad_steps_total=self.counters["nonfinite_grad_steps"],
            nonfinite_events=dict(self.nonfinite_events),
            grad_clips=dict(self.grad_clips),
            optimizer_steps=dict(self.optimizer_steps),
            amp_skipped_steps_total=self.counters["amp_skipped_steps"],
            dropped=dict(self.dropped),
            hook_errors_total=self.hook_errors,
            export_errors=dict(self.export_errors),
            overhead_seconds_total=self.overhead_s,
            module_labels=self.module_labels,
            modules_truncated=self.modules_truncated,
            module_activation_bytes=dict(self.memory.label_bytes),
            memory_bytes=self.memory.gauges(),
        )

    def rank_summary(self) -> dict[str, Any]:
        """This rank's entry of ``summary.json``."""
        phases = {phase: statistics.median(values) for phase, values in self.recent_phases.items() if values}
        return {
            "rank": self.info.rank,
            "local_rank": self.info.local_rank,
            "node": self.info.node,
            "device": self.info.device,
            "steps": self.steps,
            "sampled_steps": self.sampled_steps,
            "compile_steps": self.compile_steps,
            "partial_steps": self.partial_steps,
            "step_source": ("optimizer" if self.optimizer_steps else "backward") if self.steps else None,
            "optimizers": dict(self.optimizer_steps),
            "clipped_steps": self.clipped_steps,
            "micro_batches": self.micro_batches,
            "step_time_s": statistics.median(self.recent_steps) if self.recent_steps else None,
            "busy_time_s": statistics.median(self.recent_busy) if self.recent_busy else None,
            "phases": phases,
            "phase_totals_s": dict(self.phase_totals),
            "grad_norm": self.grad_norms.get("__total__"),
            "overhead_ratio": self.overhead_s / self.train_time_s if self.train_time_s > 0 else 0.0,
            "hook_errors": self.hook_errors,
            "dropped": dict(self.dropped),
            "event_counts": dict(self.event_counts),
            "memory": self.memory.summary(self.info.device),
        }

    def module_rows(self) -> list[dict[str, Any]]:
        """Per module and phase: steady-state medians, warm-up and compile figures apart (summary
        ``modules``; fields in ``module_stats.ModuleStats.row``)."""
        return self.modules.rows(self.info.rank)
