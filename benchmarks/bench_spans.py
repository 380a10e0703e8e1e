"""Worker-thread cost of turning one sampled step of a 1000-module model into OpenTelemetry spans.

Trains a real 1000-module model through an agent to capture its StepRecords, then times
``OtelExporter.export_step`` on them (span tree built, ended, queued for the batch processor)
with a span exporter that discards, so no network is in the figure. Prints one line.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Sequence

import torch
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from torch import nn

import hooktrace
from hooktrace._aggregate.step_record import StepRecord
from hooktrace.export.otel import OtelExporter


class _Discard(SpanExporter):
    def __init__(self) -> None:
        self.spans = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.spans += len(spans)
        return SpanExportResult.SUCCESS


class _Capture:
    name = "capture"

    def __init__(self) -> None:
        self.records: list[StepRecord] = []

    def start(self) -> None: ...

    def export_step(self, step: StepRecord) -> None:
        if step.spans and step.trace_id:
            self.records.append(step)

    def refresh(self, snapshot: object) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


def thousand_modules(blocks: int = 333) -> nn.Module:
    """1 + 333 x 3 = 1000 modules: blocks of Linear, ReLU under one Sequential each."""
    return nn.Sequential(*(nn.Sequential(nn.Linear(16, 16), nn.ReLU()) for _ in range(blocks)))


def capture(steps: int) -> tuple[list[StepRecord], hooktrace.Agent]:
    torch.manual_seed(0)
    model = thousand_modules()
    agent = hooktrace.Agent(out=tempfile.mkdtemp(prefix="hooktrace-bench-"), metrics_port=0, sample_every=1)
    grab = _Capture()
    agent.exporters.append(grab)
    agent.attach(model)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(8, 16)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        model(x).pow(2).mean().backward()
        opt.step()
    agent.close()
    return grab.records, agent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=12, help="sampled steps captured and timed")
    args = parser.parse_args()
    records, agent = capture(args.steps)
    modules = len(agent.recorder.table)
    sink = _Discard()
    exporter = OtelExporter(None, info=agent.info, span_exporter=sink, max_queue_size=1 << 20)
    exporter.start()
    times: list[float] = []
    for record in records:
        started = time.perf_counter()
        exporter.export_step(record)
        times.append(time.perf_counter() - started)
    exporter.close()
    per_step = statistics.median(times[2:] or times)
    spans = sink.spans / max(len(records), 1)
    print(
        f"spans: {modules} modules, {spans:.0f} spans per sampled step, worker cost {per_step * 1e3:.1f} ms per "
        f"sampled step ({per_step / max(spans, 1) * 1e6:.1f} us per span; median of {len(times)}), "
        f"dropped {exporter.dropped_spans}",
        flush=True,
    )


if __name__ == "__main__":
    main()
