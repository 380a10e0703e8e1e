"""The per-step files: one strict JSON object per line, whatever numbers a step carries."""

from __future__ import annotations

import json
import time
from pathlib import Path

from hooktrace._aggregate.step_record import StepEvent, StepRecord
from hooktrace.export.jsonl import StepsJsonlExporter
from tests.conftest import step_record


def _record(step: int, forward_s: float, norm: float) -> StepRecord:
    return step_record(
        step,
        end_ns=1_000_000,
        phases={"forward": forward_s, "backward": 0.0005},
        module_grad_norms={"body": norm},
        events=[StepEvent("grad_spike", "body", "backward", norm, {"ratio": 3.0})],
    )


def _reject(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def test_a_non_finite_number_is_written_as_null_and_every_line_stays_strict_json(tmp_path: Path) -> None:
    exporter = StepsJsonlExporter(str(tmp_path / "rank0.steps.jsonl"))
    exporter.start()
    exporter.export_step(_record(1, 0.0004, 2.5))
    exporter.export_step(_record(2, float("nan"), float("inf")))
    exporter.close()
    lines = (tmp_path / "rank0.steps.jsonl").read_text(encoding="utf-8").splitlines()
    first, second = (json.loads(line, parse_constant=_reject) for line in lines)
    assert first["phases"]["forward"] == 0.0004 and first["module_grad_norms"] == {"body": 2.5}
    assert second["phases"]["forward"] is None
    assert second["module_grad_norms"] == {"body": None}
    assert second["events"][0]["value"] is None


def test_trace_events_are_strict_json_even_for_module_names_that_need_escaping(tmp_path: Path) -> None:
    import torch
    from torch import nn

    import hooktrace
    from tests.conftest import read_trace

    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.parts = nn.ModuleDict({'say "hi"\\\\ü': nn.Linear(4, 4)})

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.parts['say "hi"\\\\ü'](x)

    model = Odd()
    agent = hooktrace.attach(model, out=str(tmp_path), metrics_port=0, sample_every=1)
    model(torch.randn(2, 4)).sum().backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    agent.close()
    events = [e for e in read_trace(tmp_path) if e.get("ph") == "X" and e["cat"] in ("forward", "backward")]
    odd = 'parts.say "hi"\\\\ü'
    forward = next(e for e in events if e["name"] == f"forward {odd}")
    assert forward["args"]["module"] == odd and forward["args"]["module_type"] == "Linear"
    assert set(forward) == {"name", "cat", "ph", "ts", "dur", "pid", "tid", "args"}
    assert forward["dur"] >= 0 and forward["args"]["self_us"] <= forward["dur"] + 1e-6
    assert abs(forward["ts"] / 1e6 - time.time()) < 60  # wall-clock microseconds: ranks line up
    assert any(e["name"] == f"backward {odd}" for e in events)
