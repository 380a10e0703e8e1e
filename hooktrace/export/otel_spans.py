"""One step's OpenTelemetry span tree (DESIGN §5), made on the worker thread by ``OtelExporter``:
``step {n}`` (rank 0), ``rank {r}``, its phases, then the module spans nested like the module tree,
with the step's events as span events on the span of their module."""

from __future__ import annotations

import hashlib
import math
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.context import Context

if TYPE_CHECKING:
    from hooktrace._aggregate.step_record import ModuleSpan, StepEvent, StepRecord
    from hooktrace.export.otel import OtelExporter

SPAN_EVENTS = ("grad_spike", "nonfinite", "grad_clip", "amp_skip", "hook_error")
"""Every kind of ``StepEvent``: each becomes a span event named like it."""
_PHASE_OF = {"forward": "forward", "eval": "eval", "backward": "backward", "recompute": "backward", "input": "forward"}
"""Module phase -> the step phase its spans and events live under (recompute runs inside backward;
``input``, a NaN batch, is an event on the root's forward)."""


def root_span_id(trace_id: str) -> int:
    """The span id of ``step {n}``: every rank computes it from the trace id alone."""
    return int(hashlib.sha256((trace_id + "root").encode()).hexdigest()[:16], 16) or 1


class StepSpans:
    """One step's span tree: made in time order with parents first, events added, then ended."""

    def __init__(self, exporter: OtelExporter, tracer: trace.Tracer, step: StepRecord, trace_id: str) -> None:
        self.x = exporter
        self.tracer = tracer
        self.step = step
        self.trace_hex = trace_id
        self.offset = step.wall_start_ns - step.start_ns
        self.lo = step.start_ns
        self.hi = max(step.end_ns, step.start_ns)
        self.open: list[tuple[trace.Span, int]] = []
        self.by_module: dict[int, list[tuple[int, int, str, trace.Span]]] = {}
        self.by_name: dict[str, list[tuple[ModuleSpan, trace.Span, int]]] = {}

    def _start(
        self, name: str, parent: trace.Span | Context, start: int, end: int, attrs: dict[str, Any]
    ) -> trace.Span:
        ctx = parent if isinstance(parent, Context) else trace.set_span_in_context(parent, Context())
        span = self.tracer.start_span(name, context=ctx, start_time=start + self.offset, attributes=attrs)
        self.open.append((span, end + self.offset))
        return span

    def emit(self) -> None:
        x, step = self.x, self.step
        ids = x.ids
        trace_hex = self.trace_hex
        trace_id = int(trace_hex, 16)
        root_id = root_span_id(trace_hex)
        ids.trace_id = trace_id
        base = {"hooktrace.step": step.step}
        root: trace.Span | None = None
        if x.info.rank == 0:
            ids.next_span_id = root_id
            root = self._start(f"step {step.step}", Context(), self.lo, self.hi, dict(base))
        if x.traces_this_rank():
            parent: trace.Span | Context = (
                root
                if root is not None
                else trace.set_span_in_context(
                    trace.NonRecordingSpan(
                        trace.SpanContext(
                            trace_id, root_id, is_remote=True, trace_flags=trace.TraceFlags(trace.TraceFlags.SAMPLED)
                        )
                    ),
                    Context(),
                )
            )
            self._rank_tree(parent, {**base, "hooktrace.rank": x.info.rank})
        for span, end in reversed(self.open):  # children end first, as they would live
            span.end(end_time=end)
        ids.trace_id = 0

    def _rank_tree(self, parent: trace.Span | Context, base: dict[str, Any]) -> None:
        step = self.step
        attrs = dict(base)
        if step.grad_norm is not None and math.isfinite(step.grad_norm):
            attrs["hooktrace.grad_norm"] = step.grad_norm
        if not step.sampled:
            attrs["hooktrace.sampled"] = False  # an event step: no module spans
        rank_span = self._start(f"rank {self.x.info.rank}", parent, self.lo, self.hi, attrs)
        phases: list[tuple[str, int, int, trace.Span]] = []
        for phase, s, e in step.phase_spans:
            s, e = _clamp(s, e, self.lo, self.hi)
            if e > s:
                span = self._start(phase, rank_span, s, e, {**base, "hooktrace.phase": phase})
                phases.append((phase, s, e, span))
        parent_of = {m.index: m.parent for m in step.spans}
        kept = [m for m in step.spans if m.depth <= self.x.depth or self._watched(m.module)]
        kept.sort(key=lambda m: (m.start_ns, -m.end_ns, m.depth))
        for m in kept:
            found = self._module_parent(m, parent_of)
            if found is None:
                found = _best_phase(phases, m) or (rank_span, self.lo, self.hi)
            p_span, p_lo, p_hi = found
            s, e = _clamp(m.start_ns, m.end_ns, p_lo, p_hi)
            attrs = {
                **base,
                "hooktrace.phase": m.phase,
                "hooktrace.module": m.module,
                "hooktrace.module_type": m.module_type,
            }
            if m.activation_bytes is not None:  # --memory on: bytes this call saved for backward
                attrs["hooktrace.activation_bytes"] = m.activation_bytes
            if m.allocated_delta is not None:  # CUDA: the allocator's allocated bytes after - before
                attrs["hooktrace.allocated_delta_bytes"] = m.allocated_delta
            span = self._start(f"{m.phase} {m.module}", p_span, s, e, attrs)
            self.by_module.setdefault(m.index, []).append((s, e, m.phase, span))
            self.by_name.setdefault(m.module, []).append((m, span, e))
            if m.label != m.module:
                self.by_name.setdefault("label:" + m.label, []).append((m, span, e))
        by_phase = {phase: (span, e) for phase, _, e, span in phases}  # the last interval of each phase
        for event in step.events:
            if event.kind in SPAN_EVENTS:
                self._event(event, by_phase, rank_span)

    def _watched(self, module: str) -> bool:
        return any(module == w or module.startswith(w + ".") for w in self.x.watch)

    def _module_parent(self, m: ModuleSpan, parent_of: dict[int, int]) -> tuple[trace.Span, int, int] | None:
        """The span of the nearest ancestor module, same phase, whose interval holds ``m``'s start."""
        index, seen = m.parent, 0
        while index >= 0 and seen < 1000:
            for s, e, phase, span in reversed(self.by_module.get(index, ())):
                if phase == m.phase and s <= m.start_ns <= e:
                    return span, s, e
            index, seen = parent_of.get(index, -1), seen + 1
        return None

    def _event(self, event: StepEvent, by_phase: dict[str, tuple[trace.Span, int]], fallback: trace.Span) -> None:
        module, phase, value, detail = event.module, event.phase, event.value, event.detail
        candidates = (
            self.by_name.get(str(detail.get("first_module", "")))
            or self.by_name.get(module)
            or self.by_name.get("label:" + module)
            or []
        )
        home = _PHASE_OF.get(phase, phase)
        own = [c for c in candidates if c[0].phase == home]
        target, at = fallback, self.hi
        if own:
            _, target, at = min(own, key=lambda c: c[0].depth)
        elif home in by_phase:
            target, at = by_phase[home]
        elif candidates:
            _, target, at = min(candidates, key=lambda c: c[0].depth)
        attrs: dict[str, Any] = {"hooktrace.module": module, "hooktrace.phase": phase}
        if value is not None and math.isfinite(value):
            attrs["hooktrace.value"] = value
        for key, item in detail.items():
            if isinstance(item, (str, bool, int, float)):
                attrs[f"hooktrace.{key}"] = item
        target.add_event(event.kind, attrs, timestamp=at + self.offset)


def _clamp(start: int, end: int, lo: int, hi: int) -> tuple[int, int]:
    """Keep a child inside its parent: clocks and hooks may disagree by a few microseconds."""
    s = min(max(start, lo), hi)
    return s, max(min(end, hi), s)


def _best_phase(phases: list[tuple[str, int, int, trace.Span]], m: ModuleSpan) -> tuple[trace.Span, int, int] | None:
    """The step phase that holds most of a top module span, preferring its own phase."""
    home = _PHASE_OF.get(m.phase, m.phase)
    best: tuple[int, int, tuple[trace.Span, int, int]] | None = None
    for phase, s, e, span in phases:
        overlap = min(e, m.end_ns) - max(s, m.start_ns)
        if overlap < 0 or (overlap == 0 and not s <= m.start_ns <= e):
            continue
        score = (int(phase == home), overlap)
        if best is None or score > best[:2]:
            best = (*score, (span, s, e))
    return best[2] if best is not None else None
