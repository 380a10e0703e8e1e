"""Attach time of a 1000-module model, and memory over 10,000 steps (must stay flat)."""

from __future__ import annotations

import gc
import statistics
import tempfile
import time
import tracemalloc

import torch
from torch import nn

import hooktrace


def wide_model(n_blocks: int = 250) -> nn.Module:
    """~1000 modules: n blocks of (Linear, ReLU, Linear) under one Sequential each."""
    return nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)) for _ in range(n_blocks)])


def attach_ms(repeats: int = 5) -> tuple[int, float]:
    model = wide_model()
    count = sum(1 for _ in model.modules())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        agent = hooktrace.attach(model, metrics_port=0, write_files=False)
        times.append((time.perf_counter() - start) * 1e3)
        agent.close()
    return count, statistics.median(times)


def memory_growth(steps: int = 10_000) -> tuple[float, float]:
    """Traced Python memory after 5,000 (bounded rings full) and after ``steps`` steps, in KiB."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(8, 16)
    out = tempfile.mkdtemp(prefix="hooktrace-bench-")
    agent = hooktrace.attach(model, metrics_port=0, out=out, sample_every=10, max_trace_events=50_000)
    tracemalloc.start()
    early = 0.0
    for step in range(1, steps + 1):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
        if step == 5_000:
            agent.worker.wait_idle(10)
            gc.collect()
            early = tracemalloc.get_traced_memory()[0] / 1024
    agent.worker.wait_idle(10)
    gc.collect()
    late = tracemalloc.get_traced_memory()[0] / 1024
    tracemalloc.stop()
    agent.close()
    return early, late


def main() -> None:
    count, ms = attach_ms()
    print(f"attach {count} modules: {ms:.1f} ms (median of 5; target < 100 ms)", flush=True)
    early, late = memory_growth()
    print(
        f"memory after 5,000 steps {early:.0f} KiB, after 10,000 steps {late:.0f} KiB "
        f"(growth {late - early:+.0f} KiB; target: flat)",
        flush=True,
    )


if __name__ == "__main__":
    main()
