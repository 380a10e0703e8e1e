"""OpenTelemetry traces of sampled steps and event steps (DESIGN §5), built on the worker thread.

Never block training: spans are made from the step's recorded timestamps once the step is over,
on the worker thread, through a private ``TracerProvider`` (the global one stays the user's).
Ended spans go to a bounded ``BatchSpanProcessor`` whose own thread talks to the collector; a
full queue, a failed export or a collector that is down only drops spans, and each drop is
counted (``hooktrace_dropped_total{what="spans"}``, ``summary.json`` ranks[].dropped)::

    StepRecord -> span tree (worker) -> bounded queue -> BSP thread -> OTLP/HTTP (or gRPC)

One trace per sampled step, shared by all ranks without communication: the trace id is the
agent's hash(run id, restart count, step), and the root ``step {n}`` (emitted by rank 0) has a
span id derived from it, so every rank parents its ``rank {r}`` span to it.

A step with an event (a gradient spike, a non-finite gradient, a clip, an AMP skip, a hook
error) gets its trace too, sampled or not, so that the event can be found in the trace backend:
the root, ``rank {r}`` and its phases, with the event as a span event; an unsampled step has no
module spans (nothing timed them), and its ``rank {r}`` span says ``hooktrace.sampled = false``.
An event lands on the span of its module in its phase, else on the span of its step phase, else
on the module's span in another phase, else on ``rank {r}``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import random
import secrets
import sys
import threading
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.environment_variables import (
    OTEL_EXPORTER_OTLP_ENDPOINT,
    OTEL_EXPORTER_OTLP_PROTOCOL,
    OTEL_EXPORTER_OTLP_TIMEOUT,
    OTEL_EXPORTER_OTLP_TRACES_ENDPOINT,
    OTEL_EXPORTER_OTLP_TRACES_PROTOCOL,
    OTEL_EXPORTER_OTLP_TRACES_TIMEOUT,
)
from opentelemetry.sdk.resources import OTELResourceDetector, Resource
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider, sampling
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.id_generator import IdGenerator

from hooktrace._version import __version__
from hooktrace.distributed import RankChoice
from hooktrace.errors import HooktraceError
from hooktrace.export.ids import step_trace_id

if TYPE_CHECKING:
    from hooktrace._aggregate.snapshot import MetricsSnapshot, RankInfo
    from hooktrace._aggregate.stats import RankStats
    from hooktrace._aggregate.step_record import ModuleSpan, StepEvent, StepRecord

MAX_QUEUE_SIZE = 8192
"""Spans waiting for the collector: a few sampled steps of a 1000-module model; beyond, drops."""
MAX_EXPORT_BATCH = 512
SCHEDULE_DELAY_MS = 1000
EXPORT_TIMEOUT_S = 2.0
"""Per export request, retries included, unless ``OTEL_EXPORTER_OTLP_[TRACES_]TIMEOUT`` is set."""
CLOSE_TIMEOUT_S = 3.0
"""``close()`` sends what is queued for at most this long, then gives up (and counts the rest)."""
TRACES_PATH = "/v1/traces"
SPAN_EVENTS = ("grad_spike", "nonfinite", "grad_clip", "amp_skip", "hook_error")
"""Every kind of ``StepEvent``: each becomes a span event named like it."""
_PHASE_OF = {"forward": "forward", "eval": "eval", "backward": "backward", "recompute": "backward", "input": "forward"}
"""Module phase -> the step phase its spans and events live under (recompute runs inside backward;
``input``, a NaN batch, is an event on the root's forward)."""


def root_span_id(trace_id: str) -> int:
    """The span id of ``step {n}``: every rank computes it from the trace id alone."""
    return int(hashlib.sha256((trace_id + "root").encode()).hexdigest()[:16], 16) or 1


def resolve_endpoint(endpoint: str, environ: Mapping[str, str]) -> tuple[str, str]:
    """``(protocol, url)``: grpc for ``grpc://`` or ``OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL=grpc``,
    else http/protobuf with ``/v1/traces`` appended to a base URL, as the SDK does for
    ``OTEL_EXPORTER_OTLP_ENDPOINT``."""
    parts = urlsplit(endpoint)
    protocol = (
        environ.get(OTEL_EXPORTER_OTLP_TRACES_PROTOCOL) or environ.get(OTEL_EXPORTER_OTLP_PROTOCOL) or ""
    ).strip()
    if parts.scheme in ("grpc", "grpcs"):
        return "grpc", urlunsplit(("http" if parts.scheme == "grpc" else "https", *parts[1:]))
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise HooktraceError(
            f"--otlp-endpoint {endpoint!r} is not a URL; use http://HOST:4318 (OTLP/HTTP) or grpc://HOST:4317"
        )
    if protocol == "grpc":
        return "grpc", endpoint
    traces_env = environ.get(OTEL_EXPORTER_OTLP_TRACES_ENDPOINT)
    if traces_env and endpoint == environ.get(OTEL_EXPORTER_OTLP_ENDPOINT):
        return "http/protobuf", traces_env  # the SDK's precedence when our endpoint came from the base variable
    if parts.path.rstrip("/").endswith(TRACES_PATH):
        return "http/protobuf", endpoint
    return "http/protobuf", endpoint.rstrip("/") + TRACES_PATH


def make_span_exporter(endpoint: str, environ: Mapping[str, str] | None = None) -> SpanExporter:
    """The OTLP exporter of ``endpoint``; gRPC is an extra, imported only when asked for."""
    env = os.environ if environ is None else environ
    protocol, url = resolve_endpoint(endpoint, env)
    # headers, compression and TLS come from OTEL_* through the SDK; the timeout too when set
    user_timeout = env.get(OTEL_EXPORTER_OTLP_TRACES_TIMEOUT) or env.get(OTEL_EXPORTER_OTLP_TIMEOUT)
    timeout = None if user_timeout else EXPORT_TIMEOUT_S
    if protocol == "grpc":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter
        except ImportError:
            raise HooktraceError(
                f"--otlp-endpoint {endpoint} asks for OTLP/gRPC, which needs an extra: "
                "pip install 'hooktrace[grpc]' (or use an http:// endpoint, port 4318)"
            ) from None
        return GrpcExporter(endpoint=url, timeout=timeout)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter(endpoint=url, timeout=timeout)


class _StepIds(IdGenerator):
    """Trace id = the step's; the next span id may be forced (the root). Worker thread only.

    Random span ids come from a private generator seeded by the OS: never the training's RNG."""

    def __init__(self) -> None:
        self.trace_id = 0
        self.next_span_id = 0
        self._rng = random.Random(secrets.randbits(64))

    def generate_trace_id(self) -> int:
        return self.trace_id or self._rng.getrandbits(128) or 1

    def generate_span_id(self) -> int:
        forced, self.next_span_id = self.next_span_id, 0
        return forced or self._rng.getrandbits(64) or 1


class _Ledger:
    """Span counts shared by the worker and the BSP thread (a lock: two writers)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.accepted = 0
        self.rejected = 0
        self.sent = 0
        self.failed = 0
        self.closed = False

    def dropped(self) -> int:
        with self.lock:
            lost_in_queue = self.accepted - self.sent if self.closed else 0
            return self.rejected + self.failed + lost_in_queue


class _CountingExporter(SpanExporter):
    """Counts what reaches the collector; fails fast once closing (a down collector costs no time)."""

    def __init__(self, inner: SpanExporter, ledger: _Ledger, endpoint: str) -> None:
        self.inner = inner
        self.ledger = ledger
        self.endpoint = endpoint
        self.stopped = False
        self._warned = False

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        with self.ledger.lock:
            self.ledger.sent += len(spans)
        result = SpanExportResult.FAILURE
        if not self.stopped:
            try:
                result = self.inner.export(spans)
            except Exception:  # an exporter bug must not kill the BSP thread
                result = SpanExportResult.FAILURE
        if result is not SpanExportResult.SUCCESS:
            with self.ledger.lock:
                self.ledger.failed += len(spans)
            if not self._warned and not self.stopped:
                self._warned = True
                print(
                    f"hooktrace: could not send spans to {self.endpoint}; training goes on, spans are "
                    'dropped and counted (hooktrace_dropped_total{what="spans"})',
                    file=sys.stderr,
                )
        return result

    def stop(self) -> None:
        """From now on fail every batch at once, and abort the inner exporter's retry waits."""
        if not self.stopped:
            self.stopped = True
            with contextlib.suppress(Exception):  # closing must go on
                self.inner.shutdown()

    def shutdown(self) -> None:
        self.stop()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


class _BoundedProcessor(SpanProcessor):
    """A ``BatchSpanProcessor`` that rejects (and counts) spans when its queue is full, instead of
    evicting queued spans with a log line per span as the SDK does."""

    def __init__(self, inner: SpanProcessor, ledger: _Ledger, max_queue_size: int) -> None:
        self.inner = inner
        self.ledger = ledger
        self.max_queue_size = max_queue_size

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        return None

    def on_end(self, span: ReadableSpan) -> None:
        ledger = self.ledger
        with ledger.lock:
            if ledger.closed or ledger.accepted - ledger.sent >= self.max_queue_size:
                ledger.rejected += 1
                return
            ledger.accepted += 1
        self.inner.on_end(span)

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


class _FirstOnly(logging.Filter):
    """Lets one record of each message through: a down collector must not flood the training log."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        key = str(record.msg)
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


class OtelExporter:
    """Spans of sampled and event steps to an OTLP collector. Worker thread only (``close`` after it stops).

    ``span_exporter`` replaces the OTLP exporter (tests pass an ``InMemorySpanExporter``).
    """

    name = "otel"

    def __init__(
        self,
        endpoint: str | None,
        *,
        info: RankInfo,
        restart_count: int = 0,
        depth: int = 3,
        trace_ranks: str = "auto",
        watch: Sequence[str] = (),
        stats: RankStats | None = None,
        span_exporter: SpanExporter | None = None,
        max_queue_size: int = MAX_QUEUE_SIZE,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.info = info
        self.restart_count = restart_count
        self.depth = depth
        self.ranks = RankChoice(trace_ranks, info.rank, info.local_rank, info.world_size)
        self.watch = tuple(watch)
        self.span_exporter = span_exporter
        self.max_queue_size = max_queue_size
        self.environ = environ
        self._stats = stats
        self._ledger = _Ledger()
        self._provider: TracerProvider | None = None
        self._ids = _StepIds()
        self._tracer: trace.Tracer | None = None
        self._sink: _CountingExporter | None = None
        self._quiet = _FirstOnly()
        self._quieted: list[logging.Logger] = []
        if stats is not None:
            stats.dropped["spans"] += 0  # a zero series from the start

    @property
    def dropped_spans(self) -> int:
        return self._ledger.dropped()

    def start(self) -> None:
        if self._provider is not None:
            return
        inner = self.span_exporter
        if inner is None:
            if not self.endpoint:
                raise HooktraceError("the otel exporter needs --otlp-endpoint (or OTEL_EXPORTER_OTLP_ENDPOINT)")
            inner = make_span_exporter(self.endpoint, self.environ)
        for name in (type(inner).__module__, "opentelemetry.exporter.otlp.common.http"):
            logger = logging.getLogger(name)
            logger.addFilter(self._quiet)
            self._quieted.append(logger)
        self._sink = _CountingExporter(inner, self._ledger, self.endpoint or type(inner).__name__)
        batch = BatchSpanProcessor(
            self._sink,
            max_queue_size=self.max_queue_size,
            schedule_delay_millis=SCHEDULE_DELAY_MS,
            max_export_batch_size=min(MAX_EXPORT_BATCH, self.max_queue_size),
            export_timeout_millis=EXPORT_TIMEOUT_S * 1000,
        )
        provider = TracerProvider(
            sampler=sampling.ALWAYS_ON,  # hooktrace samples steps itself (--sample-every)
            resource=self.resource(),
            shutdown_on_exit=False,  # close() shuts it down, bounded; no atexit hook of ours
            id_generator=self._ids,
        )
        provider.add_span_processor(_BoundedProcessor(batch, self._ledger, self.max_queue_size))
        self._tracer = provider.get_tracer("hooktrace", __version__)
        self._provider = provider

    def resource(self) -> Resource:
        """DESIGN §5 resource; ``OTEL_SERVICE_NAME``/``OTEL_RESOURCE_ATTRIBUTES`` may rename the
        service, never the attributes that join ranks and runs."""
        info = self.info
        base = Resource.create({"service.name": "hooktrace", "host.name": info.node})
        identity = Resource(
            {
                "service.instance.id": f"{info.run_id}/rank{info.rank}",
                "hooktrace.run_id": info.run_id,
                "hooktrace.rank": info.rank,
                "hooktrace.local_rank": info.local_rank,
                "hooktrace.world_size": info.world_size,
                "hooktrace.restart_count": self.restart_count,
            }
        )
        return base.merge(OTELResourceDetector().detect()).merge(identity)

    def traces_this_rank(self) -> bool:
        """Whether this rank emits its ``rank {r}`` subtree (rank 0 always emits the root)."""
        return self.ranks.includes_this_rank()

    @property
    def slowest_rank(self) -> int | None:
        """Set by whoever knows it (cross-rank straggler detection); ``auto`` then traces it too."""
        return self.ranks.slowest_rank

    @slowest_rank.setter
    def slowest_rank(self, rank: int | None) -> None:
        self.ranks.slowest_rank = rank

    def export_step(self, step: StepRecord) -> None:
        tracer = self._tracer
        if tracer is not None and (step.spans or step.events):
            trace_id = step.trace_id or step_trace_id(self.info.run_id, self.restart_count, step.step)
            _StepSpans(self, tracer, step, trace_id).emit()
        self._sync_stats()

    def refresh(self, snapshot: MetricsSnapshot) -> None:
        """Spans need no metrics; only report drops."""
        self._sync_stats()

    def flush(self) -> None:
        """No network here: the BSP thread sends on its own schedule; just report drops."""
        self._sync_stats()

    def close(self) -> None:
        provider, self._provider = self._provider, None
        if provider is None:
            return
        self._tracer = None
        sink = self._sink

        def finish() -> None:
            with contextlib.suppress(Exception):  # closing must go on
                provider.force_flush()
            if sink is not None:
                sink.stop()
            with contextlib.suppress(Exception):
                provider.shutdown()

        closer = threading.Thread(target=finish, name="hooktrace-otel-close", daemon=True)
        closer.start()
        closer.join(CLOSE_TIMEOUT_S)
        if closer.is_alive() and sink is not None:
            sink.stop()  # a hung collector: abort retries, then stop waiting
            closer.join(0.5)
        with self._ledger.lock:
            self._ledger.closed = True
        for logger in self._quieted:
            logger.removeFilter(self._quiet)
        self._quieted.clear()
        self._sync_stats()

    def _sync_stats(self) -> None:
        if self._stats is not None:
            self._stats.dropped["spans"] = self._ledger.dropped()


class _StepSpans:
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
        ids = x._ids
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
