"""OpenTelemetry spans of sampled steps (DESIGN §5): names, nesting, times, ids, events, drops.

Records come from a real tiny model trained through an agent; spans go to an in-memory exporter
put in place of the OTLP one before the agent starts.
"""

from __future__ import annotations

import dataclasses
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from torch import nn

import hooktrace
from hooktrace._aggregate.snapshot import RankInfo
from hooktrace._aggregate.stats import RankStats
from hooktrace._aggregate.step_record import StepEvent, StepRecord
from hooktrace.errors import ConfigError, HooktraceError
from hooktrace.export import otel
from hooktrace.export.otel import OtelExporter, resolve_endpoint
from hooktrace.export.otel_spans import root_span_id
from tests.conftest import RecordCapture

NOWHERE = "http://127.0.0.1:9"
"""An endpoint that is never contacted: tests swap in an in-memory exporter before start."""


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        OrderedDict(
            inp=nn.Linear(8, 16),
            body=nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Sequential(nn.Linear(16, 16), nn.Tanh())),
            head=nn.Linear(16, 1),
        )
    )


def _run(
    tmp_path: Path, steps: int = 4, nan_at: int = 0, **options: Any
) -> tuple[hooktrace.Agent, list[ReadableSpan], list[StepRecord]]:
    options = {"out": str(tmp_path), "metrics_port": 0, "sample_every": 2, "otlp_endpoint": NOWHERE, **options}
    agent = hooktrace.Agent(**options)
    exporter = next(e for e in agent.exporters if isinstance(e, OtelExporter))
    memory = InMemorySpanExporter()
    exporter.span_exporter = memory
    capture = RecordCapture()
    agent.exporters.append(capture)
    model = _model()
    agent.attach(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for step in range(1, steps + 1):
        x = torch.randn(4, 8)
        if step == nan_at:
            x[0, 0] = float("nan")
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    agent.close()
    return agent, list(memory.get_finished_spans()), capture.records


def _attrs(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


def _by_id(spans: Sequence[ReadableSpan]) -> dict[int, ReadableSpan]:
    return {s.context.span_id: s for s in spans}


def _parent(span: ReadableSpan, index: dict[int, ReadableSpan]) -> ReadableSpan | None:
    return index.get(span.parent.span_id) if span.parent is not None else None


def _feed(records: Sequence[StepRecord], **options: Any) -> tuple[OtelExporter, list[ReadableSpan], RankStats]:
    """Run captured records through a stand-alone exporter (another rank, other options)."""
    info = options.pop("info", RankInfo("run", 0, 0, 1, "node", "v", "t", "cpu"))
    memory = options.pop("span_exporter", InMemorySpanExporter())
    stats = RankStats(info)
    exporter = OtelExporter(NOWHERE, info=info, span_exporter=memory, stats=stats, **options)
    exporter.start()
    for record in records:
        exporter.export_step(dataclasses.replace(record, rank=info.rank))
    exporter.close()
    spans = list(memory.get_finished_spans()) if isinstance(memory, InMemorySpanExporter) else []
    return exporter, spans, stats


def test_only_sampled_steps_become_traces_and_each_trace_id_is_the_agents(tmp_path: Path) -> None:
    agent, spans, records = _run(tmp_path, steps=5)
    sampled = [r for r in records if r.spans and r.trace_id]
    assert [r.step for r in sampled] == [1, 3, 5] and len(records) == 5
    assert {s.attributes["hooktrace.step"] for s in spans if s.attributes} == {1, 3, 5}
    for record in sampled:
        trace_id = int(agent.trace_id(record.step), 16)
        roots = [s for s in spans if s.name == f"step {record.step}"]
        assert len(roots) == 1 and roots[0].parent is None
        assert roots[0].context.trace_id == trace_id
        assert roots[0].context.span_id == root_span_id(agent.trace_id(record.step))
        assert {s.context.trace_id for s in spans if _attrs(s)["hooktrace.step"] == record.step} == {trace_id}


def test_module_spans_nest_exactly_like_named_modules_under_their_phase(tmp_path: Path) -> None:
    _, spans, _ = _run(tmp_path, steps=1)
    index = _by_id(spans)
    names = {name for name, _ in _model().named_modules() if name}
    assert {s.name for s in spans} == (
        {"step 1", "rank 0", "forward", "backward", "optimizer"}
        | {f"{phase} {module}" for phase in ("forward", "backward") for module in names | {"Sequential"}}
    )
    assert _parent(next(s for s in spans if s.name == "rank 0"), index).name == "step 1"  # type: ignore[union-attr]
    for span in spans:
        attrs = span.attributes or {}
        if "hooktrace.module" not in attrs:
            continue
        phase, module = str(attrs["hooktrace.phase"]), str(attrs["hooktrace.module"])
        parent = _parent(span, index)
        assert parent is not None
        if module == "Sequential":
            assert (parent.name, _parent(parent, index).name) == (phase, "rank 0")  # type: ignore[union-attr]
        else:
            expected = module.rsplit(".", 1)[0] if "." in module else "Sequential"
            assert parent.name == f"{phase} {expected}"


def test_every_child_lies_inside_its_parent(tmp_path: Path) -> None:
    _, spans, records = _run(tmp_path, steps=3)
    index = _by_id(spans)
    for span in spans:
        parent = _parent(span, index)
        assert span.start_time is not None and span.end_time is not None and span.start_time <= span.end_time
        if parent is not None:
            assert parent.start_time <= span.start_time and span.end_time <= parent.end_time  # type: ignore[operator]
    first = next(r for r in records if r.step == 1)
    root = next(s for s in spans if s.name == "step 1")
    wall_end = first.wall_start_ns + first.end_ns - first.start_ns
    assert (root.start_time, root.end_time) == (first.wall_start_ns, wall_end)


def test_spans_carry_step_rank_phase_module_and_module_type(tmp_path: Path) -> None:
    _, spans, _ = _run(tmp_path, steps=1)
    head = next(s for s in spans if s.name == "backward head")
    assert dict(head.attributes or {}) == {
        "hooktrace.step": 1,
        "hooktrace.rank": 0,
        "hooktrace.phase": "backward",
        "hooktrace.module": "head",
        "hooktrace.module_type": "Linear",
    }
    phase = next(s for s in spans if s.name == "optimizer")
    assert dict(phase.attributes or {}) == {"hooktrace.step": 1, "hooktrace.rank": 0, "hooktrace.phase": "optimizer"}


def test_the_resource_names_run_and_rank_and_lets_otel_variables_rename_the_service(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_SERVICE_NAME", "trainer")
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=test,hooktrace.rank=99")
    agent, spans, _ = _run(tmp_path, steps=1, run_id="r1")
    attrs = dict(spans[0].resource.attributes)
    assert attrs["service.name"] == "trainer" and attrs["deployment.environment"] == "test"
    assert attrs["service.instance.id"] == "r1/rank0"
    assert (attrs["hooktrace.run_id"], attrs["hooktrace.rank"], attrs["hooktrace.local_rank"]) == ("r1", 0, 0)
    assert (attrs["hooktrace.world_size"], attrs["host.name"]) == (1, agent.info.node)
    monkeypatch.delenv("OTEL_SERVICE_NAME")
    assert OtelExporter(NOWHERE, info=agent.info).resource().attributes["service.name"] == "hooktrace"


def test_depth_cuts_module_spans_but_watched_modules_keep_their_detail(tmp_path: Path) -> None:
    _, spans, _ = _run(tmp_path, steps=1, depth=1, watch=("body.2.0",))
    modules = {_attrs(s)["hooktrace.module"] for s in spans if s.name.startswith(("forward ", "backward "))}
    assert modules == {"Sequential", "inp", "body", "head", "body.2.0"}
    index = _by_id(spans)
    watched = next(s for s in spans if s.name == "forward body.2.0")
    assert _parent(watched, index).name == "forward body"  # type: ignore[union-attr]


def test_two_ranks_of_a_step_share_its_trace_and_hang_under_rank_0s_root(tmp_path: Path) -> None:
    _, spans0, records = _run(tmp_path, steps=3, run_id="job")
    info1 = RankInfo("job", 1, 1, 2, "node1", "v", "t", "cpu")
    _, spans1, _ = _feed(records, info=info1)
    assert not [s for s in spans1 if s.name.startswith("step ")]  # only rank 0 emits the root
    for step in (1, 3):
        root = next(s for s in spans0 if s.name == f"step {step}")
        rank1 = next(s for s in spans1 if s.name == "rank 1" and s.attributes["hooktrace.step"] == step)  # type: ignore[index]
        assert rank1.context.trace_id == root.context.trace_id
        assert rank1.parent is not None and rank1.parent.span_id == root.context.span_id
        assert rank1.attributes["hooktrace.rank"] == 1  # type: ignore[index]


def test_a_restart_gives_the_same_step_another_trace_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = hooktrace.Agent(run_id="job", metrics_port=0, write_files=False)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    again = hooktrace.Agent(run_id="job", metrics_port=0, write_files=False)
    assert first.trace_id(1) != again.trace_id(1) and first.trace_id(1) == first.trace_id(1)
    _, spans, _ = _run(tmp_path, steps=1, run_id="job")
    assert {s.context.trace_id for s in spans} == {int(again.trace_id(1), 16)}
    assert spans[0].resource.attributes["hooktrace.restart_count"] == 1


def test_trace_ranks_choose_which_ranks_emit_detail_and_rank_0_always_emits_the_root(tmp_path: Path) -> None:
    _, _, records = _run(tmp_path, steps=1)
    rank0 = RankInfo("job", 0, 0, 2, "n", "v", "t", "cpu")
    _, spans, _ = _feed(records, info=rank0, trace_ranks="1")
    assert [s.name for s in spans] == ["step 1"]
    _, spans, _ = _feed(records, info=dataclasses.replace(rank0, rank=1), trace_ranks="0")
    assert spans == []
    big = dataclasses.replace(rank0, rank=5, local_rank=5, world_size=16)  # not its node's first rank
    assert not OtelExporter(NOWHERE, info=big).traces_this_rank()
    slow = OtelExporter(NOWHERE, info=big)
    slow.slowest_rank = 5
    assert slow.traces_this_rank()
    assert OtelExporter(NOWHERE, info=dataclasses.replace(big, world_size=8)).traces_this_rank()


def test_trace_ranks_accepts_auto_or_a_rank_list_and_names_flag_and_variable_when_wrong() -> None:
    assert hooktrace.Config.resolve({}, environ={}).trace_ranks == "auto"
    assert hooktrace.Config.resolve({}, environ={"HOOKTRACE_TRACE_RANKS": "3, 0"}).trace_ranks == "0,3"
    assert hooktrace.Config.resolve({"trace_ranks": [2, 1]}, environ={}).trace_ranks == "1,2"
    with pytest.raises(ConfigError, match=r"--trace-ranks / HOOKTRACE_TRACE_RANKS must be auto, all or a comma list"):
        hooktrace.Config.resolve({}, environ={"HOOKTRACE_TRACE_RANKS": "first"})


def test_nonfinite_spike_and_clip_events_land_on_the_span_of_their_module_or_phase(tmp_path: Path) -> None:
    _, spans, records = _run(tmp_path, steps=3, nan_at=3)
    nonfinite = [(s.name, e) for s in spans for e in s.events if e.name == "nonfinite"]
    assert len(nonfinite) == 1
    name, event = nonfinite[0]
    assert event.attributes is not None and event.attributes["hooktrace.phase"] == "input"  # the batch held the NaN
    assert name == f"forward {event.attributes['hooktrace.first_module']}"  # the root's forward span
    record = dataclasses.replace(
        next(r for r in records if r.step == 1),
        events=[
            StepEvent("grad_spike", "body.0", "backward", 812.0, {"ratio": 40.0}),
            StepEvent("grad_spike", "__total__", "backward", 900.0, {"ratio": 41.0}),
            StepEvent("grad_clip", "head", "optimizer", 1.0),
        ],
    )
    _, spans, _ = _feed([record])
    events = {(s.name, e.name, e.attributes["hooktrace.value"]) for s in spans for e in s.events}  # type: ignore[index]
    # a module's event on its module span; the total's and the optimizer's on their step phase
    assert events == {
        ("backward body.0", "grad_spike", 812.0),
        ("backward", "grad_spike", 900.0),
        ("optimizer", "grad_clip", 1.0),
    }
    spike = next(e for s in spans for e in s.events if s.name == "backward body.0")
    owner = next(s for s in spans if s.name == "backward body.0")
    assert owner.start_time <= spike.timestamp <= owner.end_time  # type: ignore[operator]
    assert spike.attributes["hooktrace.ratio"] == 40.0  # type: ignore[index]


def test_span_ids_never_draw_from_the_training_rng(tmp_path: Path) -> None:
    random.seed(1234)
    state = random.getstate()
    _run(tmp_path, steps=3)
    assert random.getstate() == state


class _Stuck(SpanExporter):
    """A collector that hangs until shut down, like an OTLP exporter retrying a dead endpoint."""

    def __init__(self) -> None:
        self.released = threading.Event()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.released.wait(30)
        return SpanExportResult.FAILURE

    def shutdown(self) -> None:
        self.released.set()


class _Refusing(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        raise ConnectionRefusedError("no collector")


def test_a_full_queue_drops_spans_at_once_and_counts_them_in_the_rank_stats(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, all_spans, records = _run(tmp_path, steps=1)
    monkeypatch.setattr(otel, "CLOSE_TIMEOUT_S", 0.2)
    info = RankInfo("run", 0, 0, 1, "node", "v", "t", "cpu")
    stats = RankStats(info)
    exporter = OtelExporter(NOWHERE, info=info, span_exporter=_Stuck(), stats=stats, max_queue_size=4)
    exporter.start()
    started = time.monotonic()
    exporter.export_step(records[0])
    assert time.monotonic() - started < 0.5  # the worker never waits for the collector
    assert stats.dropped["spans"] == exporter.dropped_spans >= len(all_spans) - 2 * 4
    exporter.close()
    assert stats.dropped["spans"] == len(all_spans)


def test_a_failing_collector_counts_every_span_as_dropped_and_warns_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, all_spans, records = _run(tmp_path, steps=3)
    _, _, stats = _feed(records, span_exporter=_Refusing())
    assert stats.dropped["spans"] == len(all_spans)
    assert capsys.readouterr().err.count("hooktrace: could not send spans to") == 1


def test_close_gives_up_on_a_hung_collector_in_bounded_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, all_spans, records = _run(tmp_path, steps=1)
    monkeypatch.setattr(otel, "CLOSE_TIMEOUT_S", 0.5)
    started = time.monotonic()
    _, _, stats = _feed(records, span_exporter=_Stuck())
    assert time.monotonic() - started < 2.0
    assert stats.dropped["spans"] == len(all_spans)


@pytest.mark.parametrize(
    ("endpoint", "expected"),
    [
        ("http://collector:4318", ("http/protobuf", "http://collector:4318/v1/traces")),
        ("http://collector:4318/", ("http/protobuf", "http://collector:4318/v1/traces")),
        ("https://gw/otlp", ("http/protobuf", "https://gw/otlp/v1/traces")),
        ("http://collector:4318/v1/traces", ("http/protobuf", "http://collector:4318/v1/traces")),
        ("grpc://collector:4317", ("grpc", "http://collector:4317")),
        ("grpcs://collector:4317", ("grpc", "https://collector:4317")),
    ],
)
def test_a_base_endpoint_gets_v1_traces_like_the_sdk_and_grpc_urls_choose_grpc(
    endpoint: str, expected: tuple[str, str]
) -> None:
    assert resolve_endpoint(endpoint, {}) == expected


def test_the_otel_protocol_variable_can_choose_grpc_and_grpc_without_the_extra_says_how_to_get_it() -> None:
    assert resolve_endpoint("http://c:4317", {"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}) == ("grpc", "http://c:4317")
    try:
        import opentelemetry.exporter.otlp.proto.grpc  # noqa: F401
    except ImportError:
        with pytest.raises(HooktraceError, match=r"pip install 'hooktrace\[grpc\]'"):
            otel.make_span_exporter("grpc://127.0.0.1:4317", {})
    with pytest.raises(HooktraceError, match="is not a URL"):
        otel.make_span_exporter("collector:4318", {})


def test_auto_trace_ranks_beyond_eight_learns_the_slowest_rank_from_the_rank_summaries(tmp_path: Path) -> None:
    import json as _json

    from hooktrace.summary_builder import slowest_rank

    for rank, busy in [(0, 0.10), (5, 0.31), (11, 0.12)]:
        part = {"run_id": "r", "ranks": [{"rank": rank, "busy_time_s": busy, "step_time_s": 0.4}]}
        (tmp_path / f"rank{rank}.summary.json").write_text(_json.dumps(part))
    (tmp_path / "rank7.summary.json").write_text("{not json")  # a part being written is skipped
    assert slowest_rank(str(tmp_path)) == 5


def test_an_unsampled_step_with_a_nan_sends_its_step_rank_and_phase_spans_with_the_event(tmp_path: Path) -> None:
    agent, spans, records = _run(tmp_path, steps=4, nan_at=3, sample_every=100)
    assert [r.step for r in records if r.sampled] == [1] and records[2].events
    assert {_attrs(s)["hooktrace.step"] for s in spans} == {1, 3, 4}  # step 2: unsampled, no event, no trace
    step3 = [s for s in spans if _attrs(s)["hooktrace.step"] == 3]
    names = {s.name for s in step3}
    assert {"step 3", "rank 0", "forward", "backward", "optimizer"} <= names
    assert not [n for n in names if n.startswith(("forward ", "backward "))]  # no module tree: nothing timed it
    trace_id = agent.trace_id(3)
    assert {s.context.trace_id for s in step3} == {int(trace_id, 16)}
    root = next(s for s in step3 if s.name == "step 3")
    assert root.parent is None and root.context.span_id == root_span_id(trace_id)
    rank = next(s for s in step3 if s.name == "rank 0")
    assert rank.parent is not None and rank.parent.span_id == root.context.span_id
    assert _attrs(rank)["hooktrace.sampled"] is False
    [(owner, event)] = [(s, e) for s in step3 for e in s.events]
    assert (owner.name, event.name) == ("forward", "nonfinite")  # the batch held it: the forward phase
    assert event.attributes is not None and event.attributes["hooktrace.phase"] == "input"
    assert event.attributes["hooktrace.module"] == "Sequential"
    assert owner.start_time <= event.timestamp <= owner.end_time  # type: ignore[operator]


def test_an_unsampled_spike_step_shares_one_trace_across_ranks_with_the_agents_trace_id(tmp_path: Path) -> None:
    _, _, records = _run(tmp_path, steps=2, sample_every=100)
    unsampled = dataclasses.replace(
        records[1],
        events=[
            StepEvent("grad_spike", "__total__", "backward", 900.0, {"ratio": 41.0}),
            StepEvent("grad_spike", "body.0", "backward", 812.0, {"ratio": 40.0}),
        ],
    )
    assert not unsampled.sampled and unsampled.trace_id is None
    _, spans0, _ = _feed([unsampled])
    _, spans1, _ = _feed([unsampled], info=RankInfo("run", 1, 1, 2, "node1", "v", "t", "cpu"))
    trace_id = hooktrace.Agent(run_id="run", metrics_port=0, write_files=False).trace_id(2)
    root = next(s for s in spans0 if s.name == "step 2")
    rank1 = next(s for s in spans1 if s.name == "rank 1")
    assert root.context.trace_id == rank1.context.trace_id == int(trace_id, 16)
    assert rank1.parent is not None and rank1.parent.span_id == root.context.span_id == root_span_id(trace_id)
    for spans in (spans0, spans1):
        events = {(s.name, e.name, e.attributes["hooktrace.module"]) for s in spans for e in s.events}  # type: ignore[index]
        assert events == {("backward", "grad_spike", "__total__"), ("backward", "grad_spike", "body.0")}


def test_the_exporters_trace_id_is_the_agents() -> None:
    from hooktrace.export.ids import step_trace_id

    agent = hooktrace.Agent(run_id="job-7", metrics_port=0, write_files=False)
    assert [step_trace_id("job-7", 0, n) for n in (1, 2, 300)] == [agent.trace_id(n) for n in (1, 2, 300)]
