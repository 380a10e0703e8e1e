"""Step-time overhead of hooktrace and of its peers, side by side, as ratios to bare training.

Per workload, the same training step runs bare and under each tool, and the benchmark prints the
median ratio of the tool's per-step time to the bare blocks around it, with a 95% confidence
interval for that median:

- ``hooktrace default``: the default config with its embedded outputs (trace and steps files,
  summary, /metrics);
- ``hooktrace --sample-every 1 --flow-every 0``: per-module timing on every step, gradient-flow
  norms off (the issue's target: below torch.profiler on every workload);
- ``torch.profiler (CPU)``: CPU activities, entered and left around each of its blocks (untimed);
- ``TraceML trace_step``: traceml-ai's default per-step tracing, in its own process (see
  ``_traceml_peer``: its process-wide patches and threads cannot be switched off), when installed;
- ``control: 2nd bare copy`` (``--control``): what the benchmark reports for no overhead.

For each hooktrace mode it also prints what the agent reports about itself (``overhead_ratio``
of summary.json: its time on the training thread, its worker's CPU time while training stood
still and PyTorch's cost of calling its hooks, over its step time), over the same steps, turned
into the same unit as the measured figure (``r / (1 - r)`` over bare), and the ratio of the two: 1.00x = the agent's own
figure is what the clock says.

Why it is built this way (the machine is a noisy, shared 2-core VM; one block's time moves by a
few percent, so a 1% question needs many short, interleaved blocks):

- Identical copies of each workload (``_models.workload`` seeds every copy the same): one bare
  (torch.profiler runs on it too), one per agent config, each agent attached once and warmed up,
  so attach, step 1 (deep, preflight) and the worker's start are never timed: the figure is the
  steady-state cost.
- Blocks of ``--steps`` steps in the order bare, mode, bare, mode, ..., with the mode order
  rotated each round; each mode block is compared with the mean of the bare blocks right before
  and after it, so slow drifts of the machine cancel. Every agent's worker is drained and an
  untimed lead-in of the same copy, of random length, runs before each timed block (see
  ``_lead_in``).
- A block lasts at least ``BLOCK_S``, longer than the worker's poll interval: the worker
  processes steps in bursts, one per poll; a block shorter than a poll holds a burst only
  sometimes, and the median of the blocks' ratios then leaves the worker out (10-step blocks of
  the 1.4 ms MLP read +12% where 150-step blocks read +26%). Steps per block are a multiple of
  10: one sampled step per 10 at the default ``sample_every=10``.
- Nothing of one mode's may land in another's block: workers are drained and asleep before each
  block (``_settle``), torch.profiler's records are freed right after its block (``_block``),
  and TraceML runs in a process of its own.
- The confidence interval is the distribution-free order-statistic interval for a median (the
  ranks come from Binomial(n, 1/2); coverage >= 95% for independent ratios; a mode's ratios share
  no bare block). No resampling, so it is deterministic.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import _traceml_peer
import torch
from _models import workload

import hooktrace
from hooktrace._aggregate.worker import POLL_INTERVAL_S

WORKLOADS = ("mlp", "tiny-transformer", "transformer", "cnn")
ROUNDS = {"mlp": 18, "tiny-transformer": 18, "transformer": 10, "cnn": 18}
"""Rounds per workload (one ratio per mode per round): about 8 minutes in all on a 2-core VM
with TraceML installed (its rounds: ``_traceml_peer.ROUNDS``, ~48 s per workload), 5 without."""
BLOCK_S = 0.25
"""Shortest timed block, in seconds of bare steps (see the module docstring)."""
WARMUP_STEPS = 20
LEAD_IN_S = 0.06
"""Untimed steps of the same copy right before each timed block: at least this long (and >= 2
steps) to warm the caches for that copy (each block follows a block of another copy), plus, for
an agent, a random part of up to one worker poll interval (see ``_lead_in``)."""
QUIET_S = 0.005
"""A worker whose CPU clock stood still this long is asleep (see ``_settle``)."""
DEFAULT = "hooktrace default"
EVERY_STEP = "hooktrace --sample-every 1 --flow-every 0"
PROFILER = "torch.profiler (CPU)"
TRACEML = "TraceML trace_step"
CONTROL = "control: 2nd bare copy"
INSTALL_HINT = "pip install -e '.[bench]'"


@dataclass
class Mode:
    """One kind of timed block: a workload copy, maybe with an agent or under torch.profiler."""

    name: str
    step: Callable[[], None]
    agent: hooktrace.Agent | None = None
    profiled: bool = False
    ratios: list[float] = field(default_factory=list)
    steps_run: int = 0
    run_s: float = 0.0
    """Seconds this copy trained in the timed rounds: its blocks and their lead-ins."""
    overhead_from: float = 0.0
    """The agent's own overhead seconds when the timed rounds began."""
    reported: float | None = None
    """The agent's own overhead ratio over the timed rounds (see ``_check``)."""


@dataclass
class Row:
    """One printed mode: its ratios and, for an agent, its own overhead ratio."""

    ratios: list[float]
    reported: float | None = None
    note: str = ""


@dataclass
class Result:
    """One workload: median bare step time, each mode's row, wall time of the whole."""

    bare_ms: float
    steps: int
    rounds: int
    rows: dict[str, Row]
    seconds: float


def _run(step: Callable[[], None], steps: int) -> float:
    """Seconds for ``steps`` steps."""
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return time.perf_counter() - start


def _settle(agents: list[hooktrace.Agent]) -> None:
    """Wait until every agent's worker has processed every step handed to it and gone back to
    sleep, so that one mode's background work does not land in the next mode's (or a bare) block.

    ``Worker.wait_idle`` compares processed with submitted steps: exact, but the worker then
    still refreshes its snapshot and flushes its files (for a block of sampled MLP steps, tens of
    ms: it slowed the bare blocks that follow an agent's block by ~10 %, and the control read
    -10 %). So this also waits until the worker thread's CPU clock stands still. ``wait_idle``
    wakes the worker, which then sleeps a full poll interval: see ``_lead_in``.
    """
    for agent in agents:
        if not agent.worker.wait_idle(10.0):
            raise RuntimeError("a hooktrace worker did not drain its queue within 10 s")
        _wait_quiet(agent.worker._thread)


def _wait_quiet(thread: threading.Thread, quiet_s: float = QUIET_S, timeout_s: float = 10.0) -> None:
    """Return once ``thread`` has used no CPU for ``quiet_s`` (this thread sleeps meanwhile, so
    a thread that only waits for the GIL gets it and runs)."""
    if thread.ident is None or not thread.is_alive():
        return
    clock = time.pthread_getcpuclockid(thread.ident)
    deadline = time.perf_counter() + timeout_s
    last, still_since = time.clock_gettime_ns(clock), time.perf_counter()
    while time.perf_counter() - still_since < quiet_s:
        time.sleep(quiet_s / 5)
        now = time.clock_gettime_ns(clock)
        if now != last:
            last, still_since = now, time.perf_counter()
        if time.perf_counter() > deadline:
            raise RuntimeError("a hooktrace worker kept running for 10 s after draining its queue")


def _lead_in(rng: random.Random, step_s: float, mode: Mode) -> int:
    """Steps of untimed lead-in: ``LEAD_IN_S``, plus, before an agent's block, a uniformly random
    part of one poll interval.

    After ``_settle`` the worker next wakes one poll interval later, and each wake-up processes
    the steps since the previous one. A random start makes the work inside a block, on average,
    that of the block's own steps (a fixed one would always cut the same share of it off).
    """
    seconds = LEAD_IN_S + (rng.uniform(0.0, POLL_INTERVAL_S) if mode.agent is not None else 0.0)
    return max(2, math.ceil(seconds / step_s))


def _block(mode: Mode, steps: int, lead_in: int, agents: list[hooktrace.Agent]) -> float:
    """Seconds per step of one timed block; settling, lead-in and profiler enter/exit are untimed."""
    _settle(agents)
    mode.run_s += _run(mode.step, lead_in)
    profiler: contextlib.AbstractContextManager[object] = (
        torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
        if mode.profiled
        else contextlib.nullcontext()
    )
    with profiler:
        elapsed = _run(mode.step, steps)
    mode.steps_run += lead_in + steps
    mode.run_s += elapsed
    if mode.profiled:
        # The profile's records are reference cycles: freed at a later garbage collection, ~45 ms
        # on the tiny transformer, which lands in whichever block's allocations trigger it (most
        # often an agent's). Freed here, untimed, like the profiler's enter and exit.
        del profiler
        gc.collect()
    return elapsed / steps


def block_steps(step_s: float) -> int:
    """Steps for a block of at least ``BLOCK_S``: a multiple of 10, at least 10."""
    return max(10, math.ceil(BLOCK_S / step_s / 10) * 10)


def _overhead_s(agent: hooktrace.Agent) -> float:
    """The agent's own overhead seconds so far, the numerator of summary.json's ``overhead_ratio``
    (read after ``_settle`` or ``close``: every step handed over is folded in)."""
    return agent.worker.stats.overhead_s


def measure(name: str, rounds: int, steps: int | None, control: bool) -> Result:
    """Interleaved blocks of every mode on identical copies of workload ``name``."""
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="hooktrace-bench-") as out:
        _, bare_step = workload(name)
        bare = Mode("bare", bare_step)
        modes: list[Mode] = []
        for label, every, flow in ((DEFAULT, 10, 100), (EVERY_STEP, 1, 0)):
            model, step = workload(name)
            # the embedded defaults: trace + steps files, summary checkpoints, a /metrics endpoint
            agent = hooktrace.attach(model, out=f"{out}/{every}", sample_every=every, flow_every=flow)
            modes.append(Mode(label, step, agent))
        modes.append(Mode(PROFILER, bare_step, profiled=True))
        if control:
            modes.append(Mode(CONTROL, workload(name)[1]))
        agents = [mode.agent for mode in modes if mode.agent is not None]
        for mode in modes:
            if not mode.profiled:
                _run(mode.step, WARMUP_STEPS)  # allocator, kernels; an agent's step 1 and worker start
                mode.steps_run += WARMUP_STEPS
        # the agents' workers are still busy with their warm-up steps (step 1, the memory probe):
        # settled first, or the bare step reads slow and the blocks come out too short
        _settle(agents)
        step_s = min(_run(bare_step, WARMUP_STEPS) / WARMUP_STEPS for _ in range(3))
        steps = steps or block_steps(step_s)
        rng = random.Random(0)
        _settle(agents)
        for mode in modes:
            if mode.agent is not None:
                mode.overhead_from = _overhead_s(mode.agent)

        bare_times = [_block(bare, steps, _lead_in(rng, step_s, bare), agents)]
        for index in range(rounds):
            shift = index % len(modes)
            for mode in modes[shift:] + modes[:shift]:
                t = _block(mode, steps, _lead_in(rng, step_s, mode), agents)
                bare_times.append(_block(bare, steps, _lead_in(rng, step_s, bare), agents))
                mode.ratios.append(t / ((bare_times[-2] + bare_times[-1]) / 2))

        for mode in modes:
            if mode.agent is not None:
                _check(mode, mode.steps_run)
    return Result(
        bare_ms=statistics.median(bare_times) * 1e3,
        steps=steps,
        rounds=rounds,
        rows={mode.name: Row(mode.ratios, mode.reported) for mode in modes},
        seconds=time.perf_counter() - began,
    )


def _check(mode: Mode, expected_steps: int) -> None:
    """Close the agent and keep its own overhead ratio over the timed rounds; warn when it saw
    another copy's steps (its optimizer hooks are global), dropped steps or hit hook errors: then
    its figure is not the cost of a normal run.

    The ratio is the agent's overhead seconds over the seconds its copy trained (blocks and
    lead-ins), not over its own ``train_time_s``: a step lasts from the end of the previous one,
    so the first step of each lead-in would count the seconds the other modes ran meanwhile.
    """
    agent = mode.agent
    assert agent is not None
    hook_errors = agent.recorder.hook_errors
    summary = agent.close()
    mode.reported = (_overhead_s(agent) - mode.overhead_from) / mode.run_s if mode.run_s > 0 else None
    problems = []
    if summary.steps != expected_steps:
        problems.append(f"{summary.steps} steps recorded, {expected_steps} run")
    if agent.worker.dropped_steps:
        problems.append(f"{agent.worker.dropped_steps} steps dropped")
    if hook_errors:
        problems.append(f"{hook_errors} hook errors")
    if problems:
        print(f"warning: {mode.name}: {', '.join(problems)}", file=sys.stderr)


def measure_traceml(name: str, rounds: int) -> Row | None:
    """TraceML's row, from its own process (``_traceml_peer``); None (and a warning) when that
    run failed: the other tools' figures still get printed."""
    try:
        peer = _traceml_peer.measure(name, rounds)
    except (RuntimeError, OSError, ValueError, KeyError, subprocess.TimeoutExpired) as exc:
        print(f"warning: {TRACEML}: {exc}", file=sys.stderr)
        return None
    if peer.seen_steps != peer.traced_steps:
        print(
            f"warning: {TRACEML}: its aggregator summarized {peer.seen_steps} steps, {peer.traced_steps} traced",
            file=sys.stderr,
        )
    blocks = f"{len(peer.ratios)} blocks of one {peer.block_s:.1f} s sampler tick"
    note = f"own process: {blocks}, bare {peer.bare_ms:.2f} ms"
    return Row(peer.ratios, note=note)


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


def render(name: str, result: Result) -> str:
    """Header line, then one line per mode: ``  MODE  +x.x% [+lo, +hi]  (agent: self-reported ...)``."""
    lines = [
        f"overhead {name}: bare {result.bare_ms:.2f} ms/step; median [95% CI] over bare of "
        f"{result.rounds} blocks x {result.steps} steps per mode ({result.seconds:.0f} s)"
    ]
    width = max(len(mode) for mode in result.rows)
    for mode, row in result.rows.items():
        median, low, high = median_ci(row.ratios)
        line = f"  {mode:<{width}}  {_pct(median)}% [{_pct(low)}, {_pct(high)}]"
        if row.reported is not None:
            line += f"  self-reported {_self_reported(row.reported, median - 1)}"
        if row.note:
            line += f"  ({row.note})"
        lines.append(line)
    return "\n".join(lines)


def _self_reported(share: float, measured: float) -> str:
    """The agent's ``overhead_ratio`` (a share of its step time) as overhead over bare, and its
    ratio to the measured figure."""
    over_bare = share / (1 - share) if share < 1 else math.inf
    versus = f"{over_bare / measured:.2f}x measured" if measured > 0 else "measured <= 0"
    return f"{over_bare * 100:+.1f}% ({share * 100:.1f}% of its step time; {versus})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--rounds",
        type=int,
        help="rounds for every workload and every tool (one ratio per mode per round); default: "
        + ", ".join(f"{name} {count}" for name, count in ROUNDS.items())
        + f"; TraceML {_traceml_peer.ROUNDS}",
    )
    parser.add_argument(
        "--steps",
        type=int,
        help=f"timed steps per block, a multiple of 10 (default: at least {BLOCK_S} s of bare steps)",
    )
    parser.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    parser.add_argument(
        "--control",
        action="store_true",
        help=f"also time a second bare copy ({CONTROL!r}): the benchmark's own zero, e.g. copy layout",
    )
    parser.add_argument("--no-traceml", action="store_true", help="leave TraceML out even when it is installed")
    args = parser.parse_args()
    if args.steps is not None and (args.steps <= 0 or args.steps % 10):
        parser.error("--steps must be a positive multiple of 10 (one sampled step per 10 at the default)")
    if args.rounds is not None and args.rounds <= 0:
        parser.error("--rounds must be positive")
    traceml_version = None if args.no_traceml else _traceml_peer.version()
    if args.no_traceml:
        print(f"{TRACEML}: skipped (--no-traceml)", flush=True)
    elif traceml_version is None:
        print(f"{TRACEML}: skipped, traceml-ai is not installed ({INSTALL_HINT} adds it)", flush=True)
    # One intra-op thread: the training thread gets one core and the agent's worker thread the other,
    # like a GPU job whose host has idle cores; torch's default (2 threads here) would make the two
    # fight over both cores and the figure would be about this VM, not about the agent.
    torch.set_num_threads(1)
    for name in args.workloads:
        result = measure(name, args.rounds or ROUNDS[name], args.steps, args.control)
        if traceml_version is not None:
            began = time.perf_counter()
            row = measure_traceml(name, args.rounds or _traceml_peer.ROUNDS)
            result.seconds += time.perf_counter() - began
            if row is not None:
                rows = list(result.rows.items())
                rows.insert(3, (f"{TRACEML} (traceml-ai {traceml_version})", row))
                result.rows = dict(rows)
        print(render(name, result), flush=True)


if __name__ == "__main__":
    main()
