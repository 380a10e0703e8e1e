"""CUDA-only checks (skipped without a GPU): events, no host sync, identical losses."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import hooktrace
from tests import zoo
from tests.conftest import read_steps

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _train(model: torch.nn.Module, steps: int) -> list[torch.Tensor]:
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    for step in range(steps):
        x = zoo.make_batch(step, model).cuda()
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return losses


def test_the_agent_never_syncs_the_training_thread_and_keeps_losses(tmp_path: Path) -> None:
    torch.manual_seed(0)
    bare = _train(zoo.SleepyNet(0, 0).cuda(), 12)
    torch.manual_seed(0)
    model = zoo.SleepyNet(0, 0).cuda()
    agent = hooktrace.attach(model, out=str(tmp_path), metrics_port=0, sample_every=2)
    torch.cuda.set_sync_debug_mode("error")
    try:
        traced = _train(model, 12)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    summary = agent.close()
    assert torch.equal(torch.stack(bare), torch.stack(traced))
    assert summary.device == "cuda" and summary.steps == 12
    assert summary.ranks[0]["hook_errors"] == 0
    assert all(step["grad_norm"] is not None for step in read_steps(tmp_path))
    forward = next(m for m in summary.modules if m["module"] == "slow" and m["phase"] == "forward")
    assert forward["per_step_s"] > 0
