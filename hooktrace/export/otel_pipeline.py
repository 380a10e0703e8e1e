"""The span pipeline behind ``OtelExporter``: step trace ids, a bounded queue that counts what it
drops, and an exporter that counts what reaches the collector and gives up fast when closing."""

from __future__ import annotations

import contextlib
import logging
import random
import secrets
import sys
import threading
from collections.abc import Sequence

from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.id_generator import IdGenerator


class StepIds(IdGenerator):
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


class Ledger:
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


class CountingExporter(SpanExporter):
    """Counts what reaches the collector; fails fast once closing (a down collector costs no time)."""

    def __init__(self, inner: SpanExporter, ledger: Ledger, endpoint: str) -> None:
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


class BoundedProcessor(SpanProcessor):
    """A ``BatchSpanProcessor`` that rejects (and counts) spans when its queue is full, instead of
    evicting queued spans with a log line per span as the SDK does."""

    def __init__(self, inner: SpanProcessor, ledger: Ledger, max_queue_size: int) -> None:
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


class FirstOnly(logging.Filter):
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
