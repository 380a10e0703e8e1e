"""Name the module where a NaN/Inf started in forward, on the step it happened, on any step.

Module outputs are watched on sampled steps only (a reduction per output is too dear for every
step). When a step's gradients went non-finite and the parameter gradients cannot tell where (all
of them went bad: the mark of a NaN made in forward, which every later module carries), the
step's recorded root calls are run once more, before the optimizer touches the parameters, under
``no_grad`` (and the autocast dtype they ran under) with a forward hook on every module noting
which of its inputs and outputs hold NaN/Inf; the first module to make one is named (see
``first_source``). The RNG state and every buffer (e.g. BatchNorm running statistics) are
restored afterwards, so the training's numbers do not change.

This costs one forward per recorded call until one shows the source (one, without gradient
accumulation), only on such a step, and needs the verdict on the host at the optimizer pre-hook:
CPU training (the norms are host floats), or a ``clip``/``raise`` mode, which reads them there
anyway. Elsewhere (CUDA, ``warn``), and for roots that cannot replay (``can_replay``), sampled
steps keep a sum of each module output and a bad step makes the next ones sampled.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map_only

from hooktrace._record.buffer import StepBuffer
from hooktrace._record.hooks import iter_tensors
from hooktrace._record.module_table import ModuleTable
from hooktrace.health.monitor import locate_nonfinite
from hooktrace.health.norms import ParamRef, copy_to_host_async, stack_on_one_device

_COLLECTIVE_TYPES = ("SyncBatchNorm", "FullyShardedDataParallel", "FSDPModule")


def can_replay(root: nn.Module, world_size: int) -> bool:
    """Whether a bad step of ``root`` may run its forward again on this rank alone.

    No when a compiled module is inside (a replay under ``no_grad`` could recompile it), for modules known to
    run collectives in forward (SyncBatchNorm, FSDP), and in a multi-rank job for anything but a
    plain DDP root (its inner module runs no collective): ranks deciding on their own must never
    issue different collectives, which would hang the job.
    """
    if any(hasattr(m, "_orig_mod") for m in root.modules()):
        return False
    if world_size > 1 and not isinstance(root, nn.parallel.DistributedDataParallel):
        return False
    return not any(cls.__name__ in _COLLECTIVE_TYPES for m in root.modules() for cls in type(m).__mro__)


def needs_replay(values: list[float], params: list[ParamRef], present: list[int]) -> bool:
    """A non-finite gradient that the parameter gradients cannot place (see ``locate_nonfinite``)."""
    if math.isfinite(sum(values)):  # norms are >= 0: the sum is finite iff every one is
        return False
    bad = [pos for pos, value in zip(present, values, strict=True) if not math.isfinite(value)]
    return bool(bad) and locate_nonfinite([], [], [], bad, params, present) is None


class ForwardReplay:
    """Replays a bad step's recorded root calls (kept by reference by the step tracker)."""

    def __init__(self, table: ModuleTable, modules: list[nn.Module]) -> None:
        self.table = table
        self.modules = modules

    def run(self, buf: StepBuffer) -> bool:
        """Replay the step's root calls until one shows where a NaN/Inf was made; set
        ``buf.forward_source`` (or ``buf.nonfinite_input``). True when found. Never raises: a
        replay that fails finds nothing."""
        calls, buf.forward_inputs = buf.forward_inputs, []
        try:
            for root_index, args, kwargs, amp in calls:
                if _nan_input(args, kwargs):
                    buf.nonfinite_input = root_index  # the batch itself: no module made it
                    return True
                seen = self._replay_call(root_index, args, kwargs, amp)
                source = first_source(seen) if seen else None
                if source is not None:
                    buf.forward_source = source
                    return True
        except Exception:
            return False
        return False

    def _replay_call(
        self, root_index: int, args: tuple[Any, ...], kwargs: dict[str, Any] | None, amp: torch.dtype | None
    ) -> list[tuple[int, torch.Tensor]] | None:
        """``[(module index, flags), ...]`` in completion order (see ``_watching_hook``)."""
        if kwargs is None:
            return None  # the call on which the root was discovered: its kwargs were not seen
        root = self.modules[root_index]
        target = root
        if isinstance(root, nn.parallel.DistributedDataParallel):
            target = root.module
            if root.device_ids:  # DDP moves the inputs to its device before the inner forward
                device = torch.device(root.device_type, root.device_ids[0])
                args, kwargs = _to_device(args, device), _to_device(kwargs, device)
        indexed = [(info.index, self.modules[info.index]) for info in self.table.infos if info.root == root_index]
        seen: list[tuple[int, torch.Tensor]] = []
        handles = [
            module.register_forward_hook(_watching_hook(index, seen), with_kwargs=True) for index, module in indexed
        ]
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
            return seen or None  # what ran before the error still tells
        finally:
            for handle in handles:
                handle.remove()
            with torch.no_grad():
                for live, saved in buffers:
                    live.copy_(saved)
        return seen


def first_source(seen: list[tuple[int, torch.Tensor]]) -> int | None:
    """The module that made the first NaN/Inf, from the replay's ``(index, flags)`` in completion
    order (children before their containers, so the innermost comes first). A module *made* one
    when its output holds a NaN its inputs did not, or an Inf while its inputs were all finite; a
    container qualifies when no module inside it did (its own code made it). An output whose only
    non-finite values are ``-inf`` is considered last: that is what masks are made of (and what a
    ``log(0)`` gives). None when no module made one."""
    rows: list[list[float]] = _read(stack_on_one_device([flags for _, flags in seen]))
    for allow_minus_inf in (False, True):
        for (index, _), (in_nan, in_bad, out_nan, out_pinf, out_ninf) in zip(seen, rows, strict=True):
            made_nan = out_nan and not in_nan
            made_inf = (out_pinf or (out_ninf and allow_minus_inf)) and not in_bad
            if made_nan or made_inf:
                return index
    return None


def _to_device(value: Any, device: torch.device) -> Any:
    """Tensors in any (nested) container moved to ``device``, as DDP does to inputs."""
    return tree_map_only(torch.Tensor, lambda tensor: tensor.to(device), value)


def _read(tensor: torch.Tensor) -> Any:
    """``tolist()`` of a (device) tensor through one copy to pinned memory and its event, as the
    guard reads norms: ``.tolist()`` on a CUDA tensor is a sync that ``set_sync_debug_mode``
    reports (the replay runs on the training thread, on a bad step, in ``clip``/``raise`` mode)."""
    host, ready = copy_to_host_async(tensor)
    if ready is not None:
        ready.synchronize()
    return host.tolist()


def _floating(values: list[Any]) -> list[torch.Tensor]:
    return [t.detach() for v in values for t in iter_tensors(v) if t.is_floating_point() and t.layout == torch.strided]


def _nan_input(args: tuple[Any, ...], kwargs: dict[str, Any] | None) -> bool:
    """Whether a floating-point input already holds a NaN (one transfer). Infinities do not
    count: additive attention masks carry ``-inf`` on purpose."""
    tensors = _floating([*args, *(kwargs or {}).values()])
    if not tensors:
        return False
    return any(_read(stack_on_one_device([torch.isnan(t).any() for t in tensors])))


def _watching_hook(index: int, seen: list[tuple[int, torch.Tensor]]) -> Any:
    """Forward hook of the replay: [inputs hold a NaN, inputs hold a NaN/Inf, output holds a NaN,
    +inf, -inf] for the first floating output, as one device tensor (read once, at the end)."""

    def hook(module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        first = next(iter_tensors(output), None)
        if first is None or not first.is_floating_point() or first.layout != torch.strided:
            return None
        first = first.detach()
        flags = [torch.zeros(2, device=first.device)]
        for t in _floating([*args, *kwargs.values()]):
            flags.append(torch.stack([torch.isnan(t).any(), (~torch.isfinite(t)).any()]).float().to(first.device))
        out = torch.stack([torch.isnan(first).any(), torch.isposinf(first).any(), torch.isneginf(first).any()])
        seen.append((index, torch.cat([torch.stack(flags).amax(dim=0), out.float()])))
        return None

    return hook
