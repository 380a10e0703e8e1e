"""The worker thread: drains step buffers, aggregates, feeds exporters.

Threading contract: the training thread calls :meth:`submit` (a bounded, non-blocking put; a
full queue drops the step and counts it). Everything else here runs on the worker thread,
except :meth:`close`, which asks the worker to drain within a deadline and then stops it.
"""

from __future__ import annotations

import queue
import sys
import threading
import time
from collections.abc import Callable

from hooktrace._aggregate.process import StepProcessor
from hooktrace._aggregate.stats import RankStats
from hooktrace._aggregate.step_record import StepRecord
from hooktrace._record.buffer import StepBuffer
from hooktrace.export.base import Exporter

FLUSH_INTERVAL_S = 2.0


class Worker:
    """One daemon thread per agent."""

    def __init__(
        self,
        processor: StepProcessor,
        stats: RankStats,
        exporters: list[Exporter],
        *,
        queue_size: int,
        on_record: Callable[[StepRecord], None] | None = None,
    ) -> None:
        self.processor = processor
        self.stats = stats
        self.exporters = exporters
        self._queue: queue.Queue[StepBuffer | None] = queue.Queue(maxsize=queue_size)
        self._on_record = on_record
        self._thread = threading.Thread(target=self._run, name="hooktrace-worker", daemon=True)
        self._stop = threading.Event()
        self._idle = threading.Condition()
        self._pending = 0
        self.dropped_steps = 0
        self.process_errors = 0
        self.first_error: str | None = None
        self.started = False
        for exporter in exporters:
            stats.export_errors[exporter.name] += 0  # a zero series per exporter from the start

    def start(self) -> None:
        if not self.started:
            self.started = True
            self._thread.start()

    def submit(self, buf: StepBuffer) -> None:
        """Training thread: hand over a finished step, never blocking."""
        try:
            with self._idle:
                self._pending += 1
            self._queue.put_nowait(buf)
        except queue.Full:
            with self._idle:
                self._pending -= 1
            self.dropped_steps += 1

    def _run(self) -> None:
        last_flush = time.monotonic()
        while True:
            try:
                buf = self._queue.get(timeout=0.5)
            except queue.Empty:
                buf = None
            if buf is not None:
                self._handle(buf)
                with self._idle:
                    self._pending -= 1
                    self._idle.notify_all()
            if time.monotonic() - last_flush >= FLUSH_INTERVAL_S:
                self._flush()
                last_flush = time.monotonic()
            if self._stop.is_set() and self._queue.empty():
                return

    def _handle(self, buf: StepBuffer) -> None:
        try:
            record = self.processor.process(buf)
        except Exception as exc:
            self.process_errors += 1
            self.stats.export_errors["aggregate"] += 1
            if self.first_error is None:
                self.first_error = f"{type(exc).__name__}: {exc}"
                print(f"hooktrace: could not aggregate step {buf.number}: {self.first_error}", file=sys.stderr)
            return
        self.stats.dropped["steps"] = self.dropped_steps
        if buf.dropped_events:
            self.stats.dropped["module_events"] += buf.dropped_events
        self.stats.add(record)
        snapshot = self.stats.snapshot()
        for exporter in self.exporters:
            try:
                exporter.export_step(record, snapshot)
            except Exception:
                self.stats.export_errors[exporter.name] += 1
        if self._on_record is not None:
            self._on_record(record)

    def _flush(self) -> None:
        for exporter in self.exporters:
            try:
                exporter.flush()
            except Exception:
                self.stats.export_errors[exporter.name] += 1

    def wait_idle(self, timeout: float) -> bool:
        """Wait until every submitted step is processed (tests, close)."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._pending > 0:
                left = deadline - time.monotonic()
                if left <= 0 or not self._thread.is_alive():
                    return False
                self._idle.wait(left)
        return True

    def close(self, timeout: float = 10.0) -> None:
        """Drain (bounded), stop the thread, flush and close exporters."""
        if self.started:
            self.wait_idle(timeout)
            self._stop.set()
            self._thread.join(timeout=max(1.0, timeout / 2))
        else:
            while not self._queue.empty():
                buf = self._queue.get_nowait()
                if buf is not None:
                    self._handle(buf)
        for exporter in self.exporters:
            try:
                exporter.close()
            except Exception:
                self.stats.export_errors[exporter.name] += 1
