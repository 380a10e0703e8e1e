"""Gradient norms, once per step at the optimizer pre-hook: one ``_foreach_norm``, one copy.

The training thread launches the norm kernels and a non-blocking device-to-host copy; the worker
reads the host tensor after the copy's event completed (a step later at worst). On CPU the norms
are simply a tensor. No ``.item()``, no sync.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hooktrace._record.module_table import ModuleTable

_NO_CONTEXT = contextlib.nullcontext()


@dataclass(slots=True)
class ParamRef:
    """One parameter that requires grad, with its cleaned name and owning module."""

    name: str
    param: nn.Parameter
    module: int


class GradNormCapture:
    """Launches the per-step norm computation over every instrumented parameter."""

    def __init__(self, table: ModuleTable) -> None:
        self.table = table
        self._params: list[ParamRef] = []
        self._tensors: list[nn.Parameter] = []
        self._multi_device = False
        self._table_size = -1

    def params(self) -> list[ParamRef]:
        """All parameters (tied ones once), refreshed when modules were added."""
        if self._table_size != len(self.table.infos):
            self._params = [
                ParamRef(name, param, info.index) for info in self.table.infos for name, param in info.params
            ]  # frozen ones too: their grad is None until they are unfrozen
            self._table_size = len(self.table.infos)
            self._tensors = [ref.param for ref in self._params]
            self._multi_device = len({t.device for t in self._tensors}) > 1
        return self._params

    def capture(self) -> tuple[Any, list[int], Any]:
        """``(norms, positions of params that had a grad, ready event or None)``: norms are host
        floats on CPU, a tensor being copied to pinned host memory on CUDA.

        Training thread, once per step: a handful of Python operations per parameter, one
        ``_foreach_norm`` and one ``stack``; then ``tolist`` on CPU, a non-blocking copy to pinned
        memory on CUDA.
        """
        if self._table_size != len(self.table.infos):
            self.params()  # modules were added
        maybe = [param.grad for param in self._tensors]
        present = [i for i, grad in enumerate(maybe) if grad is not None]  # frozen/unused: None
        grads = [grad for grad in maybe if grad is not None]
        if not grads:
            return None, present, None
        with torch.no_grad() if grads[0].requires_grad else _NO_CONTEXT:  # create_graph=True only
            norms = torch._foreach_norm(grads, 2, dtype=torch.float32)
            if not self._multi_device and norms[0].is_cpu:
                # CPU: host floats now, in one transfer (no per-parameter .item()), so a
                # non-finite step is known before the optimizer steps and the worker needs no
                # tensor op.
                values: list[float] = torch.stack(norms).tolist()
                return values, present, None
            stacked = stack_on_one_device(list(norms)) if self._multi_device else torch.stack(norms)
        host, ready = copy_to_host_async(stacked)
        return host, present, ready


def capture_buffer_norms(table: ModuleTable) -> tuple[Any, list[str]]:
    """``((host norms, ready event), names)`` of every floating-point buffer (sampled steps,
    training thread): one ``_foreach_norm`` and the start of one copy to the host, no sync."""
    names: list[str] = []
    tensors: list[torch.Tensor] = []
    for info in table.infos:
        for name, buffer in info.buffers:
            names.append(name)
            tensors.append(buffer.detach())
    if not tensors:
        return None, names
    norms = stack_on_one_device(list(torch._foreach_norm(tensors, 2, dtype=torch.float32)))
    return copy_to_host_async(norms), names


def stack_on_one_device(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Stack same-shaped tensors that may sit on several devices, on a CUDA device when any is
    there: moving host values to the GPU does not wait for it, moving GPU values to the host does.
    The usual case, one device, is a plain ``stack`` (no ``.to`` call per tensor)."""
    first = tensors[0].device
    if all(t.device == first for t in tensors):
        return torch.stack(tensors)
    device = next((t.device for t in tensors if t.is_cuda), first)
    return torch.stack([t.to(device, non_blocking=True) for t in tensors])


def copy_to_host_async(tensor: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """``(host tensor, ready event or None)``: on CUDA a non-blocking copy to pinned memory and an
    event recorded after it, so nobody waits until the values are read (``resolve_norms``)."""
    if not tensor.is_cuda:
        return tensor, None
    with torch.cuda.device(tensor.device):  # the worker must not touch (or create a context on) GPU 0
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        host.copy_(tensor, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(tensor.device))
    return host, ready


class HostCopy:
    """Device scalars of one step keyed by module index, copied to the host in one transfer that
    nobody waits for: started on the training thread, on the stream that made them (CUDA), and
    read on the worker (``values``)."""

    __slots__ = ("host", "indices", "ready")

    def __init__(self, pairs: list[tuple[int, torch.Tensor]]) -> None:
        self.indices = [index for index, _ in pairs]
        # float32 scalars all (gradient_norm, _foreach_norm(dtype=float32)): no conversion
        self.host, self.ready = copy_to_host_async(stack_on_one_device([value for _, value in pairs]))

    def values(self) -> list[tuple[int, float]]:
        return list(zip(self.indices, resolve_norms(self.host, self.ready), strict=True))


def resolve_norms(norms: Any, ready: Any) -> list[float]:
    """Host floats of captured norms: CPU floats as they are, a (pinned host) tensor once its
    copy is done (worker thread: may wait for the copy)."""
    if norms is None:
        return []
    if isinstance(norms, list):
        return norms
    if ready is not None:
        ready.synchronize()
    values: list[float] = norms.tolist()
    return values
