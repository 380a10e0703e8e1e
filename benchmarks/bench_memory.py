"""What activation memory per module (``--memory on``, the default) costs a sampled step.

Each workload attached with ``--sample-every 1 --flow-every 0`` (every step a sampled step), timed
in interleaved blocks with memory tracking switched on and off on the same model and agent (copies
of a model differ by a few percent on their own); the median difference is what memory tracking
adds to a sampled step: a push and a pop per module call, one pack per saved tensor, one unpack per
saved tensor in backward, and the worker's aggregation (it shares the GIL with training). Beside it, the time spent
inside those hooks (exact, measured where they run), how many saves and module calls a step has,
and the share of step time at the default ``--sample-every 10``.

Unsampled steps have no module hooks at all, so memory tracking costs them nothing.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
from _models import workload

import hooktrace
import hooktrace._record.memory as memory_module
from hooktrace._record.memory import SavedTensors

WORKLOADS = ("mlp", "tiny-transformer", "transformer", "cnn")
ROUNDS = 7
BLOCK = {"mlp": 100, "tiny-transformer": 40, "transformer": 10, "cnn": 20}
SAMPLE_EVERY = 10
MEMORY_EVERY = 100


class Timer:
    """Time inside the wrapped functions, and how often they ran."""

    def __init__(self) -> None:
        self.ns = 0
        self.calls = 0

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter_ns()
            try:
                return fn(*args, **kwargs)
            finally:
                self.ns += time.perf_counter_ns() - start
                self.calls += 1

        return timed


def block_us(step: Callable[[], None], steps: int) -> float:
    start = time.perf_counter_ns()
    for _ in range(steps):
        step()
    return (time.perf_counter_ns() - start) / steps / 1e3


def _wrapped(hooks: Timer, packs: Timer, unpacks: Timer) -> Callable[[], None]:
    """Time the memory hooks where they run; returns the function that puts the originals back."""
    originals = (SavedTensors.enter, SavedTensors.exit, memory_module._pack, memory_module._unpack)
    SavedTensors.enter = hooks.wrap(originals[0])  # type: ignore[method-assign]
    SavedTensors.exit = hooks.wrap(originals[1])  # type: ignore[method-assign]
    memory_module._pack = packs.wrap(originals[2])  # the name enter() binds at each call
    memory_module._unpack = unpacks.wrap(originals[3])

    def restore() -> None:
        SavedTensors.enter, SavedTensors.exit = originals[0], originals[1]  # type: ignore[method-assign]
        memory_module._pack, memory_module._unpack = originals[2], originals[3]

    return restore


def measure(name: str, rounds: int, block: int) -> str:
    model, step = workload(name)
    out = tempfile.mkdtemp(prefix="hooktrace-bench-memory-")
    agent = hooktrace.attach(
        model, out=out, metrics_port=0, write_files=False, sample_every=1, flow_every=0, memory_every=1
    )
    saved = agent.recorder.memory
    block_us(step, 5)  # warm-up

    def switch(on: bool) -> None:
        """The same model and agent with memory tracking on or off (hooks and worker alike)."""
        agent.worker.wait_idle(10.0)
        agent.recorder.memory = saved if on else None
        agent.worker.processor.saved = saved if on else None

    times: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(rounds):
        for on in (True, False):
            switch(on)
            times[on].append(block_us(step, block))
    switch(True)
    hooks, packs, unpacks = Timer(), Timer(), Timer()
    restore = _wrapped(hooks, packs, unpacks)  # after the comparison: the timers cost time too
    try:
        measured = max(1, rounds // 2) * block
        block_us(step, measured)
    finally:
        restore()
    summary = agent.close()
    on, off = statistics.median(times[True]), statistics.median(times[False])
    inside = (hooks.ns + packs.ns + unpacks.ns) / measured / 1e3
    activations = summary.ranks[0]["memory"].get("activations") or 0
    return (
        f"memory {name:<16} sampled step {on / 1e3:.2f} ms with --memory on, {off / 1e3:.2f} ms off: "
        f"{on - off:+.0f} us ({(on / off - 1) * 100:+.1f} %) | inside the memory hooks {inside:.0f} us per sampled "
        f"step ({hooks.calls / 2 / measured:.0f} module calls, {packs.calls / measured:.0f} saves, "
        f"{unpacks.calls / measured:.0f} unpacks) | per step at --memory-every {MEMORY_EVERY} (the default): "
        f"{(on - off) / MEMORY_EVERY / off * 100:.3f} %, at --memory-every 1 --sample-every {SAMPLE_EVERY}: "
        f"{(on - off) / SAMPLE_EVERY / off * 100:.2f} % | activations {activations / 2**20:.2f} MiB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--block", type=int, help="steps per timed block (default: per workload)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as bench_overhead: one core for training
    for name in args.workloads:
        print(measure(name, args.rounds, args.block or BLOCK[name]), flush=True)


if __name__ == "__main__":
    main()
