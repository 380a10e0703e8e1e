"""`hooktrace run --otlp-endpoint` against a real OTLP/HTTP receiver on loopback, and against none.

The receiver decodes ``ExportTraceServiceRequest`` protobufs as a collector would; the training
script is the unmodified ``examples/train_mlp.py`` run through the CLI in a subprocess.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

from tests.conftest import read_steps, retry_gloo_abort
from tests.servers import REPO_ROOT, free_port

MLP = REPO_ROOT / "examples" / "train_mlp.py"
DDP = REPO_ROOT / "examples" / "train_ddp.py"
RUN_TIMEOUT_S = 120


@dataclass
class Received:
    """One span as the collector saw it, with its resource."""

    name: str
    trace_id: str
    span_id: str
    parent_id: str
    start: int
    end: int
    attributes: dict[str, Any]
    resource: dict[str, Any]
    events: list[tuple[str, dict[str, Any]]]


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


def _attrs(items: Any) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in items}


class OtlpReceiver:
    """A minimal OTLP/HTTP traces endpoint: ``POST /v1/traces`` with a protobuf body."""

    def __init__(self) -> None:
        self.spans: list[Received] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path != "/v1/traces" or self.headers.get("Content-Type") != "application/x-protobuf":
                    self.send_error(404)
                    return
                request = ExportTraceServiceRequest()
                request.ParseFromString(body)
                receiver.add(request)
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format: str, *args: Any) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def add(self, request: ExportTraceServiceRequest) -> None:
        with self._lock:
            for rs in request.resource_spans:
                resource = _attrs(rs.resource.attributes)
                for ss in rs.scope_spans:
                    for span in ss.spans:
                        self.spans.append(
                            Received(
                                name=span.name,
                                trace_id=span.trace_id.hex(),
                                span_id=span.span_id.hex(),
                                parent_id=span.parent_span_id.hex(),
                                start=span.start_time_unix_nano,
                                end=span.end_time_unix_nano,
                                attributes=_attrs(span.attributes),
                                resource=resource,
                                events=[(e.name, _attrs(e.attributes)) for e in span.events],
                            )
                        )

    def __enter__(self) -> OtlpReceiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def _hooktrace_run(
    out: Path, *args: str, env: dict[str, str] | None = None
) -> tuple[subprocess.CompletedProcess[str], float]:
    cmd = [sys.executable, "-m", "hooktrace.cli.main", "run", "--metrics-port", "0", "--out", str(out), *args]
    started = time.monotonic()
    proc = retry_gloo_abort(
        lambda: subprocess.run(
            cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, env={**os.environ, **(env or {})}
        )
    )
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc, elapsed


def test_hooktrace_run_sends_each_sampled_step_as_one_nested_trace_to_an_otlp_collector(tmp_path: Path) -> None:
    with OtlpReceiver() as collector:
        _hooktrace_run(
            tmp_path,
            *["--run-id", "itest", "--sample-every", "5", "--otlp-endpoint"],
            collector.url,
            str(MLP),
            "--steps",
            "20",
        )
    spans = collector.spans
    assert spans, "the collector received nothing"
    steps = read_steps(tmp_path)
    sampled = {s["step"]: s["trace_id"] for s in steps if s.get("trace_id")}
    assert sorted(sampled) == [1, 6, 11, 16]
    assert {s.name for s in spans if s.name.startswith("step ")} == {f"step {n}" for n in sampled}
    resource = spans[0].resource
    assert resource["service.name"] == "hooktrace" and resource["service.instance.id"] == "itest/rank0"
    assert resource["hooktrace.run_id"] == "itest" and resource["host.name"]
    assert (resource["hooktrace.rank"], resource["hooktrace.local_rank"], resource["hooktrace.world_size"]) == (0, 0, 1)
    by_id = {s.span_id: s for s in spans}
    for step, trace_id in sampled.items():
        trace = [s for s in spans if s.trace_id == trace_id]
        assert {s.attributes["hooktrace.step"] for s in trace} == {step}
        names = {s.name: s for s in trace}
        assert {"rank 0", "forward", "backward", "optimizer", "forward Sequential", "backward 4"} <= set(names)
        assert names[f"step {step}"].parent_id == ""
        assert by_id[names["rank 0"].parent_id].name == f"step {step}"
        assert by_id[names["forward"].parent_id].name == "rank 0"
        assert by_id[names["forward Sequential"].parent_id].name == "forward"
        for child in ("0", "1", "2", "3", "4"):
            span = names[f"forward {child}"]
            assert by_id[span.parent_id].name == "forward Sequential"
            assert span.attributes["hooktrace.module"] == child and span.attributes["hooktrace.phase"] == "forward"
        assert names["forward 1"].attributes["hooktrace.module_type"] == "ReLU"
        for span in trace:
            if span.parent_id:
                parent = by_id[span.parent_id]
                assert parent.start <= span.start <= span.end <= parent.end, (span.name, parent.name)


def _loss_lines(stdout: str) -> list[str]:
    return re.findall(r"^step \d+ loss \S+$", stdout, flags=re.M)


def test_a_collector_that_is_down_leaves_training_unchanged_and_counts_the_dropped_spans(tmp_path: Path) -> None:
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    base, base_s = _hooktrace_run(tmp_path / "plain", str(MLP), "--steps", "100")
    down, down_s = _hooktrace_run(tmp_path / "down", "--otlp-endpoint", closed, str(MLP), "--steps", "100")
    assert _loss_lines(down.stdout) == _loss_lines(base.stdout) and len(_loss_lines(base.stdout)) == 2
    assert down_s < base_s + 8.0, (down_s, base_s)
    summary = json.loads((tmp_path / "down" / "summary.json").read_text(encoding="utf-8"))
    sampled = sum(1 for s in read_steps(tmp_path / "down") if s.get("trace_id"))
    assert summary["ranks"][0]["dropped"]["spans"] >= sampled * 10  # every span of every sampled step
    assert down.stderr.count("hooktrace: could not send spans to") == 1


def test_two_ddp_ranks_send_one_trace_per_step_with_both_rank_spans_under_one_root(tmp_path: Path) -> None:
    with OtlpReceiver() as collector:
        _hooktrace_run(
            tmp_path,
            *["--nproc-per-node", "2", "--master-port", str(free_port()), "--sample-every", "5", "--otlp-endpoint"],
            collector.url,
            str(DDP),
            "--steps",
            "10",
        )
    spans = collector.spans
    roots = [s for s in spans if s.name.startswith("step ")]
    assert roots and {s.resource["hooktrace.rank"] for s in roots} == {0}
    for root in roots:
        ranks = [s for s in spans if s.trace_id == root.trace_id and s.name.startswith("rank ")]
        assert sorted(s.name for s in ranks) == ["rank 0", "rank 1"]
        assert {s.parent_id for s in ranks} == {root.span_id}
        assert {s.resource["service.instance.id"].rsplit("/", 1)[1] for s in ranks} == {"rank0", "rank1"}
