"""Gradient norms as backward produced them: one ``_foreach_norm``, one copy, per reading.

The training thread launches the norm kernels and a non-blocking device-to-host copy; the worker
reads the host tensor after the copy's event completed (a step later at worst): no sync on CUDA.
On CPU the norms are read as floats right away (nothing to wait for).
"""

from __future__ import annotations

import contextlib
import itertools
import operator
import weakref
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from hooktrace._record.module_table import ModuleTable

_NO_CONTEXT = contextlib.nullcontext()
_weakref = weakref.ref
_item = torch.Tensor.item
_grad_of = operator.attrgetter("grad")
_is = operator.is_
_repeat = itertools.repeat


@dataclass(slots=True)
class ParamRef:
    """One parameter that requires grad, with its cleaned name and owning module."""

    name: str
    param: nn.Parameter
    module: int


@dataclass(slots=True)
class NormCapture:
    """Per-parameter gradient norms read at one moment: host floats (CPU) or a pinned host tensor
    still being copied (CUDA, ``ready`` event). ``select`` keeps a share of them (one optimizer's
    parameters) without touching the device; ``probes`` see in-place changes made afterwards."""

    norms: Any
    present: list[int]
    """Positions (in ``GradNormCapture.params()``) of the parameters that had a gradient."""
    ready: Any = None
    select: list[int] | None = None
    """Indices into ``present``/``norms`` this capture stands for; None = all."""
    probes: tuple[tuple[Any, int], ...] = ()
    """(weakref to a gradient, its version counter when read): the first gradient (the script's
    clipping, ``clip_grad_norm_``/``clip_grad_value_``, rewrites every gradient)."""

    def positions(self) -> list[int]:
        return self.present if self.select is None else [self.present[i] for i in self.select]

    def host_values(self) -> list[float] | None:
        """The norms when they are host floats already; None where reading would wait (CUDA)."""
        return self._pick(self.norms) if isinstance(self.norms, list) else None

    def values(self) -> list[float]:
        """The norms as host floats (worker thread, or a guard's documented wait on CUDA)."""
        return self._pick(resolve_norms(self.norms, self.ready))

    def _pick(self, values: list[float]) -> list[float]:
        return values if self.select is None else [values[i] for i in self.select]

    def only(self, keep: set[int] | None) -> NormCapture:
        """The share of these norms that covers the parameter positions in ``keep`` (None: all)."""
        if keep is None:
            return self
        select = [i for i, pos in enumerate(self.present) if pos in keep]
        return NormCapture(self.norms, self.present, self.ready, select, self.probes)

    def changed(self) -> bool:
        """Whether a probed gradient was modified in place since the capture (clipping, scaling)."""
        for ref, version in self.probes:
            grad = ref()
            if grad is not None and grad._version != version:
                return True
        return False


def merge_captures(captures: list[NormCapture], host_only: bool = False) -> tuple[list[int], list[float]] | None:
    """``(positions, values)`` of several captures, each parameter once (the later capture wins),
    in position order. With ``host_only``, None when some capture is not on the host yet."""
    if len(captures) == 1:  # the usual step: one optimizer, its reading as is (no per-parameter work)
        only = captures[0]
        values = only.host_values() if host_only else only.values()
        return None if values is None else (only.positions(), values)
    by_pos: dict[int, float] = {}
    for capture in captures:
        values = capture.host_values() if host_only else capture.values()
        if values is None:
            return None
        by_pos.update(zip(capture.positions(), values, strict=True))
    present = sorted(by_pos)
    return present, [by_pos[pos] for pos in present]


class GradNormCapture:
    """Launches the norm computation over the instrumented parameters' gradients."""

    def __init__(self, table: ModuleTable) -> None:
        self.table = table
        self._params: list[ParamRef] = []
        self._tensors: list[nn.Parameter] = []
        self._position: dict[int, int] = {}
        self._multi_device = False
        self._table_size = -1
        self._every: list[int] = []

    def params(self) -> list[ParamRef]:
        """All parameters (tied ones once), refreshed when modules were added or renamed."""
        if self._table_size != len(self.table.infos):
            self._params = [
                ParamRef(name, param, info.index) for info in self.table.infos for name, param in info.params
            ]  # frozen ones too: their grad is None until they are unfrozen
            self._table_size = len(self.table.infos)
            self._tensors = [ref.param for ref in self._params]
            self._position = {id(t): i for i, t in enumerate(self._tensors)}
            self._multi_device = len({t.device for t in self._tensors}) > 1
        return self._params

    def _all_positions(self, count: int) -> list[int]:
        """``[0, ..., count - 1]``, made once: a capture keeps it (never modified) as its positions."""
        if len(self._every) != count:
            self._every = list(range(count))
        return self._every

    def invalidate(self) -> None:
        """Parameter names changed (roots relabelled): rebuild the list at the next use."""
        self._table_size = -1

    def positions_of(self, tensors: Any) -> set[int]:
        """Positions of the instrumented parameters among ``tensors`` (an optimizer's params)."""
        self.params()
        position = self._position
        return {position[id(t)] for t in tensors if id(t) in position}

    def capture(self, positions: list[int] | None = None) -> NormCapture | None:
        """Norms of the gradients present now, of every parameter or of ``positions`` only.

        Training thread: one ``_foreach_norm``; then ``item`` of each norm on CPU, or one ``stack``
        and a non-blocking copy to pinned memory on CUDA. The capture's positions may be a list
        shared between captures: nobody modifies them.
        """
        if self._table_size != len(self.table.infos):
            self.params()  # modules were added
        tensors = self._tensors
        maybe = list(map(_grad_of, tensors)) if positions is None else [tensors[i].grad for i in positions]
        # frozen/unused parameters have None; never `None in maybe`: `in` compares tensors with ==
        # (250 us for 26 of them), `is` mapped in C does not
        if not any(map(_is, maybe, _repeat(None))):
            grads = cast("list[torch.Tensor]", maybe)
            present = self._all_positions(len(maybe)) if positions is None else positions
        else:
            order = range(len(maybe)) if positions is None else positions
            present = [pos for pos, grad in zip(order, maybe, strict=True) if grad is not None]
            grads = [grad for grad in maybe if grad is not None]
        if not grads:
            return None
        probes = ((_weakref(grads[0]), grads[0]._version),)  # clipping rewrites every gradient
        with torch.no_grad() if grads[0].requires_grad else _NO_CONTEXT:  # create_graph=True only
            norms = torch._foreach_norm(grads, 2, dtype=torch.float32)
            if not self._multi_device and norms[0].is_cpu:
                # CPU: host floats now, so a non-finite step is known before the optimizer steps
                # and the worker needs no tensor op. ``item`` mapped in C: 4 us for 26 norms where
                # ``stack(...).tolist()`` costs 11 (a new tensor, then a list)
                values: list[float] = list(map(_item, norms))
                return NormCapture(values, present, None, None, probes)
            stacked = stack_on_one_device(list(norms)) if self._multi_device else torch.stack(norms)
        host, ready = copy_to_host_async(stacked)
        return NormCapture(host, present, ready, None, probes)


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
