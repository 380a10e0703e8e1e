"""The Perfetto trace file keeps every step with an event, sampled or not (DESIGN §7)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

import hooktrace
from hooktrace._aggregate.step_record import StepEvent, StepRecord
from hooktrace.export.perfetto import PerfettoExporter
from tests.conftest import RecordCapture, read_trace


def _train(tmp_path: Path, steps: int, nan_at: int = 0) -> list[StepRecord]:
    """``steps`` SGD steps of a small MLP, only step 1 sampled; a NaN in the batch of ``nan_at``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    agent = hooktrace.Agent(out=str(tmp_path), metrics_port=0, sample_every=100)
    capture = RecordCapture()
    agent.exporters.append(capture)
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
    return capture.records


def _steps(events: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    return {e["args"]["step"]: e for e in events if e.get("ph") == "X" and e.get("cat") == "step"}


def _inside(events: list[dict[str, Any]], slice_: dict[str, Any], **match: Any) -> list[dict[str, Any]]:
    """The events of ``match`` whose time lies within ``slice_``, to a microsecond (wall-clock
    microseconds as floats are exact to ~0.25 us only)."""
    lo, hi = slice_["ts"] - 1.0, slice_["ts"] + slice_["dur"] + 1.0
    return [e for e in events if all(e.get(k) == v for k, v in match.items()) and lo <= e["ts"] <= hi]


def test_an_unsampled_step_with_a_nan_gets_its_step_and_phase_slices_and_an_instant_event(tmp_path: Path) -> None:
    records = _train(tmp_path, steps=3, nan_at=3)
    assert [r.sampled for r in records] == [True, False, False] and records[2].events
    events = read_trace(tmp_path)
    steps = _steps(events)
    assert sorted(steps) == [1, 3]  # step 2: unsampled, nothing happened
    assert steps[3]["args"]["sampled"] is False
    phases = {e["name"] for e in _inside(events, steps[3], ph="X", cat="phase")}
    assert {"forward", "backward", "optimizer"} <= phases
    assert _inside(events, steps[3], ph="X", cat="forward") == []  # no module slices: nothing timed them
    [instant] = _inside(events, steps[3], ph="i")
    assert instant["name"] == "nonfinite" and instant["cat"] == "event"
    assert (instant["args"]["module"], instant["args"]["phase"]) == ("Sequential", "input")


def test_an_unsampled_step_with_a_spike_gets_an_instant_event_naming_the_module(tmp_path: Path) -> None:
    records = _train(tmp_path / "run", steps=2)
    spiked = dataclasses.replace(records[1], events=[StepEvent("grad_spike", "2", "backward", 812.0, {"ratio": 40.0})])
    exporter = PerfettoExporter(str(tmp_path / "rank0.trace.json"), rank=0, max_events=1000, run_id="run")
    exporter.start()
    for record in (records[0], records[1], spiked):
        exporter.export_step(record)
    exporter.close()
    events = read_trace(tmp_path)
    steps = _steps(events)
    assert sorted(steps) == [1, 2]  # step 2 once: the copy with the spike
    [instant] = _inside(events, steps[2], ph="i")
    assert instant["name"] == "grad_spike"
    assert instant["args"] == {"kind": "grad_spike", "module": "2", "phase": "backward", "value": 812.0, "ratio": 40.0}
