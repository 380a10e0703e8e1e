"""CUDA-only checks (skipped without a GPU): events, no host sync, identical losses."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
import torch

import hooktrace
from tests import zoo
from tests.conftest import nonfinite_source, read_steps

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


def _nan_run(tmp_path: Path, steps: int, **options: object) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 8), zoo.NaNAt(at=steps, where="forward"), torch.nn.Linear(8, 1)
    ).cuda()
    agent = hooktrace.attach(model, out=str(tmp_path), metrics_port=0, **options)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    try:
        for step in range(1, steps + 1):
            opt.zero_grad()
            model(zoo.nan_batch(step, steps).cuda()).mean().backward()
            opt.step()
    finally:
        agent.close()


def test_a_forward_nan_is_named_on_a_sampled_step_without_a_sync(tmp_path: Path) -> None:
    """warn mode on CUDA: no replay (it would need the verdict on the host); the output sums of a
    sampled step name the module."""
    _nan_run(tmp_path, 3, sample_every=2)  # steps 1 and 3 are sampled
    assert nonfinite_source(tmp_path) == ("1", "forward")


def test_raise_mode_replays_a_forward_nan_on_an_unsampled_step(tmp_path: Path) -> None:
    with pytest.raises(hooktrace.NonFiniteGradientError) as info:
        _nan_run(tmp_path, 4, sample_every=10, on_nonfinite="raise")
    assert (info.value.step, info.value.module, info.value.phase) == (4, "1", "forward")


class _Checkpointed(torch.nn.Module):
    def __init__(self, reentrant: bool) -> None:
        super().__init__()
        self.reentrant = reentrant
        self.inp = torch.nn.Linear(1024, 4096)
        self.block = torch.nn.Sequential(torch.nn.GELU(), torch.nn.Linear(4096, 1024))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torch.utils.checkpoint import checkpoint

        return checkpoint(self.block, self.inp(x), use_reentrant=self.reentrant)


@pytest.mark.parametrize("reentrant", [False, True])
def test_memory_on_cuda_counts_saves_and_reads_the_allocator_without_a_sync(tmp_path: Path, reentrant: bool) -> None:
    """Activation bytes as on the CPU (the checkpoint's recompute runs on the autograd engine's
    device thread), allocator peaks per phase, optimizer state, all under sync-debug 'error'."""
    torch.manual_seed(0)
    model = _Checkpointed(reentrant).cuda()
    agent = hooktrace.attach(model, out=str(tmp_path), metrics_port=0, sample_every=1, memory_every=1)
    opt = torch.optim.AdamW(model.parameters())
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            model(torch.randn(64, 1024, device="cuda")).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    summary = agent.close()
    assert summary.ranks[0]["hook_errors"] == 0
    rows = {(m["module"], m["phase"]): m for m in summary.modules}
    assert rows[("inp", "forward")]["activation_bytes"] == 64 * 1024 * 4
    assert rows[("block.0", "recompute")]["activation_bytes"] == 64 * 4096 * 4
    memory = summary.ranks[0]["memory"]
    params = sum(p.numel() * 4 for p in model.parameters())
    assert memory["optimizer_state"] == 2 * params
    phases = memory["cuda"]["phases"]
    assert {"forward", "backward", "optimizer"} <= set(phases)
    assert max(v["allocated_peak"] for v in phases.values()) >= 3 * params  # weights, grads, state
    assert memory["cuda"]["device_total"] == torch.cuda.get_device_properties(0).total_memory
    assert all("memory" in step for step in read_steps(tmp_path))


def test_a_sampled_step_reads_the_allocator_only_around_label_modules(tmp_path: Path) -> None:
    """Each reading builds the allocator's whole stats dict: with --depth 1 a sampled step reads it
    before and after the root and each block (5 calls) and once per phase (forward, backward,
    optimizer), not around the 12 modules inside the blocks; the blocks' allocated delta is real."""
    torch.manual_seed(0)
    blocks = [
        torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 256)) for _ in range(4)
    ]
    model = torch.nn.Sequential(*blocks).cuda()
    agent = hooktrace.attach(model, out=str(tmp_path), metrics_port=0, sample_every=1, memory_every=1, depth=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def step() -> None:
        model(torch.randn(64, 256, device="cuda")).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()

    step()  # the agent knows the device now: count its readings from here on
    cuda = agent.recorder.memory.cuda  # type: ignore[union-attr]
    assert cuda is not None
    stats, reads = cuda.stats, [0]

    def counted(device: int) -> Any:
        reads[0] += 1
        return stats(device)

    cuda.stats = counted
    starts = []
    for _ in range(3):
        starts.append(reads[0])
        step()
    summary = agent.close()
    assert [after - before for before, after in itertools.pairwise(starts)] == [2 * 5 + 3] * 2
    rows = {(m["module"], m["phase"]): m for m in summary.modules}
    assert rows[("0", "forward")]["allocated_delta_bytes"] > 0
    assert "allocated_delta_bytes" not in rows[("0.1", "forward")]
