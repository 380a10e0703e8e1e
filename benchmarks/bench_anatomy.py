"""Where the default config's overhead goes: the agent's own time on the training thread.

``bench_overhead`` compares step times, which is the truth a user sees but moves by a percent
between runs and between copies of a model (memory placement, page faults of the allocator).
This times the agent's code where it runs instead, which is exact, and splits it:

- ``inside hooktrace``: the time spent in every hook and callback the agent registers (root
  forward pre/post, module forward pre/post, gradient hooks, end of backward, optimizer pre/post;
  nested calls counted once), per step on average at the default ``--sample-every 10``, and
  for an unsampled step, a sampled step and a flow step (the sampled step at or after every
  ``--flow-every``, 100 by default);
- ``gradient norms``: in it, the per-step ``_foreach_norm`` over all gradients and its host
  transfer; ``flow norms``: the ‖grad‖ of every module output and input on flow steps;
- ``norms alone``: gradient norms + flow norms / 100, of a bare step: the floor under any faster
  hook machinery at the default rates.

Not in it (so ``bench_overhead`` reads more): PyTorch's own cost of calling hooks (the hooked
module call path, the autograd engine entering Python), the worker thread's share of the GIL (its
steps are discarded here), and cache and allocator effects on the model's own work.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from _models import workload

import hooktrace
import hooktrace._record.recorder as recorder_module
from hooktrace._record.recorder import Recorder
from hooktrace._record.tracker import StepTracker

WORKLOADS = ("mlp", "tiny-transformer", "transformer", "cnn")
STEPS = {"mlp": 3000, "tiny-transformer": 1000, "transformer": 200, "cnn": 600}
WARMUP_STEPS = 20
SAMPLE_EVERY = 10
FLOW_EVERY = 100  # the defaults, passed explicitly
ENTRY_POINTS = ("_on_root_grad", "_on_backward_end", "_on_gradients_final", "_optimizer_pre", "_optimizer_post")
"""StepTracker methods registered as hooks or callbacks (the root hooks are closures)."""


class Timer:
    """Time inside wrapped functions; a call made from inside another one is not counted twice."""

    def __init__(self) -> None:
        self.total = 0
        self._inside = False

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            if self._inside:
                return fn(*args, **kwargs)
            self._inside = True
            start = time.perf_counter_ns()
            try:
                return fn(*args, **kwargs)
            finally:
                self.total += time.perf_counter_ns() - start
                self._inside = False

        return timed

    def take(self) -> int:
        total, self.total = self.total, 0
        return total


@contextmanager
def timed_agent_code(agent_time: Timer, flow: Timer) -> Iterator[None]:
    """Wrap every entry point of the agent on the training thread (for agents attached inside)."""
    saved: list[tuple[Any, str, Any]] = []

    def patch(owner: Any, name: str, wrapper: Callable[[Any], Any]) -> None:
        original = getattr(owner, name)
        saved.append((owner, name, original))
        setattr(owner, name, wrapper(original))

    def closures(make: Callable[..., Any]) -> Callable[..., Any]:
        def made(*args: Any) -> Any:
            result = make(*args)
            return tuple(agent_time.wrap(fn) for fn in result) if isinstance(result, tuple) else agent_time.wrap(result)

        return made

    for name in ENTRY_POINTS:
        patch(StepTracker, name, agent_time.wrap)
    patch(StepTracker, "_make_root_pre", closures)
    patch(StepTracker, "_make_root_post", closures)
    patch(recorder_module, "make_forward_hooks", closures)
    patch(Recorder, "on_node_grad", agent_time.wrap)
    patch(recorder_module, "gradient_norm", flow.wrap)
    try:
        yield
    finally:
        for owner, name, original in reversed(saved):
            setattr(owner, name, original)


def measure(name: str, steps: int) -> str:
    model, step = workload(name)
    for _ in range(WARMUP_STEPS):
        step()
    bare = []
    for _ in range(max(20, steps // 10)):
        start = time.perf_counter_ns()
        step()
        bare.append(time.perf_counter_ns() - start)
    bare_us = statistics.median(bare) / 1e3
    agent_time, flow, capture = Timer(), Timer(), Timer()
    rows: list[tuple[bool, int, int, int]] = []  # (sampled, agent ns, capture ns, flow ns)
    with timed_agent_code(agent_time, flow), tempfile.TemporaryDirectory(prefix="hooktrace-anatomy-") as out:
        agent = hooktrace.attach(
            model, out=out, sample_every=SAMPLE_EVERY, flow_every=FLOW_EVERY, metrics_port=0, write_files=False
        )
        agent.worker._handle = lambda buf: None  # type: ignore[method-assign]
        agent.capture.capture = capture.wrap(agent.capture.capture)  # type: ignore[method-assign]
        for number in range(1, WARMUP_STEPS + steps + 1):
            step()
            if number > WARMUP_STEPS:
                rows.append(((number - 1) % SAMPLE_EVERY == 0, agent_time.take(), capture.take(), flow.take()))
            else:
                agent_time.take(), capture.take(), flow.take()
        agent.close()
    flow_rows = [r for r in rows if r[3] > 0]
    mean_us = statistics.mean(r[1] for r in rows) / 1e3
    unsampled_us = statistics.median(r[1] for r in rows if not r[0]) / 1e3
    sampled_us = statistics.median(r[1] for r in rows if r[0] and not r[3]) / 1e3
    flow_step_us = statistics.median(r[1] for r in flow_rows) / 1e3 if flow_rows else 0.0
    capture_us = statistics.median(r[2] for r in rows if not r[0]) / 1e3
    flow_us = statistics.median(r[3] for r in flow_rows) / 1e3 if flow_rows else 0.0
    norms_pct = (capture_us + flow_us / FLOW_EVERY) / bare_us * 100
    return (
        f"anatomy {name:<16} bare {bare_us / 1e3:.2f} ms | inside hooktrace {mean_us:.0f} us per step "
        f"({mean_us / bare_us * 100:.2f} %): unsampled step {unsampled_us:.0f} us, sampled step {sampled_us:.0f} us, "
        f"flow step {flow_step_us:.0f} us | gradient norms {capture_us:.0f} us every step, flow norms "
        f"{flow_us:.0f} us per flow step ({len(flow_rows)} of them): norms alone {norms_pct:.2f} % ({steps} steps)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    parser.add_argument("--steps", type=int, help=f"attached steps per workload (default: {STEPS})")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as bench_overhead: one core for training
    for name in args.workloads:
        print(measure(name, args.steps or STEPS[name]), flush=True)


if __name__ == "__main__":
    main()
