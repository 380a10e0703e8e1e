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
import logging
import os
import threading
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

from opentelemetry import trace
from opentelemetry.sdk.environment_variables import (
    OTEL_EXPORTER_OTLP_ENDPOINT,
    OTEL_EXPORTER_OTLP_PROTOCOL,
    OTEL_EXPORTER_OTLP_TIMEOUT,
    OTEL_EXPORTER_OTLP_TRACES_ENDPOINT,
    OTEL_EXPORTER_OTLP_TRACES_PROTOCOL,
    OTEL_EXPORTER_OTLP_TRACES_TIMEOUT,
)
from opentelemetry.sdk.resources import OTELResourceDetector, Resource
from opentelemetry.sdk.trace import TracerProvider, sampling
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter

from hooktrace._version import __version__
from hooktrace.distributed import RankChoice
from hooktrace.errors import HooktraceError
from hooktrace.export.ids import step_trace_id
from hooktrace.export.otel_pipeline import BoundedProcessor, CountingExporter, FirstOnly, Ledger, StepIds
from hooktrace.export.otel_spans import StepSpans

if TYPE_CHECKING:
    from hooktrace._aggregate.snapshot import MetricsSnapshot, RankInfo
    from hooktrace._aggregate.stats import RankStats
    from hooktrace._aggregate.step_record import StepRecord

MAX_QUEUE_SIZE = 8192
"""Spans waiting for the collector: a few sampled steps of a 1000-module model; beyond, drops."""
MAX_EXPORT_BATCH = 512
SCHEDULE_DELAY_MS = 1000
EXPORT_TIMEOUT_S = 2.0
"""Per export request, retries included, unless ``OTEL_EXPORTER_OTLP_[TRACES_]TIMEOUT`` is set."""
CLOSE_TIMEOUT_S = 3.0
"""``close()`` sends what is queued for at most this long, then gives up (and counts the rest)."""
TRACES_PATH = "/v1/traces"


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
        self._ledger = Ledger()
        self._provider: TracerProvider | None = None
        self.ids = StepIds()
        """Trace and span ids of the step being emitted (``StepSpans`` sets them)."""
        self._tracer: trace.Tracer | None = None
        self._sink: CountingExporter | None = None
        self._quiet = FirstOnly()
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
        self._sink = CountingExporter(inner, self._ledger, self.endpoint or type(inner).__name__)
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
            id_generator=self.ids,
        )
        provider.add_span_processor(BoundedProcessor(batch, self._ledger, self.max_queue_size))
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
            StepSpans(self, tracer, step, trace_id).emit()
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
