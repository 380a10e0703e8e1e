"""The per-step buffer the hooks append to, and the raw step handed to the worker.

Hooks only append tuples to ``events`` and ``marks``; the tracker swaps in a fresh buffer at each
step boundary and queues the old one. Nothing here is shared with the worker until it is queued.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Module events: (kind, module index, call number, stamp). Stamps come from the step's clock.
FWD_TRAIN = 0
"""Forward pre-hook of a call with grad enabled (a training forward)."""
FWD_EVAL = 1
"""Forward pre-hook of a call under ``torch.no_grad``/``inference_mode`` (kept apart from training)."""
FWD_RECOMPUTE = 2
"""Forward pre-hook while autograd runs a backward: activation-checkpoint recompute."""
FWD_END = 3
"""Forward post-hook (``always_call=True``: also when forward raised)."""
BWD_START = 4
"""Gradient w.r.t. a module output arrived: the module's backward begins."""
BWD_END = 5
"""Gradient w.r.t. a module input is complete: the module's backward is done."""

FORWARD_KIND_PHASE = {FWD_TRAIN: "forward", FWD_EVAL: "eval", FWD_RECOMPUTE: "recompute"}

# Step marks: (mark, perf_counter_ns), recorded every step.
M_FWD = 0
M_EVAL = 1
M_EVAL_END = 2
M_BWD = 3
M_BWD_END = 4
M_OPT = 5
M_OPT_END = 6
M_AR_END = 8
"""A bucket's all-reduce completed (recorded on the communication thread)."""

MAX_EVENTS_PER_STEP = 1_000_000
"""Beyond this many module events in one step, events are dropped and counted."""


@dataclass(slots=True)
class StepBuffer:
    """What the training thread recorded during one optimizer step."""

    number: int
    sampled: bool
    start_ns: int
    flow: bool = False
    memory: bool = False
    """Activation-memory step (``--memory on``, a sampled step on the ``--memory-every`` cadence):
    module forwards count the bytes they save for backward."""
    """Gradient-flow step (``--flow-every``): module output/input gradient norms are read."""
    events: list[tuple[int, int, int, Any]] = field(default_factory=list)
    marks: list[tuple[int, int]] = field(default_factory=list)
    calls: dict[int, int] = field(default_factory=dict)
    tensor_hooks: dict[int, Any] = field(default_factory=dict)
    """id(tensor) -> (weakref, [(kind, module, call)]): one gradient hook per tensor per step."""
    anchor: tuple[Any, int] | None = None
    clock: Any = None
    """The clock that made this step's stamps (resolves them on the worker)."""
    micro_batches: int = 0
    optimizer_steps: int = 0
    end_ns: int = 0
    skipped: bool = False
    """Backward ran but no optimizer stepped (e.g. GradScaler found inf); closed at the next forward."""
    captures: dict[str, Any] = field(default_factory=dict)
    """Optimizer name -> its ``health.norms.NormCapture``: the norms of the gradients it updated,
    as backward produced them (``""``: a step found by backward alone, no optimizer)."""
    backward_capture: Any = None
    """The norms read at the end of this step's last backward (every parameter with a gradient)."""
    optimizers: list[str] = field(default_factory=list)
    """Names of the optimizers that stepped (``Adam#0``), in order."""
    closure: bool = False
    """Forward and backward ran inside ``optimizer.step(closure)`` (Lightning, LBFGS)."""
    clipped_by_script: bool = False
    """The gradients changed in place between their capture and the optimizer step (clipping)."""
    partial: bool = False
    """The run ended inside this step: no optimizer step closed it."""
    compiled: bool = False
    """torch.compile compiled a graph during this step."""
    health: Any = None
    """Synchronous health verdict (clip/raise modes), computed at the optimizer pre-hook."""
    hook_ns: int = 0
    """Time spent inside module hook bodies this step (measured on entry and exit)."""
    overhead_ns: int = 0
    """Measured time in hooktrace's heavier training-thread work (registration, norms, close)."""
    hook_errors: int = 0
    """Hook errors counted during this step (a ``hook_error`` event when non-zero)."""
    dropped_events: int = 0
    output_grad_norms: list[tuple[int, Any]] = field(default_factory=list)
    """Sampled steps: ‖grad_output‖ per module call, in backward order (0-dim device tensors; on
    CUDA a ``health.norms.HostCopy`` of them once the step closed)."""
    input_grad_norms: list[tuple[int, Any]] = field(default_factory=list)
    """Sampled steps: ‖grad_input‖ per module call, in backward order."""
    pending_outputs: list[tuple[int, Any]] = field(default_factory=list)
    """Sampled steps: module outputs of the running forward, checked when the root's forward ends."""
    output_norms: list[tuple[int, Any]] = field(default_factory=list)
    """Sampled steps: sum of each module output, in forward completion order (finiteness check)."""
    comm_stamps: list[Any] = field(default_factory=list)
    """CUDA: events recorded as each DDP bucket's all-reduce completed (become ``M_AR_END``)."""
    buffer_norms: Any = None
    """Sampled steps: (stacked norms of floating-point buffers, their names)."""
    forward_inputs: list[tuple[int, tuple[Any, ...], dict[str, Any] | None, Any]] = field(default_factory=list)
    """(root index, args, kwargs, autocast dtype or None) of the step's training forwards, kept (by
    reference) until the optimizer step when a forward NaN can be replayed there (health/replay.py)."""
    forward_source: int | None = None
    """Module where a forward replay saw the first NaN/Inf made (health/replay.py)."""
    nonfinite_input: int | None = None
    """Root whose input (the batch) already held a NaN, found by a forward replay."""
    saved_calls: list[Any] = field(default_factory=list)
    """Sampled steps: ``[module, call, kind, parent position, len(marks) then, [(storage address,
    bytes), ...], CUDA allocated delta]`` per module call whose saves were counted (_record/memory.py)."""
    saved_params: frozenset[int] = frozenset()
    """Sampled steps: storage addresses of the parameters and buffers (their saves are not activations)."""
    cuda_memory: dict[str, tuple[int, int]] = field(default_factory=dict)
    """CUDA: phase -> (allocated peak, reserved peak) in bytes, read from the allocator's counters."""
    grad_present: list[int] = field(default_factory=list)
    """Positions (in the parameter list) of the parameters whose norms the step's verdict read
    (set when ``captures`` are merged, see ``health.norms.merge_captures``)."""
