"""The per-step files: one strict JSON object per line, whatever numbers a step carries."""

from __future__ import annotations

import json
from pathlib import Path

from hooktrace._aggregate.snapshot import MetricsSnapshot
from hooktrace._aggregate.step_record import StepEvent, StepRecord
from hooktrace.export.jsonl import StepsJsonlExporter


def _record(step: int, forward_s: float, norm: float) -> StepRecord:
    return StepRecord(
        step=step,
        rank=0,
        sampled=False,
        start_ns=0,
        end_ns=1_000_000,
        wall_start_ns=0,
        phases={"forward": forward_s, "backward": 0.0005},
        phase_spans=[],
        micro_batches=1,
        optimizer_steps=1,
        module_grad_norms={"body": norm},
        events=[StepEvent("grad_spike", "body", "backward", norm, {"ratio": 3.0})],
    )


def _reject(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def test_a_non_finite_number_is_written_as_null_and_every_line_stays_strict_json(tmp_path: Path) -> None:
    exporter = StepsJsonlExporter(str(tmp_path / "rank0.steps.jsonl"))
    exporter.start()
    snapshot = MetricsSnapshot.__new__(MetricsSnapshot)  # the JSONL exporter never reads it
    exporter.export_step(_record(1, 0.0004, 2.5), snapshot)
    exporter.export_step(_record(2, float("nan"), float("inf")), snapshot)
    exporter.close()
    lines = (tmp_path / "rank0.steps.jsonl").read_text(encoding="utf-8").splitlines()
    first, second = (json.loads(line, parse_constant=_reject) for line in lines)
    assert first["phases"]["forward"] == 0.0004 and first["module_grad_norms"] == {"body": 2.5}
    assert second["phases"]["forward"] is None
    assert second["module_grad_norms"] == {"body": None}
    assert second["events"][0]["value"] is None
