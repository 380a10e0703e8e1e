"""The worker thread: drains step buffers, aggregates, feeds exporters.

Threading contract: the training thread calls :meth:`submit` (a bounded append that never
blocks; a full queue drops the step and counts it). Everything else here runs on the worker thread,
except :meth:`close`, which asks the worker to drain within a deadline and then stops it, and
:meth:`halt`, which the interpreter's exit calls for a worker nobody closed.
"""

from __future__ import annotations

import atexit
import math
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from typing import TypeVar

from hooktrace._aggregate.process import StepProcessor
from hooktrace._aggregate.stall import StallMeter
from hooktrace._aggregate.stats import RankStats
from hooktrace._aggregate.step_record import StepRecord
from hooktrace._record.buffer import StepBuffer
from hooktrace.export.base import Exporter

IDLE_FLUSH_INTERVAL_S = 2.0
"""With no new step, files and the metrics snapshot are still refreshed this often."""
T = TypeVar("T")

YIELD_AFTER_S = 0.001
"""In a burst, the worker hands the GIL to training after this much work (not after every step:
each hand-over costs both threads CPU; measured ~60 us per step on a 1.8 ms step)."""

POLL_INTERVAL_S = 0.2
"""The worker wakes this often and drains in a burst: fewer wake-ups cost training less (measured:
200 ms is cheaper than 50 ms on a 50 ms step, and the same on a 12 ms one)."""
FLUSH_INTERVAL_S = 0.5
"""While steps come in, files are flushed and the metrics snapshot rebuilt at most this often
(not per step: a write per poll costs the training thread; a copy per step is not free). A
killed (SIGKILL) run loses at most this much; signals flush everything."""
CHECKPOINT_INTERVAL_S = 10.0
"""summary.json is rewritten this often while the run goes on, so a killed run leaves one."""


HALT_TIMEOUT_S = 2.0
"""At interpreter exit, how long a worker nobody closed may take to finish the step in hand."""

_RUNNING: weakref.WeakSet[Worker] = weakref.WeakSet()


def _halt_running() -> None:
    """``atexit``: stop every worker nobody closed, before the interpreter finalizes. A daemon
    thread still inside a torch operation then (the worker reads norms, measures the saved-tensor
    cost) is killed in C++ code, which aborts the process: exit code 134 instead of the script's."""
    for worker in list(_RUNNING):
        worker.halt(HALT_TIMEOUT_S)


atexit.register(_halt_running)


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
        on_checkpoint: Callable[[], None] | None = None,
    ) -> None:
        self.processor = processor
        self.stats = stats
        self.exporters = exporters
        self._queue: deque[StepBuffer] = deque()
        self._queue_size = queue_size
        self._submitted = 0
        self._processed = 0
        self._on_record = on_record
        self._thread = threading.Thread(target=self._run, name="hooktrace-worker", daemon=True)
        self._stop = threading.Event()
        self._halting = False
        """Set at interpreter exit: finish the step in hand, then stop (no draining, no export)."""
        self._wake = threading.Event()
        self._urgent = threading.Event()
        self._urgent_done = threading.Event()
        self._on_checkpoint = on_checkpoint
        self._tasks: deque[Callable[[], None]] = deque()
        self.dropped_steps = 0
        self._cpu_ns = 0
        """The worker's CPU time not yet charged to a step, counted while training stood still
        (``StallMeter``): it competes with training for the GIL, so the reported overhead has it."""
        self.stall = StallMeter()
        """Follows the thread that submits steps (training); until the first step all CPU time counts."""
        self.first_error: str | None = None
        self.started = False
        for exporter in exporters:
            stats.export_errors[exporter.name] += 0  # a zero series per exporter from the start

    def start(self) -> None:
        if not self.started:
            self.started = True
            self._thread.start()
            _RUNNING.add(self)

    def submit(self, buf: StepBuffer) -> None:
        """Training thread: hand over a finished step. One append; never blocks, never wakes.

        The worker polls every ``POLL_INTERVAL_S`` and drains in a burst, so training and worker
        do not trade the GIL at every step. Beyond ``queue_size`` pending steps, steps are dropped.
        """
        self.stall.watch(threading.get_ident(), threading.get_native_id())  # the thread that trains
        if len(self._queue) >= self._queue_size:
            self.dropped_steps += 1
            return
        self._queue.append(buf)
        self._submitted += 1

    def _run(self) -> None:
        last_flush = -math.inf  # the first steps get a snapshot at once
        last_checkpoint = time.monotonic()
        while True:
            self._wake.wait(POLL_INTERVAL_S)
            self._wake.clear()
            if self._halting:
                return
            stall = self.stall
            stall.begin()
            while self._tasks:
                try:
                    self._tasks.popleft()()
                except Exception:
                    self.stats.export_errors["worker"] += 1
            drained = bool(self._queue)
            yield_at = time.perf_counter() + YIELD_AFTER_S
            while self._queue:
                if self._halting:
                    return
                self._handle(self._queue.popleft())
                self._processed += 1
                if time.perf_counter() >= yield_at:
                    self._cpu_ns += stall.end()
                    time.sleep(0)  # let the training thread take the GIL
                    stall.begin()
                    yield_at = time.perf_counter() + YIELD_AFTER_S
            now = time.monotonic()
            urgent = self._urgent.is_set()
            if urgent or now - last_flush >= (FLUSH_INTERVAL_S if drained else IDLE_FLUSH_INTERVAL_S):
                self._refresh_snapshot()
                self._flush()
                last_flush = now
            if urgent or now - last_checkpoint >= CHECKPOINT_INTERVAL_S:
                self._checkpoint()
                last_checkpoint = now
                if urgent:
                    self._urgent.clear()
                    self._urgent_done.set()
            self._cpu_ns += stall.end()
            if self._stop.is_set() and not self._queue:
                return

    def _checkpoint(self) -> None:
        if self._on_checkpoint is not None:
            try:
                self._on_checkpoint()
            except Exception:
                self.stats.export_errors["summary"] += 1

    def call(self, fn: Callable[[], T], timeout: float = 5.0) -> T:
        """Run ``fn`` on the worker thread (which owns the aggregates) and return its result;
        runs it here when the worker is not running."""
        if not self.started or not self._thread.is_alive() or threading.current_thread() is self._thread:
            return fn()
        box: list[T] = []
        done = threading.Event()

        def task() -> None:
            try:
                box.append(fn())
            finally:
                done.set()

        self._tasks.append(task)
        self._wake.set()
        if not done.wait(timeout) or not box:
            raise TimeoutError("the hooktrace worker did not answer in time")
        return box[0]

    def flush_now(self, timeout: float) -> bool:
        """Any thread: process what is queued, flush files and write the summary, now (signals)."""
        if not self.started or not self._thread.is_alive():
            return False
        self._urgent_done.clear()
        self._urgent.set()
        self._wake.set()
        return self._urgent_done.wait(timeout)

    def _handle(self, buf: StepBuffer) -> None:
        """Never lets an exception end the worker thread: a step that fails is counted."""
        try:
            self._handle_step(buf)
        except Exception as exc:
            self._count_error(buf, exc)

    def _count_error(self, buf: StepBuffer, exc: BaseException) -> None:
        self.stats.export_errors["aggregate"] += 1
        if self.first_error is None:
            self.first_error = f"{type(exc).__name__}: {exc}"
            print(f"hooktrace: could not aggregate step {buf.number}: {self.first_error}", file=sys.stderr)

    def _handle_step(self, buf: StepBuffer) -> None:
        record = self.processor.process(buf)
        record.overhead_s += self._cpu_ns / 1e9
        self._cpu_ns = 0
        if buf.dropped_events:
            self.stats.dropped["module_events"] += buf.dropped_events
        self.stats.add(record)
        for exporter in self.exporters:
            try:
                exporter.export_step(record)
            except Exception:
                self.stats.export_errors[exporter.name] += 1
        if self._on_record is not None:
            self._on_record(record)

    def sync_drops(self) -> None:
        """Copy the count of steps the training thread dropped into the stats (worker thread, or
        after the worker stopped): before every snapshot and every summary. Zero too: a
        ``hooktrace_dropped_total{what="steps"}`` series exists from the start."""
        self.stats.dropped["steps"] = self.dropped_steps

    def _refresh_snapshot(self) -> None:
        """Build a fresh snapshot and hand it to every exporter (throttled: copying is not free)."""
        self.sync_drops()
        snapshot = self.stats.snapshot()
        for exporter in self.exporters:
            try:
                exporter.refresh(snapshot)
            except Exception:
                self.stats.export_errors[exporter.name] += 1

    def _flush(self) -> None:
        for exporter in self.exporters:
            try:
                exporter.flush()
            except Exception:
                self.stats.export_errors[exporter.name] += 1

    def wait_idle(self, timeout: float) -> bool:
        """Wait until every submitted step is processed (tests, close): wakes the worker now."""
        deadline = time.monotonic() + timeout
        self._wake.set()
        while self._processed < self._submitted:
            if time.monotonic() > deadline or not self._thread.is_alive():
                return False
            time.sleep(0.01)
        return True

    def halt(self, timeout: float) -> None:
        """Interpreter exit, for a worker nobody closed: let it finish the step in hand and stop
        (waiting at most ``timeout``), then flush the files it wrote so far. Any thread."""
        _RUNNING.discard(self)
        if not self.started or not self._thread.is_alive() or threading.current_thread() is self._thread:
            return
        self._halting = True
        self._wake.set()
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self._flush()

    def close(self, timeout: float = 10.0) -> None:
        """Drain (bounded), stop the thread, flush and close exporters."""
        _RUNNING.discard(self)
        if self.started:
            self.wait_idle(timeout)
            self._stop.set()
            self._wake.set()
            self._thread.join(timeout=max(1.0, timeout / 2))
        else:
            while self._queue:
                self._handle(self._queue.popleft())
        if self.stats.steps:
            self._refresh_snapshot()
        for exporter in self.exporters:
            try:
                exporter.close()
            except Exception:
                self.stats.export_errors[exporter.name] += 1
