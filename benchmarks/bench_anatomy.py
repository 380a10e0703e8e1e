"""Where the default config's overhead goes: the cost of one unsampled and one sampled step.

``bench_overhead`` gives totals; this splits them. With ``--sample-every 10``, nine steps in ten
are unsampled, so the default's overhead is about (sampled + 9 x unsampled) / 10 of a bare step.
Printed per workload, on the training thread (each agent's worker discards its steps, so none of
its GIL time is counted here; ``bench_overhead`` includes it):

- ``every step``: an unsampled step's extra time, and in it the gradient-norm capture (one
  ``_foreach_norm`` over all gradients and one host transfer, timed where it runs);
- ``sampled step``: a sampled step's extra time (module hooks, spans' stamps), and in it the
  gradient-flow norms (‖grad‖ of every module output and input, timed where they run);
- ``norms alone``: the part of the default's overhead that is the gradient norms themselves,
  i.e. (flow + 10 x capture) / 10: the floor under any faster hook machinery.

Extra times are medians, over single steps alternating with a bare copy, of (agent step - mean of
the two bare steps around it); the timed parts are medians of their own per-step totals.
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
import hooktrace._record.recorder as recorder_module

WORKLOADS = ("tiny-transformer", "transformer", "cnn")
STEPS = {"tiny-transformer": 1500, "transformer": 600, "cnn": 1000}
WARMUP_STEPS = 30
NEVER = 1 << 40
"""A ``sample_every`` no run reaches: every step after the first is unsampled."""


class PartTimer:
    """Sums the time spent in one function per step."""

    def __init__(self) -> None:
        self.current = 0
        self.per_step: list[int] = []

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any) -> Any:
            start = time.perf_counter_ns()
            try:
                return fn(*args)
            finally:
                self.current += time.perf_counter_ns() - start

        return timed

    def end_step(self) -> None:
        self.per_step.append(self.current)
        self.current = 0


def _agent(model: torch.nn.Module, out: str, sample_every: int) -> hooktrace.Agent:
    agent = hooktrace.attach(model, out=out, sample_every=sample_every, metrics_port=0)
    agent.worker._handle = lambda buf: None  # type: ignore[method-assign]
    return agent


def measure(name: str, steps: int) -> str:
    flow = PartTimer()
    original_norm = recorder_module.gradient_norm
    recorder_module.gradient_norm = flow.wrap(original_norm)
    try:
        return _measure(name, steps, flow)
    finally:
        recorder_module.gradient_norm = original_norm


def _measure(name: str, steps: int, flow: PartTimer) -> str:
    with tempfile.TemporaryDirectory(prefix="hooktrace-anatomy-") as out:
        _, bare = workload(name)
        unsampled_model, unsampled_step = workload(name)
        sampled_model, sampled_step = workload(name)
        agents = [_agent(unsampled_model, f"{out}/u", NEVER), _agent(sampled_model, f"{out}/s", 1)]
        capture = PartTimer()
        agents[0].capture.capture = capture.wrap(agents[0].capture.capture)  # type: ignore[method-assign]
        for _ in range(WARMUP_STEPS):
            bare()
            unsampled_step()
            sampled_step()
        clock = time.perf_counter_ns
        bare_times: list[int] = []
        extra: dict[str, list[float]] = {"unsampled": [], "sampled": []}
        t0 = clock()
        bare()
        bare_times.append(clock() - t0)
        capture.current = flow.current = 0
        for _ in range(steps):
            for kind, step, part in (("unsampled", unsampled_step, capture), ("sampled", sampled_step, flow)):
                t0 = clock()
                step()
                t1 = clock()
                bare()
                t2 = clock()
                bare_times.append(t2 - t1)
                extra[kind].append((t1 - t0) - (bare_times[-2] + bare_times[-1]) / 2)
                part.end_step()
        for agent in agents:
            agent.close()
    bare_us = statistics.median(bare_times) / 1e3
    unsampled_us = statistics.median(extra["unsampled"]) / 1e3
    sampled_us = statistics.median(extra["sampled"]) / 1e3
    capture_us = statistics.median(capture.per_step) / 1e3
    flow_us = statistics.median(flow.per_step) / 1e3
    default_pct = (sampled_us + 9 * unsampled_us) / 10 / bare_us * 100
    norms_pct = (flow_us + 10 * capture_us) / 10 / bare_us * 100
    return (
        f"anatomy {name:<16} bare {bare_us / 1e3:.2f} ms | every step {unsampled_us:+.0f} us "
        f"({unsampled_us / bare_us * 100:.1f} %), gradient norms {capture_us:.0f} us | sampled step "
        f"{sampled_us:+.0f} us ({sampled_us / bare_us * 100:.1f} %), gradient-flow norms {flow_us:.0f} us | "
        f"default ~{default_pct:.1f} %, norms alone {norms_pct:.2f} % (training thread, {steps} steps)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    parser.add_argument("--steps", type=int, help="alternations per workload (default: " + str(STEPS) + ")")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as bench_overhead: one core for training
    for name in args.workloads:
        print(measure(name, args.steps or STEPS[name]), flush=True)


if __name__ == "__main__":
    main()
