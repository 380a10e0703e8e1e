"""Step-time overhead of hooktrace vs bare training and vs torch.profiler, side by side.

Runs the same training step bare, with hooktrace (the default config with its embedded outputs:
trace and steps files, summary, /metrics; and --sample-every 1), and
under torch.profiler (CPU activities), and prints, per workload and mode, the median ratio of the
mode's per-step time to the bare blocks around it, with a 95% confidence interval for that median.

Why it is built this way (the machine is a noisy, shared 2-core VM; one block's time moves by a
few percent, so a 1% question needs many short, interleaved blocks):

- Identical copies of each workload (``_models.workload`` seeds every copy the same): one bare,
  one per agent config, each agent attached once and warmed up, so attach, step 1 (deep,
  preflight) and the worker's start are never timed: the figure is the steady-state cost.
- Blocks of ``--steps`` steps (a multiple of 10: one sampled step per block at the default
  ``sample_every=10``) in the order bare, mode, bare, mode, ..., with the mode order rotated each
  round; each mode block is compared with the mean of the bare blocks right before and after it,
  so slow drifts of the machine cancel. Every agent's worker is drained and an untimed lead-in
  of the same copy, of random length, runs before each timed block (see ``_lead_in``).
- ``--control`` adds a second bare copy as a mode: what the benchmark reports for no overhead.
- The confidence interval is the distribution-free order-statistic interval for a median (the
  ranks come from Binomial(n, 1/2); coverage >= 95% for independent ratios; a mode's ratios share
  no bare block). No resampling, so it is deterministic.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from _models import workload

import hooktrace
from hooktrace._aggregate.worker import POLL_INTERVAL_S

WORKLOADS = ("tiny-transformer", "transformer", "cnn")
ROUNDS = {"tiny-transformer": 80, "transformer": 30, "cnn": 50}
"""Rounds per workload (one ratio per mode per round): about 4-5 minutes in all on a 2-core VM."""
WARMUP_STEPS = 20
LEAD_IN_S = 0.06
"""Untimed steps of the same copy right before each timed block: at least this long (and >= 2
steps) to warm the caches for that copy (each block follows a block of another copy), plus a
random part of up to one worker poll interval (see ``_lead_in``)."""
CONTROL = "control: 2nd bare copy"


@dataclass
class Mode:
    """One kind of timed block: a workload copy, maybe with an agent or under torch.profiler."""

    name: str
    step: Callable[[], None]
    agent: hooktrace.Agent | None = None
    profiled: bool = False
    ratios: list[float] = field(default_factory=list)
    steps_run: int = 0


@dataclass
class Result:
    """One workload: median bare step time, each mode's block ratios, wall time of the whole."""

    bare_ms: float
    ratios: dict[str, list[float]]
    seconds: float


def _run(step: Callable[[], None], steps: int) -> float:
    """Seconds for ``steps`` steps."""
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return time.perf_counter() - start


def _settle(agents: list[hooktrace.Agent]) -> None:
    """Wait until every agent's worker has processed every step handed to it, so that one mode's
    background work does not land in the next mode's (or a bare) block.

    ``Worker.wait_idle`` compares processed with submitted steps: exact. It also wakes the
    worker, which then sleeps a full poll interval: see ``_lead_in``.
    """
    for agent in agents:
        if not agent.worker.wait_idle(10.0):
            raise RuntimeError("a hooktrace worker did not drain its queue within 10 s")


def _lead_in(rng: random.Random, step_s: float) -> int:
    """Steps of untimed lead-in: ``LEAD_IN_S`` plus a uniformly random part of one poll interval.

    After ``_settle`` the worker next wakes one poll interval later. With a fixed lead-in, a block
    shorter than that would never contain the worker's burst (its GIL time would always fall in
    the next, untimed settle) and the agent would be under-counted. A random start puts the burst
    inside a block of length B with probability B / poll, and a burst then processes about a
    poll interval of steps: on average, a block holds the worker's work for B of steps, as in a
    run. (Blocks longer than a poll interval always contain bursts.)
    """
    return max(2, math.ceil((LEAD_IN_S + rng.uniform(0.0, POLL_INTERVAL_S)) / step_s))


def _block(mode: Mode, steps: int, lead_in: int, agents: list[hooktrace.Agent]) -> float:
    """Seconds per step of one timed block; settling, lead-in and profiler enter/exit are untimed."""
    _settle(agents)
    _run(mode.step, lead_in)
    profiler: contextlib.AbstractContextManager[object] = (
        torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
        if mode.profiled
        else contextlib.nullcontext()
    )
    with profiler:
        elapsed = _run(mode.step, steps)
    mode.steps_run += lead_in + steps
    return elapsed / steps


def measure(name: str, rounds: int, steps: int, control: bool) -> Result:
    """Interleaved blocks of every mode on identical copies of workload ``name``."""
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="hooktrace-bench-") as out:
        _, bare_step = workload(name)
        bare = Mode("bare", bare_step)
        modes: list[Mode] = []
        for label, every in (("hooktrace default", 10), ("hooktrace --sample-every 1", 1)):
            model, step = workload(name)
            # the embedded defaults: trace + steps files, summary checkpoints, a /metrics endpoint
            agent = hooktrace.attach(model, out=f"{out}/{every}", sample_every=every)
            modes.append(Mode(label, step, agent))
        modes.append(Mode("torch.profiler", bare_step, profiled=True))
        if control:
            modes.append(Mode(CONTROL, workload(name)[1]))
        agents = [mode.agent for mode in modes if mode.agent is not None]
        for mode in modes:
            if not mode.profiled:
                _run(mode.step, WARMUP_STEPS)  # allocator, kernels; an agent's step 1 and worker start
                mode.steps_run += WARMUP_STEPS
        step_s = _run(bare_step, WARMUP_STEPS) / WARMUP_STEPS
        rng = random.Random(0)

        bare_times = [_block(bare, steps, _lead_in(rng, step_s), agents)]
        for index in range(rounds):
            shift = index % len(modes)
            for mode in modes[shift:] + modes[:shift]:
                t = _block(mode, steps, _lead_in(rng, step_s), agents)
                bare_times.append(_block(bare, steps, _lead_in(rng, step_s), agents))
                mode.ratios.append(t / ((bare_times[-2] + bare_times[-1]) / 2))

        for mode in modes:
            if mode.agent is not None:
                _check(mode, mode.steps_run)
    return Result(
        bare_ms=statistics.median(bare_times) * 1e3,
        ratios={mode.name: mode.ratios for mode in modes},
        seconds=time.perf_counter() - began,
    )


def _check(mode: Mode, expected_steps: int) -> None:
    """Close the agent; warn when it saw another copy's steps (its optimizer hooks are global),
    dropped steps or hit hook errors: then its figure is not the cost of a normal run."""
    agent = mode.agent
    assert agent is not None
    hook_errors = agent.recorder.hook_errors
    summary = agent.close()
    problems = []
    if summary.steps != expected_steps:
        problems.append(f"{summary.steps} steps recorded, {expected_steps} run")
    if agent.worker.dropped_steps:
        problems.append(f"{agent.worker.dropped_steps} steps dropped")
    if hook_errors:
        problems.append(f"{hook_errors} hook errors")
    if problems:
        print(f"warning: {mode.name}: {', '.join(problems)}", file=sys.stderr)


def median_ci(values: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """Median and the order statistics x_(k), x_(n+1-k) around it, with the largest k such that
    P(Binomial(n, 1/2) < k) <= (1 - level) / 2 (min and max when n is too small for that)."""
    xs = sorted(values)
    n = len(xs)
    tail = (1 - level) / 2 * 2**n
    below, k = 0, 0
    while below + math.comb(n, k) <= tail:
        below += math.comb(n, k)
        k += 1
    low = max(k - 1, 0)
    return statistics.median(xs), xs[low], xs[n - 1 - low]


def _pct(ratio: float) -> str:
    return f"{(ratio - 1) * 100:+.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--rounds",
        type=int,
        help="rounds for every workload (one ratio per mode per round); default: "
        + ", ".join(f"{name} {count}" for name, count in ROUNDS.items()),
    )
    parser.add_argument("--steps", type=int, default=10, help="timed steps per block, a multiple of 10")
    parser.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    parser.add_argument(
        "--control",
        action="store_true",
        help=f"also time a second bare copy ({CONTROL!r}): the benchmark's own zero, e.g. copy layout",
    )
    args = parser.parse_args()
    if args.steps <= 0 or args.steps % 10:
        parser.error("--steps must be a positive multiple of 10 (one sampled step per 10 at the default)")
    if args.rounds is not None and args.rounds <= 0:
        parser.error("--rounds must be positive")
    # One intra-op thread: the training thread gets one core and the agent's worker thread the other,
    # like a GPU job whose host has idle cores; torch's default (2 threads here) would make the two
    # fight over both cores and the figure would be about this VM, not about the agent.
    torch.set_num_threads(1)
    for name in args.workloads:
        rounds = args.rounds or ROUNDS[name]
        result = measure(name, rounds, args.steps, args.control)
        cells = []
        for mode, ratios in result.ratios.items():
            median, low, high = median_ci(ratios)
            cells.append(f"{mode}: {_pct(median)}% [{_pct(low)}, {_pct(high)}]")
        print(
            f"overhead {name:<16} bare {result.bare_ms:.2f} ms/step  {'  '.join(cells)}  "
            f"(median [95% CI] of {rounds} blocks x {args.steps} steps, {result.seconds:.0f} s)",
            flush=True,
        )


if __name__ == "__main__":
    main()
