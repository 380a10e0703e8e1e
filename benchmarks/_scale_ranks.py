"""Synthetic ranks of one data-parallel job, rendered by hooktrace's own Prometheus collector.

Each rank keeps a ``MetricsSnapshot``-shaped state that moves with the wall clock: optimizer steps
of a 12-block transformer (synchronous, so every rank steps at the pace of the slowest one), the
five step phases, the total gradient norm, and per-module times and norms. Rendering goes through
``HooktraceCollector`` with the rank's ``RankChoice`` for ``--module-metrics-ranks``, so metric names,
labels and the step-level cut are exactly the real exporter's.

One rank is a straggler (its busy time is 1.5x the others'; the others wait for it in all-reduce) and
one rank has a gradient spike at a chosen moment. The straggler becomes "known" after a delay, like
the agent's 10 s exchange, and from then on exports per-module series under ``auto``.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from hooktrace._aggregate.snapshot import (
    MODULE_TYPE_BUCKETS,
    PHASE_BUCKETS,
    PHASES,
    STEP_BUCKETS,
    TOTAL,
    Histogram,
    MetricsSnapshot,
    RankInfo,
)
from hooktrace.distributed import RankChoice
from hooktrace.export.prometheus import HooktraceCollector

BLOCKS = 12
MODULES: tuple[tuple[str, str], ...] = (
    ("embed", "Embedding"),
    *((f"blocks.{i}.{part}", kind) for i in range(BLOCKS) for part, kind in (
        ("ln1", "LayerNorm"), ("attn", "MultiheadAttention"), ("ln2", "LayerNorm"), ("mlp", "Sequential"))),
    ("ln_f", "LayerNorm"),
    ("head", "Linear"),
)  # fmt: skip
"""(module label at --depth 3, its type) of a 12-block transformer: 51 labels."""

LEAF_TYPES = ("Embedding", "Linear", "LayerNorm", "GELU", "Dropout", "MultiheadAttention")
"""Module types timed per call (the module-type histograms)."""

SHARES = {"data": 0.05, "forward": 0.30, "backward": 0.55, "optimizer": 0.10}
"""Each phase's share of a rank's busy time (step time minus the all-reduce wait)."""

BUSY_S = 0.2
"""A typical rank's busy time per step."""

MEMORY_BYTES = {
    "parameters": 3 << 30, "gradients": 3 << 30, "optimizer_state": 6 << 30, "activations": 40 << 30,
    "reserved": 60 << 30, "device_total": 80 << 30,
}  # fmt: skip
"""A 1.5 B-parameter model on an 80 GiB GPU (``hooktrace_memory_bytes{kind}`` of a CUDA rank)."""

SAMPLE_EVERY = 10
"""Per-module times come from every 10th step, like ``--sample-every``'s default."""


@dataclass(frozen=True, slots=True)
class JobShape:
    ranks: int
    ranks_per_node: int = 8
    straggler: int = 1
    straggler_factor: float = 1.5
    spike_rank: int = 2
    spike_at_s: float = 30.0
    learn_slowest_after_s: float = 10.0
    module_metrics_ranks: str = "auto"
    run_id: str = "scale-sim"


@dataclass(slots=True)
class _RankState:
    info: RankInfo
    choice: RankChoice
    busy_s: float
    rng: random.Random
    step_hist: Histogram = field(default_factory=lambda: Histogram(STEP_BUCKETS))
    phase_hist: dict[str, Histogram] = field(default_factory=lambda: {p: Histogram(PHASE_BUCKETS) for p in PHASES})
    type_hist: dict[tuple[str, str], Histogram] = field(default_factory=dict)
    module_time: dict[tuple[str, str], tuple[float, int]] = field(default_factory=dict)
    steps: int = 0
    spikes: int = 0
    norm: float = 1.0
    ratio: float = 1.0
    overhead_s: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)
    collector: HooktraceCollector = field(init=False)
    registry: CollectorRegistry = field(init=False)
    rendered: dict[str, tuple[int, bytes, str]] = field(default_factory=dict)
    """content type -> (steps when rendered, body, content type)."""

    def __post_init__(self) -> None:
        self.collector = HooktraceCollector(self.info, self.choice)
        self.registry = CollectorRegistry()
        self.registry.register(self.collector)


class SyntheticJob:
    """``ranks`` ranks whose ``/metrics`` bodies are rendered on demand from the wall clock."""

    def __init__(self, shape: JobShape, start: float | None = None) -> None:
        self.shape = shape
        self.start = time.monotonic() if start is None else start
        self.renders = 0
        self.render_s = 0.0
        self._states = [self._new_rank(rank) for rank in range(shape.ranks)]
        slowest_busy = BUSY_S * shape.straggler_factor
        self.step_s = slowest_busy + 0.01
        """Every rank's step time: the slowest rank's busy time plus the all-reduce itself."""

    def _new_rank(self, rank: int) -> _RankState:
        shape = self.shape
        local = rank % shape.ranks_per_node
        node = f"node-{rank // shape.ranks_per_node:04d}"
        info = RankInfo(shape.run_id, rank, local, shape.ranks, node, "sim", "sim", f"cuda:{local}")
        rng = random.Random(rank)
        busy = BUSY_S * (shape.straggler_factor if rank == shape.straggler else 1.0 + rng.uniform(-0.02, 0.02))
        return _RankState(info, RankChoice(shape.module_metrics_ranks, rank, local, shape.ranks), busy, rng)

    def module_ranks(self) -> list[int]:
        """Ranks exporting per-module series right now."""
        return [s.info.rank for s in self._states if s.choice.includes_this_rank()]

    def render(self, rank: int, accept: str) -> tuple[bytes, str]:
        """The ``/metrics`` body of ``rank`` now, in the format ``accept`` asks for."""
        state = self._states[rank]
        with state.lock:
            began = time.perf_counter()
            elapsed = time.monotonic() - self.start
            self._advance(state, elapsed)
            encoder, content_type = choose_encoder(accept)
            cached = state.rendered.get(content_type)
            if cached is not None and cached[0] == state.steps:
                return cached[1], content_type
            state.collector.update(self._snapshot(state))
            body = encoder(state.registry)
            state.collector.scrape_size_bytes = len(body)
            state.rendered[content_type] = (state.steps, body, content_type)
            self.renders += 1
            self.render_s += time.perf_counter() - began
            return body, content_type

    def _advance(self, state: _RankState, elapsed: float) -> None:
        shape = self.shape
        if elapsed >= shape.learn_slowest_after_s:
            state.choice.slowest_rank = shape.straggler
        target = int(elapsed / self.step_s)
        rng = state.rng
        while state.steps < target:
            state.steps += 1
            step = self.step_s * (1 + rng.gauss(0, 0.01))
            state.step_hist.observe(step)
            for phase, share in SHARES.items():
                state.phase_hist[phase].observe(state.busy_s * share * (1 + rng.gauss(0, 0.02)))
            state.phase_hist["allreduce"].observe(max(step - state.busy_s, 0.0))
            state.overhead_s += 0.002 * step
            spike = state.info.rank == shape.spike_rank and state.spikes == 0 and elapsed >= shape.spike_at_s
            if spike:
                state.spikes += 1
            median = 1.0 / (1 + state.steps / 5000)  # gradients shrink slowly as training converges
            state.norm = median * (80.0 if spike else 1 + rng.gauss(0, 0.05))
            state.ratio = state.norm / median
            if state.steps % SAMPLE_EVERY == 0:
                self._sample_modules(state)

    def _sample_modules(self, state: _RankState) -> None:
        rng = state.rng
        for phase, share in (("forward", SHARES["forward"]), ("backward", SHARES["backward"])):
            for index, (name, _) in enumerate(MODULES):
                total, calls = state.module_time.get((name, phase), (0.0, 0))
                weight = 2.0 if name.endswith(("attn", "mlp")) else 0.3
                seconds = state.busy_s * share * weight / (BLOCKS * 4.6) * (1 + 0.01 * (index % 7))
                state.module_time[(name, phase)] = (total + seconds * (1 + rng.gauss(0, 0.03)), calls + 1)
            for kind in LEAF_TYPES:
                hist = state.type_hist.setdefault((kind, phase), Histogram(MODULE_TYPE_BUCKETS))
                for _ in range(4):
                    hist.observe(rng.lognormvariate(-8, 1.2))

    def _snapshot(self, state: _RankState) -> MetricsSnapshot:
        norms = {TOTAL: state.norm}
        activations: dict[str, int] = {}
        if state.choice.includes_this_rank():  # skip the work the collector would throw away
            norms.update({name: state.norm / 8 * (1 + (i % 5) / 10) for i, (name, _) in enumerate(MODULES)})
            activations = {name: (64 << 20) * (1 + i % 3) for i, (name, _) in enumerate(MODULES)}
        return MetricsSnapshot(
            info=state.info,
            steps_total=state.steps,
            step_duration=state.step_hist.copy(),
            phase_duration={p: h.copy() for p, h in state.phase_hist.items()},
            module_duration=dict(state.module_time),
            module_type_duration={k: h.copy() for k, h in state.type_hist.items()},
            grad_norm=norms,
            grad_norm_ratio=state.ratio,
            grad_spike_steps_total=state.spikes,
            optimizer_steps={"AdamW#0": state.steps},
            dropped={"steps": 0, "trace_events": 0},
            export_errors={"jsonl": 0, "perfetto": 0, "prometheus": 0},
            overhead_seconds_total=state.overhead_s,
            module_labels=len(MODULES),
            module_activation_bytes=activations,
            memory_bytes={
                **MEMORY_BYTES,
                "allocated_peak": int(MEMORY_BYTES["reserved"] * (0.9 + 0.02 * (state.steps % 3))),
            },
        )
