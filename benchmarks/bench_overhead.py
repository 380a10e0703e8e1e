"""Step-time overhead of hooktrace vs bare training and vs torch.profiler, side by side.

Runs the same training step bare, with hooktrace (default config, and --sample-every 1), and
under torch.profiler (CPU activities), in interleaved blocks in one process, and prints the
median ratio of each mode's per-step time to the bare blocks around it. The agent is attached
and warmed up (12 steps) before its block is timed: the figure is the steady-state cost.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable

import torch
from _models import workload

import hooktrace


def _block(step: Callable[[], None], steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def measure(name: str, blocks: int, steps: int) -> dict[str, float]:
    model, step = workload(name)
    for _ in range(20):
        step()  # warm up allocator and kernels
    ratios: dict[str, list[float]] = {"hooktrace default": [], "hooktrace --sample-every 1": [], "torch.profiler": []}
    out = tempfile.mkdtemp(prefix="hooktrace-bench-")
    for _ in range(blocks):
        for mode in ratios:
            bare_before = _block(step, steps)
            if mode == "torch.profiler":
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]):
                    t = _block(step, steps)
            else:
                every = 10 if mode == "hooktrace default" else 1
                agent = hooktrace.attach(model, out=out, metrics_port=0, sample_every=every, write_files=False)
                _block(step, 12)  # steady state: step 1 (deep, preflight) and the worker's start are not timed
                t = _block(step, steps)
                agent.close()
            bare_after = _block(step, steps)
            ratios[mode].append(t / ((bare_before + bare_after) / 2))
    return {mode: statistics.median(values) for mode, values in ratios.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--blocks", type=int, default=9)
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for name in ("tiny-transformer", "transformer", "cnn"):
        result = measure(name, args.blocks, args.steps)
        cells = "  ".join(f"{mode}: {(ratio - 1) * 100:+.1f}%" for mode, ratio in result.items())
        print(f"overhead {name:<16} (median of {args.blocks} blocks x {args.steps} steps)  {cells}", flush=True)


if __name__ == "__main__":
    main()
