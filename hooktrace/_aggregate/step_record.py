"""One aggregated optimizer step: what every exporter consumes.

Built on the worker thread from a :class:`StepBuffer`: stamps resolved to host nanoseconds, marks
turned into phases, module events into nested intervals, gradient norms into a health verdict.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class ModuleSpan:
    """One call of one module in one phase (sampled steps), on the host monotonic clock."""

    index: int
    module: str
    """Display name (``named_modules`` name, wrapper prefixes removed)."""
    label: str
    """Metric label (cut to --depth, or ``__other__``)."""
    module_type: str
    phase: str
    """forward, backward, eval or recompute."""
    start_ns: int
    end_ns: int
    self_ns: int
    depth: int
    parent: int
    """Module index of the parent module (-1 for a root)."""
    activation_bytes: int | None = None
    """Forward-kind spans with ``--memory on``: bytes of the tensors this call and its children
    saved for backward (parameters excluded, each storage once); None when not measured."""
    self_activation_bytes: int | None = None
    """The part of ``activation_bytes`` that no child saved."""
    allocated_delta: int | None = None
    """CUDA: the allocator's allocated bytes after the call minus before it."""


@dataclass(slots=True)
class StepEvent:
    """A health or agent event of a step (steps.jsonl ``events``, span events, counters)."""

    kind: str
    """grad_spike, nonfinite, grad_clip, amp_skip, hook_error."""
    module: str
    phase: str
    value: float | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "module": self.module, "phase": self.phase, "value": self.value}
        out.update(self.detail)
        return out


@dataclass(slots=True)
class StepRecord:
    """Everything known about one step of one rank."""

    step: int
    rank: int
    sampled: bool
    start_ns: int
    end_ns: int
    wall_start_ns: int
    """``start_ns`` on the wall clock (ns since the epoch), for spans and trace files."""
    phases: dict[str, float]
    phase_spans: list[tuple[str, int, int]]
    """``(phase, start_ns, end_ns)`` on the host monotonic clock, covering the step."""
    micro_batches: int
    optimizer_steps: int
    skipped: bool = False
    grad_norm: float | None = None
    grad_norm_ratio: float | None = None
    module_grad_norms: dict[str, float] = field(default_factory=dict)
    param_grad_norms: dict[str, float] = field(default_factory=dict)
    output_grad_norms: dict[str, float] = field(default_factory=dict)
    """Sampled steps: ‖grad_output‖ per module label (largest over calls): the gradient flow."""
    buffer_norms: dict[str, float] = field(default_factory=dict)
    """Sampled steps: norms of floating-point buffers (BatchNorm running statistics, ...)."""
    spans: list[ModuleSpan] = field(default_factory=list)
    events: list[StepEvent] = field(default_factory=list)
    trace_id: str | None = None
    overhead_s: float = 0.0
    optimizer: str | None = None
    """Name(s) of the optimizer(s) that stepped (``Adam#0``; several joined by ``,``); None when
    steps come from backward alone (a loop without torch.optim)."""
    grads_captured: bool = False
    """Gradient norms were read this step (``grad_norm`` None then means non-finite)."""
    clipped_by_script: bool = False
    """The script changed the gradients in place after backward, before the optimizer step
    (clip_grad_norm_, clip_grad_value_, ...); the norms above are from before that."""
    closure: bool = False
    """Forward and backward ran inside ``optimizer.step(closure)`` (Lightning, LBFGS)."""
    partial: bool = False
    """The run ended inside this step (no optimizer step, no backward boundary): not a step."""
    compiled: bool = False
    """torch.compile compiled a graph during this step: its times are not steady state."""
    activation_bytes: int | None = None
    """Sampled steps with ``--memory on``: bytes saved for backward by the module calls of the
    step's largest forward-backward (``_aggregate/memory.py``)."""
    module_bytes: dict[tuple[int, str], tuple[int, int]] = field(default_factory=dict)
    """(module index, phase) -> (inclusive, self) activation bytes in this step."""
    label_bytes: dict[str, int] = field(default_factory=dict)
    """Metric label -> activation bytes of the training forward calls it stands for."""
    cuda_memory: dict[str, tuple[int, int]] = field(default_factory=dict)
    """CUDA: phase -> (allocated peak, reserved peak) bytes, from the allocator's counters."""
    unmeasured_saves: int = 0
    """Saved tensors whose storage could not be read (tensor subclasses without storage)."""

    @property
    def duration_s(self) -> float:
        return max(0, self.end_ns - self.start_ns) / 1e9

    def as_json(self) -> dict[str, Any]:
        """The steps.jsonl object of DESIGN §7."""
        out: dict[str, Any] = {
            "step": self.step,
            "rank": self.rank,
            "duration_s": round(self.duration_s, 9),
            "phases": {k: round(v, 9) for k, v in self.phases.items()},
            "micro_batches": self.micro_batches,
            "optimizer_steps": self.optimizer_steps,
            "sampled": self.sampled,
            "events": [event.as_json() for event in self.events],
        }
        if self.grads_captured:
            out["grad_norm"] = self.grad_norm
            out["grad_norm_ratio"] = self.grad_norm_ratio
        if self.optimizer:
            out["optimizer"] = self.optimizer
        if self.clipped_by_script:
            out["clipped_by_script"] = True
        if self.closure:
            out["closure"] = True
        if self.partial:
            out["partial"] = True
        if self.compiled:
            out["compiled"] = True
        if self.module_grad_norms and (self.sampled or self.events):  # the total every step, detail where looked at
            out["module_grad_norms"] = self.module_grad_norms
        if self.param_grad_norms:  # every parameter on sampled steps; --watch parameters every step
            out["param_grad_norms"] = self.param_grad_norms
        if self.output_grad_norms:
            out["output_grad_norms"] = self.output_grad_norms
        if self.buffer_norms:
            out["buffer_norms"] = self.buffer_norms
        if self.skipped:
            out["skipped"] = True
        if self.trace_id:
            out["trace_id"] = self.trace_id
        if self.activation_bytes is not None:
            out["activation_bytes"] = self.activation_bytes
        if self.cuda_memory:
            out["memory"] = {
                phase: {"allocated_peak": peak, "reserved_peak": reserved}
                for phase, (peak, reserved) in self.cuda_memory.items()
            }
        return out
