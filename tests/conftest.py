"""Shared fixtures: a clean environment for every test, and small helpers to read a run."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    import torch
    from torch import nn

    import hooktrace
    from hooktrace._aggregate.step_record import StepRecord


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No HOOKTRACE_*/OTEL_*/torchrun variable from the developer's shell leaks into a test."""
    for name in list(os.environ):
        if name.startswith(("HOOKTRACE_", "OTEL_", "TORCHELASTIC_")) or name in {
            "RANK",
            "LOCAL_RANK",
            "WORLD_SIZE",
            "GROUP_RANK",
            "MASTER_ADDR",
            "MASTER_PORT",
        }:
            monkeypatch.delenv(name, raising=False)


class RecordCapture:
    """An exporter that keeps the StepRecords the worker produced (in-process span and trace tests)."""

    name = "capture"

    def __init__(self) -> None:
        self.records: list[Any] = []

    def start(self) -> None: ...

    def export_step(self, step: Any) -> None:
        self.records.append(step)

    def refresh(self, snapshot: object) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


def step_record(step: int = 1, **fields: Any) -> StepRecord:
    """A ``StepRecord`` for exporter and stats tests: a one-microbatch, one-update unsampled step
    of 1 ns unless ``fields`` say otherwise."""
    from hooktrace._aggregate.step_record import StepRecord

    base: dict[str, Any] = {
        "rank": 0,
        "sampled": False,
        "start_ns": 0,
        "end_ns": 1,
        "wall_start_ns": 0,
        "phases": {},
        "phase_spans": [],
        "micro_batches": 1,
        "optimizer_steps": 1,
    }
    return StepRecord(step=step, **{**base, **fields})


def train(
    model: nn.Module, batch: Callable[[], torch.Tensor], steps: int, out: Path, **options: object
) -> hooktrace.Agent:
    """Attach an agent (no /metrics port), run ``steps`` SGD steps on ``model(batch())``'s mean
    square, close the agent and return it."""
    import torch

    import hooktrace

    agent = hooktrace.attach(model, out=str(out), metrics_port=0, **options)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(steps):
        opt.zero_grad()
        model(batch()).pow(2).mean().backward()
        opt.step()
    agent.close()
    return agent


def read_steps(out: Path, rank: int = 0) -> list[dict[str, Any]]:
    with open(out / f"rank{rank}.steps.jsonl", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def nonfinite_source(out: Path, rank: int = 0) -> tuple[str, str]:
    """``(first_module, phase)`` of the ``nonfinite`` event of a run's last step."""
    event = next(e for e in read_steps(out, rank)[-1]["events"] if e["kind"] == "nonfinite")
    return event["first_module"], event["phase"]


def read_trace(out: Path, rank: int = 0) -> list[dict[str, Any]]:
    text = (out / f"rank{rank}.trace.json").read_text(encoding="utf-8")
    return json.loads(text)  # type: ignore[no-any-return]


GLOO_ABORT = "terminate called without an active exception"
"""PyTorch 2.13's gloo backend now and then aborts a 2-rank run of examples/train_ddp.py with this
(about 1 run in 6 on a 2-core machine, plain torchrun too, hooktrace or not)."""


def retry_gloo_abort(run: Callable[[], subprocess.CompletedProcess[str]]) -> subprocess.CompletedProcess[str]:
    """Run a 2-rank job; once more if it died of the gloo abort above (and of nothing else)."""
    result = run()
    if result.returncode != 0 and GLOO_ABORT in result.stderr:
        result = run()
    return result
