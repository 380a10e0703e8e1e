"""Name the module where a NaN/Inf started in forward, on the step it happened, on any step.

Module outputs are watched on sampled steps only (a reduction per output is too dear for every
step). When a step's gradients went non-finite and the parameter gradients cannot tell where (all
of them went bad: the mark of a NaN made in forward, which every later module carries), the
step's recorded root calls are run once more, before the optimizer touches the parameters, under
``no_grad`` with a forward hook summing each module's first floating output. The first module to
complete with a non-finite sum is where the NaN started. The RNG state and every buffer (e.g.
BatchNorm running statistics) are restored afterwards, so the training's numbers do not change.

This costs one forward, only on such a step, and needs the verdict on the host at the optimizer
pre-hook: CPU training (the norms are host tensors), or a ``clip``/``raise`` mode, which reads
them there anyway. Elsewhere (CUDA, ``warn``) sampled steps keep their output sums and a bad
step makes the next ones sampled. Not replayed: models with collectives inside forward (FSDP,
SyncBatchNorm), where one rank replaying alone could hang the job; root calls whose keyword
arguments were not seen (the call on which a root was discovered).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from hooktrace._record.buffer import StepBuffer
from hooktrace._record.hooks import iter_tensors
from hooktrace._record.module_table import ModuleTable
from hooktrace.health.monitor import locate_nonfinite
from hooktrace.health.norms import ParamRef

_COLLECTIVE_TYPES = ("SyncBatchNorm", "FullyShardedDataParallel", "FSDPModule")


def replayable(modules: Sequence[nn.Module]) -> bool:
    """False when a forward runs collectives, which one rank must not run on its own."""
    return not any(cls.__name__ in _COLLECTIVE_TYPES for m in modules for cls in type(m).__mro__)


def host_norms(buf: StepBuffer) -> list[float] | None:
    """The step's per-parameter norms as host floats when they are already on the host (CPU:
    ``GradNormCapture`` made them floats); None where reading them would wait for the device."""
    norms = buf.grad_norms
    return norms if isinstance(norms, list) else None


def needs_replay(values: list[float], params: list[ParamRef], present: list[int]) -> bool:
    """A non-finite gradient that the parameter gradients cannot place (see ``locate_nonfinite``)."""
    if math.isfinite(sum(values)):  # norms are >= 0: the sum is finite iff every one is
        return False
    bad = [pos for pos, value in zip(present, values, strict=True) if not math.isfinite(value)]
    return bool(bad) and locate_nonfinite([], [], [], bad, params, present) is None


class ForwardReplay:
    """Keeps each step's root calls (references, no copies) and replays them on a bad step."""

    def __init__(self, table: ModuleTable, modules: list[nn.Module]) -> None:
        self.table = table
        self.modules = modules

    def run(self, buf: StepBuffer) -> bool:
        """Replay the step's root calls until one yields a non-finite module output; put the
        output sums of that call in ``buf.output_norms``. True when a source was found."""
        calls, buf.forward_inputs = buf.forward_inputs, []
        for root_index, args, kwargs, amp in calls:
            if _nonfinite_input(args, kwargs):
                buf.nonfinite_input = root_index  # the batch itself: no module made it
                return True
            sums = self._replay_call(root_index, args, kwargs, amp)
            if sums is not None and any(not math.isfinite(float(value)) for _, value in sums):
                buf.output_norms = sums
                return True
        return False

    def _replay_call(
        self, root_index: int, args: tuple[Any, ...], kwargs: dict[str, Any] | None, amp: torch.dtype | None
    ) -> list[tuple[int, torch.Tensor]] | None:
        if kwargs is None:
            return None
        root = self.modules[root_index]
        target = root.module if isinstance(root, nn.parallel.DistributedDataParallel) else root
        indexed = [(info.index, self.modules[info.index]) for info in self.table.infos if info.root == root_index]
        if not replayable([m for _, m in indexed]) or hasattr(target, "_orig_mod"):
            return None  # collectives inside, or a compiled model (a replay could recompile it)
        sums: list[tuple[int, torch.Tensor]] = []
        handles = [module.register_forward_hook(_summing_hook(index, sums)) for index, module in indexed]
        buffers = [(b, b.detach().clone()) for b in target.buffers()]
        devices = sorted({p.device.index or 0 for p in target.parameters() if p.is_cuda})
        device_type = "cuda" if devices else "cpu"
        try:
            with (
                torch.random.fork_rng(devices=devices),
                torch.no_grad(),
                torch.autocast(device_type, dtype=amp, enabled=amp is not None),
            ):
                target(*args, **kwargs)
        except Exception:
            return sums or None  # what ran before the error still tells
        finally:
            for handle in handles:
                handle.remove()
            with torch.no_grad():
                for live, saved in buffers:
                    live.copy_(saved)
        return sums


def _nonfinite_input(args: tuple[Any, ...], kwargs: dict[str, Any] | None) -> bool:
    values = list(args) + list((kwargs or {}).values())
    with torch.no_grad():
        return any(not bool(torch.isfinite(t).all()) for v in values for t in iter_tensors(v) if t.is_floating_point())


def _summing_hook(index: int, sums: list[tuple[int, torch.Tensor]]) -> Any:
    def hook(module: nn.Module, args: Any, output: Any) -> None:
        first = next(iter_tensors(output), None)
        if first is not None and first.is_floating_point():
            sums.append((index, first.detach().sum(dtype=torch.float32)))
        return None

    return hook
