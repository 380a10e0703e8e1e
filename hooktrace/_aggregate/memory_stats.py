"""Where a rank's memory goes: parameters, gradients, optimizer state, activations (worker thread).

Parameter and gradient bytes are static (a trainable parameter's gradient is as large as the
parameter); optimizer-state bytes are read from ``optimizer.state`` of the optimizers that stepped,
on the worker, never on the training thread: the tensors of each parameter's state (Adam's
``exp_avg`` and ``exp_avg_sq``), 0-dim bookkeeping such as ``step`` left out. Each is attributed to
the module that owns the parameter. Activation bytes come from the sampled steps.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

from hooktrace._aggregate.step_record import StepRecord
from hooktrace._record.module_table import ModuleTable

KINDS = ("parameters", "gradients", "optimizer_state", "activations")
"""``hooktrace_memory_bytes{kind}`` everywhere; on CUDA also ``allocated_peak``, ``reserved`` and
``device_total``."""


def _nbytes(tensor: torch.Tensor) -> int:
    return int(tensor.numel()) * tensor.element_size()


class StaticMemory:
    """Parameter, gradient and optimizer-state bytes per module. Worker thread (or after it stopped)."""

    def __init__(self, table: ModuleTable) -> None:
        self.table = table
        self._optimizers: weakref.WeakSet[torch.optim.Optimizer] = weakref.WeakSet()
        self._last: Any = None
        self._cache: tuple[Any, dict[int, list[int]]] | None = None
        self._params: tuple[int, list[torch.Tensor]] = (-1, [])
        """(table size, its parameters): rebuilt only when modules were added."""

    def saw(self, optimizer: torch.optim.Optimizer) -> None:
        """Training thread, at each optimizer step: one identity test on the usual call."""
        if optimizer is not self._last:
            self._last = optimizer
            self._optimizers.add(optimizer)

    def per_module(self) -> dict[int, list[int]]:
        """module index -> [parameter, gradient, optimizer-state bytes] (modules owning parameters);
        recomputed when the table, a parameter's ``requires_grad`` or dtype (gradual unfreezing,
        ``model.half()``), or an optimizer's state changed size."""
        try:
            optimizers = list(self._optimizers)
        except RuntimeError:  # one was added meanwhile (training thread)
            optimizers = []
        key = (
            len(self.table.infos),
            [(param.requires_grad, param.dtype) for param in self._all_params()],
            [(id(opt), len(opt.state)) for opt in optimizers],
        )
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        owner: dict[int, int] = {}
        out: dict[int, list[int]] = {}
        for info in list(self.table.infos):
            for _, param in info.params:
                owner[id(param)] = info.index
                entry = out.setdefault(info.index, [0, 0, 0])
                size = _nbytes(param)
                entry[0] += size
                if param.requires_grad:
                    entry[1] += size
        for opt in optimizers:
            try:
                states = list(opt.state.items())
            except RuntimeError:  # changed size while read (its first step): read it next time
                return self._cache[1] if self._cache is not None else out
            for owned, state in states:
                index = owner.get(id(owned))
                if index is None or not isinstance(state, dict):
                    continue
                for value in list(state.values()):
                    if isinstance(value, torch.Tensor) and value.dim() > 0:
                        out[index][2] += _nbytes(value)
        self._cache = (key, out)
        return out

    def _all_params(self) -> list[torch.Tensor]:
        infos = self.table.infos
        if self._params[0] != len(infos):
            self._params = (len(infos), [param for info in list(infos) for _, param in info.params])
        return self._params[1]

    def totals(self) -> dict[str, int]:
        sums = [0, 0, 0]
        for entry in self.per_module().values():
            for i in range(3):
                sums[i] += entry[i]
        return {"parameters": sums[0], "gradients": sums[1], "optimizer_state": sums[2]}


@dataclass(slots=True)
class MemoryStats:
    """The memory part of a rank's aggregates, folded in once per step on the worker."""

    static: StaticMemory | None = None
    device_total: int | None = None
    """CUDA: the device's memory in bytes."""
    activations: list[int] = field(default_factory=list)
    """Activation bytes of the most recent sampled steps (at most ``RECENT``)."""
    activations_max: int = 0
    label_bytes: dict[str, int] = field(default_factory=dict)
    """Metric label -> activation bytes in the last sampled step (the gauge)."""
    cuda_last: dict[str, tuple[int, int]] = field(default_factory=dict)
    """Phase -> (allocated peak, reserved peak) of the last step."""
    cuda_max: dict[str, tuple[int, int]] = field(default_factory=dict)
    """Phase -> the largest peaks over the run."""
    unmeasured_saves: int = 0

    RECENT = 256

    def add(self, record: StepRecord) -> None:
        if record.activation_bytes is not None:
            self.activations.append(record.activation_bytes)
            if len(self.activations) > self.RECENT:
                del self.activations[0]
            self.activations_max = max(self.activations_max, record.activation_bytes)
            self.label_bytes = dict(record.label_bytes)
            self.unmeasured_saves += record.unmeasured_saves
        if record.cuda_memory:
            self.cuda_last = dict(record.cuda_memory)
            for phase, (peak, reserved) in record.cuda_memory.items():
                old = self.cuda_max.get(phase, (0, 0))
                self.cuda_max[phase] = (max(old[0], peak), max(old[1], reserved))

    def gauges(self) -> dict[str, int]:
        """``hooktrace_memory_bytes{kind}``: the static figures, the last sampled step's activations,
        and on CUDA the last step's allocated peak and reserved peak."""
        out: dict[str, int] = dict(self.static.totals()) if self.static is not None else {}
        if self.activations:
            out["activations"] = self.activations[-1]
        if self.cuda_last:
            out["allocated_peak"] = max(peak for peak, _ in self.cuda_last.values())
            out["reserved"] = max(reserved for _, reserved in self.cuda_last.values())
        if self.device_total:
            out["device_total"] = self.device_total
        return out

    def summary(self, device: str) -> dict[str, Any]:
        """A rank's ``memory`` entry in ``summary.json``."""
        if self.static is None and not self.activations:
            return {"measured": "nothing (--memory off)"}
        out: dict[str, Any] = dict(self.static.totals()) if self.static is not None else {}
        ordered = sorted(self.activations)
        out["activations"] = ordered[len(ordered) // 2] if ordered else None
        out["activations_max"] = self.activations_max if ordered else None
        out["measured"] = (
            "activations, parameters, gradients, optimizer state; CUDA allocator peaks per phase"
            if device == "cuda"
            else "activations (bytes saved for backward), parameters, gradients, optimizer state; "
            "no allocator counters on CPU"
        )
        if self.cuda_max:
            out["cuda"] = {
                "device_total": self.device_total,
                "phases": {
                    phase: {"allocated_peak": peak, "reserved_peak": reserved}
                    for phase, (peak, reserved) in self.cuda_max.items()
                },
            }
        if self.unmeasured_saves:
            out["unmeasured_saves"] = self.unmeasured_saves
        if self.static is not None:
            infos = self.static.table.infos
            out["modules"] = [
                {
                    "module": infos[index].display,
                    "parameter_bytes": entry[0],
                    "gradient_bytes": entry[1],
                    "optimizer_state_bytes": entry[2],
                }
                for index, entry in sorted(self.static.per_module().items())
                if any(entry)
            ]
        return out
