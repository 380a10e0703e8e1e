"""Memory everywhere it is reported: /metrics, spans, steps.jsonl, the summary; and the CUDA
allocator paths, run on the CPU with a fake allocator."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
import torch
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry
from torch import nn

import hooktrace
from hooktrace._aggregate.memory_stats import MemoryStats, StaticMemory
from hooktrace._aggregate.step_record import StepRecord
from hooktrace._record.buffer import FWD_TRAIN, StepBuffer
from hooktrace._record.memory import CudaMemory, SavedTensors
from hooktrace._record.module_table import ModuleTable
from hooktrace.export.otel import OtelExporter
from hooktrace.export.prometheus import HooktraceCollector
from hooktrace.summary import RunSummary
from tests.conftest import read_steps, step_record

KIB, MIB = 1024, 1024 * 1024


class FakeAllocator:
    """The counters ``torch.cuda.memory_stats_as_nested_dict`` returns, moved by hand."""

    def __init__(self) -> None:
        self.current = 1000
        self.peak = 1000
        self.reserved_peak = 4000
        self.resets = 0
        self.reads = 0

    def alloc(self, nbytes: int) -> None:
        self.current += nbytes
        self.peak = max(self.peak, self.current)

    def stats(self, device: int) -> dict[str, Any]:
        self.reads += 1
        return {
            "allocated_bytes": {"all": {"current": self.current, "peak": self.peak}},
            "reserved_bytes": {"all": {"current": self.reserved_peak, "peak": self.reserved_peak}},
        }

    def reset(self, device: int) -> None:
        self.resets += 1
        self.peak = self.current


def test_phase_peaks_keep_the_largest_micro_batch_and_restart_after_each_reading() -> None:
    fake = FakeAllocator()
    cuda = CudaMemory(0, stats=fake.stats, reset=fake.reset, total=8000)
    peaks: dict[str, tuple[int, int]] = {}
    fake.alloc(500)
    fake.alloc(-500)
    cuda.phase_end(peaks, "backward")
    fake.alloc(200)
    cuda.phase_end(peaks, "backward")
    assert peaks == {"backward": (1500, 4000)}  # the first micro-batch's peak stays the largest
    assert fake.resets == 2 and fake.peak == fake.current == 1200
    assert cuda.allocated() == 1200


def test_the_allocated_delta_of_a_call_and_the_forward_peak_come_from_the_allocator() -> None:
    fake = FakeAllocator()
    saved = SavedTensors()
    saved.cuda = CudaMemory(0, stats=fake.stats, reset=fake.reset, total=8000)
    buf = StepBuffer(number=1, sampled=True, start_ns=1)
    saved.enter(buf, 0, 0, FWD_TRAIN)
    saved.enter(buf, 1, 0, FWD_TRAIN)
    fake.alloc(300)
    saved.exit(buf, 1)
    fake.alloc(50)
    assert "forward" not in buf.cuda_memory  # the outer call is still running
    saved.exit(buf, 0)
    assert [record[6] for record in buf.saved_calls] == [350, 300]
    assert buf.cuda_memory == {"forward": (1350, 4000)}
    assert torch._C._autograd._top_saved_tensors_default_hooks(False) is None


class Allocating(nn.GELU):
    """A GELU whose forward allocates ``nbytes`` on the fake device, as a CUDA kernel's output would."""

    def __init__(self, fake: FakeAllocator, nbytes: int) -> None:
        super().__init__()
        self.fake, self.nbytes = fake, nbytes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.fake.alloc(self.nbytes)
        return super().forward(x)


def _deep(fake: FakeAllocator) -> nn.Module:
    """37 modules: a root and 6 blocks of 5 modules each, 2 or 3 deep."""

    def block() -> nn.Module:
        return nn.Sequential(nn.Linear(8, 8), Allocating(fake, 100), nn.Sequential(nn.Tanh(), nn.Linear(8, 8)))

    return nn.Sequential(*[block() for _ in range(6)])


@pytest.mark.parametrize(
    ("options", "label_modules"),
    [({"depth": 1}, 7), ({"max_modules": 4}, 4)],
    ids=["depth-1", "max-modules-4"],
)
def test_a_sampled_step_reads_the_allocator_only_around_label_modules(
    tmp_path: Path, options: dict[str, int], label_modules: int
) -> None:
    """Each reading builds the allocator's whole stats dict: a sampled step reads it before and
    after each call of a module that stands for a metric label (the root, ``--depth 1``: the 6
    blocks; ``--max-modules 4``: the root, ``0``, ``0.0`` and ``0.1``) and once per phase for its
    peak (forward, backward, optimizer), however many modules lie below."""
    fake = FakeAllocator()
    model = _deep(fake)
    assert len(list(model.modules())) == 37
    agent = hooktrace.Agent(out=str(tmp_path), metrics_port=0, sample_every=1, memory_every=1, **options)  # type: ignore[arg-type]
    agent.attach(model)
    _attach_fake_cuda(agent, fake)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    starts = []
    for _ in range(4):
        starts.append(fake.reads)
        model(torch.randn(4, 8)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    summary = agent.close()
    per_step = [after - before for before, after in itertools.pairwise(starts[1:])]
    assert per_step == [2 * label_modules + 3] * 2  # was 2 x 37 + 3
    rows = {(m["module"], m["phase"]): m for m in summary.modules}
    assert rows[("Sequential", "forward")]["allocated_delta_bytes"] == 600  # every block's 100 bytes
    assert rows[("0", "forward")]["allocated_delta_bytes"] == 100
    assert "allocated_delta_bytes" not in rows[("2.1", "forward")]  # no label of its own: not read
    assert "allocated_delta_bytes" not in rows[("0.2.0", "forward")]


def _attach_fake_cuda(agent: hooktrace.Agent, fake: FakeAllocator) -> None:
    memory = agent.recorder.memory
    assert memory is not None
    memory.cuda = CudaMemory(0, stats=fake.stats, reset=fake.reset, total=80 * 1024**3)


def _train(tmp_path: Path) -> tuple[hooktrace.Agent, RunSummary]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 4096), nn.GELU())
    agent = hooktrace.Agent(out=str(tmp_path), metrics_port=0, sample_every=2)
    agent.attach(model)
    opt = torch.optim.AdamW(model.parameters())
    for _ in range(4):
        model(torch.randn(64, 1024)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    return agent, agent.close()


def test_cuda_peaks_and_allocated_deltas_reach_steps_jsonl_the_summary_spans_and_the_gauges(tmp_path: Path) -> None:
    fake = FakeAllocator()
    agent = hooktrace.Agent(out=str(tmp_path), metrics_port=0, sample_every=2, otlp_endpoint="http://127.0.0.1:9")
    spans = InMemorySpanExporter()
    next(e for e in agent.exporters if isinstance(e, OtelExporter)).span_exporter = spans
    model = nn.Sequential(nn.Linear(1024, 4096), Allocating(fake, 3 * KIB))
    agent.attach(model)
    _attach_fake_cuda(agent, fake)
    opt = torch.optim.AdamW(model.parameters())
    for _ in range(4):
        fake.alloc(10 * MIB)
        fake.alloc(-10 * MIB)
        model(torch.randn(64, 1024)).pow(2).mean().backward()
        fake.alloc(-3 * KIB)  # backward frees what the forward allocated
        opt.step()
        opt.zero_grad()
    summary = agent.close()
    steps = read_steps(tmp_path)
    assert {"backward", "optimizer"} <= set(steps[-1]["memory"])
    assert "forward" in steps[0]["memory"]  # sampled steps split forward from backward
    cuda = summary.ranks[0]["memory"]["cuda"]
    assert cuda["device_total"] == 80 * 1024**3
    assert max(v["allocated_peak"] for v in cuda["phases"].values()) == 1000 + 10 * MIB
    rows = {(m["module"], m["phase"]): m for m in summary.modules}
    assert rows[("1", "forward")]["allocated_delta_bytes"] == 3 * KIB
    assert rows[("Sequential", "forward")]["allocated_delta_bytes"] == 3 * KIB
    assert rows[("0", "forward")]["allocated_delta_bytes"] == 0  # read, and nothing allocated
    forward = [dict(s.attributes or {}) for s in spans.get_finished_spans() if s.name == "forward 1"]
    assert len(forward) == 2 and all(a["hooktrace.allocated_delta_bytes"] == 3 * KIB for a in forward)
    gauges = agent.stats.memory.gauges()
    assert gauges["reserved"] == 4000 and gauges["device_total"] == 80 * 1024**3
    assert "CUDA peak allocated" in summary.render()


def test_an_unsampled_step_has_no_forward_peak_and_its_backward_peak_covers_the_forward(tmp_path: Path) -> None:
    """The forward peak is read when the outermost module call returns; unsampled steps have no
    module hooks, so their backward peak includes what the forward allocated (README)."""
    fake = FakeAllocator()
    agent = hooktrace.Agent(out=str(tmp_path), metrics_port=0, sample_every=2)
    model = nn.Sequential(nn.Linear(8, 8), Allocating(fake, 5 * KIB))
    agent.attach(model)
    _attach_fake_cuda(agent, fake)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(4):
        model(torch.randn(2, 8)).sum().backward()  # the forward allocates 5 KiB, the backward nothing
        fake.alloc(-5 * KIB)
        opt.step()
        opt.zero_grad()
    agent.close()
    steps = read_steps(tmp_path)
    peaks = {step["sampled"]: step["memory"] for step in steps[1:]}  # step 1 is sampled too
    assert peaks[True]["forward"]["allocated_peak"] == 1000 + 5 * KIB
    assert "forward" not in peaks[False]
    assert peaks[False]["backward"]["allocated_peak"] == 1000 + 5 * KIB  # the forward's, read at backward


def test_metrics_expose_module_activation_bytes_and_memory_by_kind(tmp_path: Path) -> None:
    agent, _ = _train(tmp_path)
    registry = CollectorRegistry()
    collector = HooktraceCollector()
    collector.update(agent.stats.snapshot())
    registry.register(collector)
    base = {"run_id": agent.info.run_id, "rank": "0"}
    value = registry.get_sample_value
    assert value("hooktrace_module_activation_bytes", {**base, "module": "0"}) == 256 * KIB
    assert value("hooktrace_module_activation_bytes", {**base, "module": "Sequential"}) == 256 * KIB + MIB
    params = (1024 * 4096 + 4096) * 4
    assert value("hooktrace_memory_bytes", {**base, "kind": "parameters"}) == params
    assert value("hooktrace_memory_bytes", {**base, "kind": "gradients"}) == params
    assert value("hooktrace_memory_bytes", {**base, "kind": "optimizer_state"}) == 2 * params
    assert value("hooktrace_memory_bytes", {**base, "kind": "activations"}) == 256 * KIB + MIB
    assert value("hooktrace_memory_bytes", {**base, "kind": "reserved"}) is None  # CPU: no allocator


def test_module_spans_carry_their_activation_bytes(tmp_path: Path) -> None:
    agent = hooktrace.Agent(out=str(tmp_path), metrics_port=0, sample_every=1, otlp_endpoint="http://127.0.0.1:9")
    exporter = next(e for e in agent.exporters if isinstance(e, OtelExporter))
    spans = InMemorySpanExporter()
    exporter.span_exporter = spans
    model = nn.Sequential(nn.Linear(1024, 4096), nn.GELU())
    agent.attach(model)
    model(torch.randn(64, 1024)).sum().backward()
    agent.close()
    attrs = {s.name: dict(s.attributes or {}) for s in spans.get_finished_spans()}
    assert attrs["forward 0"]["hooktrace.activation_bytes"] == 256 * KIB
    assert attrs["forward 1"]["hooktrace.activation_bytes"] == MIB
    assert "hooktrace.activation_bytes" not in attrs["backward 0"]


def test_the_summary_names_the_largest_activations_and_says_cpu_measures_only_them(tmp_path: Path) -> None:
    _, summary = _train(tmp_path)
    text = summary.render()
    assert "on CPU only activation bytes are measured" in text
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Largest activations"))
    assert lines[start + 2].split()[:4] == ["forward", "Sequential", "1.2", "MiB"]
    assert RunSummary.from_dict(summary.as_dict()).render() == text


def _record(step: int, activations: int | None, cuda: dict[str, tuple[int, int]], **fields: Any) -> StepRecord:
    return step_record(step, sampled=activations is not None, activation_bytes=activations, cuda_memory=cuda, **fields)


def test_memory_stats_keep_the_last_sampled_step_for_the_gauges() -> None:
    stats = MemoryStats()
    assert stats.gauges() == {} and stats.summary("cpu") == {"measured": "nothing (--memory off)"}
    stats.add(_record(1, 3 * MIB, {"forward": (900, 950), "backward": (1000, 2000)}, label_bytes={"blocks": 3 * MIB}))
    stats.add(_record(2, MIB, {"forward": (500, 600), "backward": (700, 800)}, label_bytes={"blocks": MIB}))
    stats.add(_record(3, None, {"backward": (650, 760), "optimizer": (640, 770)}))  # unsampled: no activations
    gauges = stats.gauges()
    assert gauges["activations"] == MIB  # the last sampled step's, not the largest
    assert stats.label_bytes == {"blocks": MIB}  # hooktrace_module_activation_bytes
    assert (gauges["allocated_peak"], gauges["reserved"]) == (650, 770)  # CUDA peaks: every step, the last one
    summary = stats.summary("cuda")
    assert (summary["activations"], summary["activations_max"]) == (3 * MIB, 3 * MIB)  # median of 2: the upper
    assert summary["cuda"]["phases"]["backward"] == {"allocated_peak": 1000, "reserved_peak": 2000}  # the run's largest


def test_unfreezing_a_layer_grows_the_gradient_bytes() -> None:
    """Gradual unfreezing: the cached per-module bytes follow ``requires_grad`` (and a dtype change)."""
    model = nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 4))
    model[0].requires_grad_(False)
    table = ModuleTable(depth=3, max_modules=256)
    table.add_root(model, "")
    static = StaticMemory(table)
    first, second = (16 * 32 + 32) * 4, (32 * 4 + 4) * 4
    assert static.totals() == {"parameters": first + second, "gradients": second, "optimizer_state": 0}
    model[0].requires_grad_(True)
    assert static.totals()["gradients"] == first + second
    model.half()
    half = (first + second) // 2
    assert static.totals() == {"parameters": half, "gradients": half, "optimizer_state": 0}


def test_the_report_tree_has_a_saved_column(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from hooktrace.cli.main import cli

    _train(tmp_path)
    result = CliRunner().invoke(cli, ["report", str(tmp_path), "--tree"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    header = lines[0]
    end = header.index("saved") + len("saved")
    gelu = next(line for line in lines if line.lstrip().startswith("(1): GELU"))
    assert gelu[:end].rstrip().endswith("1.0 MiB")
    root = next(line for line in lines if line.startswith("Sequential("))
    assert root[:end].rstrip().endswith("1.2 MiB")


def test_the_html_report_has_a_memory_section(tmp_path: Path) -> None:
    from hooktrace.report.html import build_html
    from hooktrace.report.load import load_run

    _train(tmp_path)
    page = build_html(load_run(str(tmp_path)))
    section = page[page.index("<h2>Memory</h2>") :]
    section = section[: section.index("</section>")]
    assert "<td>forward Sequential</td><td>1.2 MiB</td>" in section
    assert "<td>16.0 MiB</td><td>16.0 MiB</td><td>32.0 MiB</td>" in section  # parameters, gradients, AdamW
