"""``<out>/rank<r>.trace.json``: Chrome trace events of the sampled steps; opens in Perfetto.

Written as the JSON Array Format, streamed as steps arrive, closed with ``]`` at exit. The
format allows a missing ``]``, so Perfetto and chrome://tracing also open the file of a killed
run. Events: ``step {n}`` > phases > ``forward {module}`` / ``backward {module}``, on one track
per rank so they nest by time; timestamps are wall-clock microseconds, so ranks line up.

A step with an event (``grad_spike``, ``nonfinite``, ``grad_clip``, ``amp_skip``, ``hook_error``)
is written too, sampled or not: its step and phase slices (no module slices on an unsampled
step: nothing timed them) and one instant event per event, at the end of the step.
"""

from __future__ import annotations

import json
import os
from typing import IO, Any

from hooktrace._aggregate.snapshot import MetricsSnapshot
from hooktrace._aggregate.stats import RankStats
from hooktrace._aggregate.step_record import StepRecord

_encode = json.JSONEncoder(separators=(",", ":")).encode
"""One encoder for every event: ``json.dumps`` with any option builds a new one per call."""


class PerfettoExporter:
    """Streams trace events; stops (and counts) beyond ``max_events``."""

    name = "perfetto"

    def __init__(self, path: str, rank: int, max_events: int, run_id: str, stats: RankStats | None = None) -> None:
        self.path = path
        self.rank = rank
        self.max_events = max_events
        self.wall_offset_ns = 0
        """Host monotonic clock -> wall clock, from each step record (``wall_start_ns``)."""
        self.run_id = run_id
        self.written = 0
        self.dropped = 0
        self._stats = stats
        """Where drops are reported (``hooktrace_dropped_total{what="trace_events"}``), as OTel does."""
        if stats is not None:
            stats.dropped["trace_events"] += 0  # the series exists from the start, for increase()
        self._pending: list[str] | None = None
        self._quoted: dict[tuple[int, str], tuple[str, str]] = {}
        """(module index, phase) -> the fixed JSON text around a span event's numbers."""
        self._file: IO[str] | None = None

    def start(self) -> None:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        self._file = open(self.path, "w", encoding="utf-8")  # noqa: SIM115 - lives as long as the run
        self._file.write("[\n")
        self._write(
            {
                "name": "process_name",
                "ph": "M",
                "pid": self.rank,
                "tid": 0,
                "args": {"name": f"rank {self.rank} ({self.run_id})"},
            }
        )
        self._write(
            {"name": "process_sort_index", "ph": "M", "pid": self.rank, "tid": 0, "args": {"sort_index": self.rank}}
        )
        self._write({"name": "thread_name", "ph": "M", "pid": self.rank, "tid": 0, "args": {"name": "training"}})

    def _us(self, ns: int) -> float:
        return (ns + self.wall_offset_ns) / 1000.0

    def _write(self, event: dict[str, Any]) -> None:
        self._write_line(_encode(event) + ",\n")

    def _write_line(self, line: str) -> None:
        """One event, already a line of JSON."""
        if self._file is None:
            return
        if self.written >= self.max_events:
            self.dropped += 1
            if self._stats is not None:
                self._stats.dropped["trace_events"] = self.dropped  # worker thread, like all of this
            return
        if self._pending is not None:
            self._pending.append(line)
        else:
            self._file.write(line)
        self.written += 1

    def _complete(self, name: str, cat: str, start: int, end: int, args: dict[str, Any]) -> None:
        self._write(
            {
                "name": name,
                "cat": cat,
                "ph": "X",
                "ts": self._us(start),
                "dur": max(0, end - start) / 1000.0,
                "pid": self.rank,
                "tid": 0,
                "args": args,
            }
        )

    def export_step(self, step: StepRecord) -> None:
        if not step.spans and not step.events:
            return
        self._pending = []
        try:
            self._export(step)
        finally:
            if self._file is not None and self._pending:
                self._file.write("".join(self._pending))  # one write per step: whole lines only
            self._pending = None

    def _export(self, step: StepRecord) -> None:
        self.wall_offset_ns = step.wall_start_ns - step.start_ns
        self._complete(
            f"step {step.step}",
            "step",
            step.start_ns,
            step.end_ns,
            {
                "step": step.step,
                "rank": step.rank,
                "grad_norm": step.grad_norm,
                "trace_id": step.trace_id,
                "sampled": step.sampled,
            },
        )
        for phase, start, end in step.phase_spans:
            self._complete(phase, "phase", start, end, {"step": step.step, "phase": phase})
        if step.spans:
            self._write_lines(self._span_lines(step))
        for event in step.events:
            self._write(
                {
                    "name": event.kind,
                    "cat": "event",
                    "ph": "i",
                    "s": "p",
                    "ts": self._us(step.end_ns),
                    "pid": self.rank,
                    "tid": 0,
                    "args": event.as_json(),
                }
            )

    def _span_lines(self, step: StepRecord) -> list[str]:
        """One line per module span, from text made once per module and phase (the per-span
        work is three numbers: the sampled step's cost on the worker is mostly here)."""
        quoted = self._quoted
        offset = self.wall_offset_ns
        lines: list[str] = []
        for span in sorted(step.spans, key=lambda s: (s.start_ns, -s.end_ns)):
            parts = quoted.get((span.index, span.phase))
            if parts is None:  # JSON-escaped once per module and phase, then reused
                parts = quoted[(span.index, span.phase)] = (
                    f'{{"name":{_encode(f"{span.phase} {span.module}")},"cat":{_encode(span.phase)},"ph":"X","ts":',
                    f',"pid":{self.rank},"tid":0,"args":{{"module":{_encode(span.module)},'
                    f'"module_type":{_encode(span.module_type)},"self_us":',
                )
            ts, dur = (span.start_ns + offset) / 1000.0, max(0, span.end_ns - span.start_ns) / 1000.0
            lines.append(f'{parts[0]}{ts!r},"dur":{dur!r}{parts[1]}{span.self_ns / 1000.0!r}}}}},\n')
        return lines

    def _write_lines(self, lines: list[str]) -> None:
        """``_write_line`` of many lines at once: the same budget and drop count."""
        if self._file is None:
            return
        room = max(0, self.max_events - self.written)
        if len(lines) > room:
            self.dropped += len(lines) - room
            if self._stats is not None:
                self._stats.dropped["trace_events"] = self.dropped
            lines = lines[:room]
        if self._pending is not None:
            self._pending.extend(lines)
        else:
            self._file.write("".join(lines))
        self.written += len(lines)

    def refresh(self, snapshot: MetricsSnapshot) -> None:
        return None

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        if self._file is None:
            return
        self._file.write(
            json.dumps(
                {
                    "name": "hooktrace",
                    "ph": "M",
                    "pid": self.rank,
                    "tid": 0,
                    "args": {"events": self.written, "dropped": self.dropped},
                }
            )
        )
        self._file.write("\n]\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
