"""The immutable view of a rank's metrics that the worker swaps in after every step.

Exporters read a snapshot; they never see the hot path's buffers. The Prometheus collector renders
the latest snapshot at scrape time (cheap writes, work at read time).
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field

STEP_BUCKETS: tuple[float, ...] = tuple(0.001 * 2**k for k in range(17))
"""Step and phase histogram upper bounds: x2 from 1 ms to ~64 s."""

PHASE_BUCKETS: tuple[float, ...] = ()
"""Phase histograms have no finite buckets (only ``+Inf``, ``_sum`` and ``_count``): every rank
exports five of them, and dashboards and rules read only their ``_sum`` and ``_count`` (README
"Scale"). The step histogram keeps its buckets for its p90."""

MODULE_TYPE_BUCKETS: tuple[float, ...] = tuple(1e-6 * 4**k for k in range(13))
"""Per-module-type histogram upper bounds: x4 from 1 us to ~16 s."""

PHASES: tuple[str, ...] = ("data", "forward", "backward", "optimizer", "allreduce")
"""Step phases of DESIGN §4 (``eval`` and ``recompute`` appear at module level only)."""

TOTAL = "__total__"
"""The ``module`` label value of the whole model's gradient norm."""

OTHER = "__other__"
"""The ``module`` label value of every module beyond ``--max-modules``."""


@dataclass(slots=True)
class Histogram:
    """Per-bucket (not cumulative) counts, plus +Inf, sum and count; owned by the worker."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    sum: float = 0.0
    count: int = 0
    exemplar: tuple[str, float] | None = None
    """(trace_id hex, value) of the latest sampled observation, for OpenMetrics exemplars."""

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    def bucket_of(self, value: float) -> int:
        """Index of the bucket ``value`` falls into (``le`` is inclusive); the last is +Inf (NaN too)."""
        return bisect_left(self.bounds, value) if value == value else len(self.bounds)

    def observe(self, value: float, trace_id: str | None = None) -> None:
        """Add one observation; the last slot is the +Inf bucket."""
        self.counts[self.bucket_of(value)] += 1
        self.sum += value
        self.count += 1
        if trace_id is not None:
            self.exemplar = (trace_id, value)

    def cumulative(self) -> list[tuple[str, int]]:
        """``[(le, cumulative count), ...]`` ending with ``+Inf``, as Prometheus wants."""
        out: list[tuple[str, int]] = []
        running = 0
        for bound, n in zip(self.bounds, self.counts, strict=False):
            running += n
            out.append((repr(float(bound)), running))
        out.append(("+Inf", running + self.counts[-1]))
        return out

    def copy(self) -> Histogram:
        return Histogram(self.bounds, list(self.counts), self.sum, self.count, self.exemplar)


@dataclass(frozen=True, slots=True)
class RankInfo:
    """Labels of ``hooktrace_info`` and of every series (run_id, rank)."""

    run_id: str
    rank: int
    local_rank: int
    world_size: int
    node: str
    version: str
    torch_version: str
    device: str


@dataclass(frozen=True, slots=True)
class MetricsSnapshot:
    """Everything DESIGN §4 exposes, as of the last aggregated step. Keys are label values."""

    info: RankInfo
    steps_total: int = 0
    step_duration: Histogram = field(default_factory=lambda: Histogram(STEP_BUCKETS))
    phase_duration: dict[str, Histogram] = field(default_factory=dict)
    module_duration: dict[tuple[str, str], tuple[float, int]] = field(default_factory=dict)
    """(module, phase) -> (sum seconds, count)."""
    module_type_duration: dict[tuple[str, str], Histogram] = field(default_factory=dict)
    """(module_type, phase) -> histogram."""
    grad_norm: dict[str, float] = field(default_factory=dict)
    """module -> latest finite norm; ``__total__`` is the whole model."""
    grad_norm_ratio: float | None = None
    grad_spike_steps_total: int = 0
    nonfinite_grad_steps_total: int = 0
    nonfinite_events: dict[tuple[str, str], int] = field(default_factory=dict)
    """(module, phase) -> count."""
    grad_clips: dict[str, int] = field(default_factory=dict)
    optimizer_steps: dict[str, int] = field(default_factory=dict)
    """Steps per optimizer name (``Adam#0``): which optimizer stepped (several optimizers: a GAN)."""
    amp_skipped_steps_total: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    """what -> count (steps, trace_events, spans, module_labels, ...)."""
    hook_errors_total: int = 0
    export_errors: dict[str, int] = field(default_factory=dict)
    """exporter -> count."""
    overhead_seconds_total: float = 0.0
    module_labels: int = 0
    """Distinct module label values in use (capped at ``--max-modules``)."""
    modules_truncated: int = 0
    """Modules folded into ``__other__`` because of ``--max-modules``."""
    module_activation_bytes: dict[str, int] = field(default_factory=dict)
    """module label -> bytes saved for backward in the last sampled step (``--memory on``)."""
    memory_bytes: dict[str, int] = field(default_factory=dict)
    """kind -> bytes: parameters, gradients, optimizer_state, activations (+ CUDA allocated_peak,
    reserved, device_total)."""
