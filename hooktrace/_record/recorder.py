"""The recorder: the state the hooks write to, and the switch that turns module hooks on and off.

Per-module hooks are registered only for sampled steps (``activate``/``deactivate``), so an
unsampled step runs the model's fast path with no per-module hook at all.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn.modules.module import register_module_module_registration_hook
from torch.utils.hooks import RemovableHandle

from hooktrace._record.buffer import BWD_START, MAX_EVENTS_PER_STEP, StepBuffer
from hooktrace._record.clock import Clock, CpuClock
from hooktrace._record.dispatch import hook_dispatch_ns
from hooktrace._record.hooks import (
    ForwardHookPair,
    HookSet,
    direct_hooks_supported,
    make_forward_hooks,
    make_full_backward_hooks,
    register_module_hooks,
)
from hooktrace._record.memory import CudaMemory, SavedTensors, storage_keys
from hooktrace._record.module_table import ModuleTable
from hooktrace._record.pickling import exclude_from_pickles
from hooktrace._record.preflight import Preflight

_vector_norm = torch.linalg.vector_norm
_float32 = torch.float32


def gradient_norm(grad: torch.Tensor) -> torch.Tensor:
    """L2 norm of one gradient as a float32 device scalar (no sync). Memory-bound: BLAS's dot
    product is no faster on gradients that just left the cache."""
    return _vector_norm(grad.detach(), dtype=_float32)


WALK_EVERY = 10
"""Sampled steps between two walks of the roots when no module registration was seen."""

MAX_HOOK_ERRORS = 100
"""After this many hook errors the agent detaches itself and warns once."""


def always() -> bool:
    """``Recorder.skip`` that silences every hook."""
    return True


class Recorder:
    """Owns the module table, the per-module hooks and the current step buffer."""

    def __init__(
        self, *, depth: int, max_modules: int, backward: str, on_fatal: Callable[[], None], memory: bool = False
    ) -> None:
        self.table = ModuleTable(depth, max_modules)
        self.modules: list[nn.Module] = []
        self.backward = backward
        self.clock: Clock = CpuClock()
        self.stamp: Callable[[], Any] = self.clock.stamp
        self.skip: Callable[[], bool] = torch.compiler.is_compiling
        self.buf = StepBuffer(number=1, sampled=True, start_ns=0)
        self.preflight: Preflight | None = Preflight() if backward == "full" else None
        self.preflight_finished = False
        """The preflight just ended: hooks registered before must be registered anew (full mode)."""
        self.full_skipped: dict[int, str] = {}
        self.anchor_every_step = False
        """CUDA with DDP timing: every step needs an anchor to read all-reduce completion events."""
        self.dispatch_ns = hook_dispatch_ns()
        """PyTorch's cost of calling one of our hooks, outside its body (counted as overhead)."""
        self.hook_errors = 0
        self.first_error: str | None = None
        self.check_outputs = False
        """Sampled steps: keep a sum of each module output, to name where a NaN/Inf started."""
        self.replay_roots: set[int] = set()
        """Roots whose calls each step keeps (by reference) so a bad step can replay its forward
        (health/replay.py)."""
        self.replay_all = False
        """Every root can replay: sampled steps need no output sums then."""
        self.hunt = 0
        """Steps left in which every step is sampled deeply, after a non-finite gradient was seen."""
        self._on_fatal = on_fatal
        self._forward_hooks: list[tuple[Callable[..., None], ...]] = []
        self._full_hooks: list[tuple[Callable[..., None], Callable[..., None]]] = []
        self._active: dict[int, HookSet | ForwardHookPair] = {}
        self._pairs: list[ForwardHookPair | None] = []
        self._full_forward: dict[int, tuple[Callable[..., None], ...]] = {}
        self._direct = direct_hooks_supported()
        self._pinned: set[int] = set()
        self._root_labels: dict[int, tuple[str, bool]] = {}
        self._modules_changed = False
        self._refreshes = 0
        self._registration_hook: RemovableHandle | None = None
        self.memory: SavedTensors | None = SavedTensors(self.table) if memory else None
        """Bytes saved for backward per sampled module call (``--memory on``); None when off."""

    # -- hot path -------------------------------------------------------------------------------
    def on_node_grad(self, targets: list[tuple[int, int, int]], output_nr: int, grad_outputs: Any) -> None:
        """Every backward hook's body: the pre-hook of a watched tensor's autograd node (see
        ``hooks.watch_tensor``) or a full backward hook. One stamp for every module that shares
        the gradient, and on deep steps its norm (kept on device: no sync)."""
        if self.skip():
            return None
        start = time.perf_counter_ns()
        buf = self.buf
        try:
            events = buf.events
            if len(events) >= MAX_EVENTS_PER_STEP:
                buf.dropped_events += 1
                return None
            stamp = self.stamp()
            for kind, index, call in targets:
                events.append((kind, index, call, stamp))
            if buf.flow and output_nr < len(grad_outputs):  # gradient flow: --flow-every steps only
                grad = grad_outputs[output_nr]
                if isinstance(grad, torch.Tensor):
                    norm = gradient_norm(grad)
                    for kind, index, _ in targets:
                        (buf.output_grad_norms if kind == BWD_START else buf.input_grad_norms).append((index, norm))
        except Exception as exc:
            self.hook_error(exc)
        buf.hook_ns += time.perf_counter_ns() - start
        return None

    def check_pending_outputs(self) -> None:
        """End of a root forward (sampled steps): the L2 norm of every module output in one
        ``_foreach_norm`` (float32 results), kept on device; non-finite when the output held a
        NaN/Inf (or above ~1e19, which only matters on a step that went non-finite anyway).
        Drops the references so no activation outlives its forward because of hooktrace."""
        buf = self.buf
        pending = buf.pending_outputs
        if not pending:
            return
        buf.pending_outputs = []
        try:
            with torch.no_grad():
                norms = torch._foreach_norm([t.detach() for _, t in pending], 2, dtype=torch.float32)
            buf.output_norms.extend((index, norm) for (index, _), norm in zip(pending, norms, strict=True))
        except Exception as exc:  # mixed devices/dtypes: fall back to one reduction each
            try:
                with torch.no_grad():
                    buf.output_norms.extend((i, t.detach().float().norm()) for i, t in pending)
            except Exception:
                self.hook_error(exc)

    def hook_error(self, exc: BaseException) -> None:
        """Count a hook failure; after too many, detach (once) and say so once."""
        self.hook_errors += 1
        if self.first_error is None:
            self.first_error = f"{type(exc).__name__}: {exc}"
        if self.hook_errors == MAX_HOOK_ERRORS:
            print(
                f"hooktrace: {self.hook_errors} errors inside hooks (first: {self.first_error}); "
                "detaching to protect training. Please report this.",
                file=sys.stderr,
            )
            self.skip = always  # every hook returns at its first line from now on
            if threading.current_thread() is threading.main_thread():
                self._on_fatal()  # hooks removed; from another thread they stay inert until close

    # -- set-up (training thread, outside hooks) ------------------------------------------------
    def refresh_roots(self) -> None:
        """Index submodules added to the roots since they were indexed: walks the roots when
        some module was registered somewhere since the last walk (a global registration hook
        sets a flag), and every ``WALK_EVERY`` calls for additions that bypass registration
        (``ModuleList.insert``), so most sampled steps of an unchanged model do not walk it."""
        self._refreshes += 1
        if not self._modules_changed and self._refreshes % WALK_EVERY:
            return
        self._modules_changed = False
        for index, (label, descend) in list(self._root_labels.items()):
            self.index_root(self.modules[index], label, descend)

    def root_label(self, index: int) -> str:
        """The prefix of a root's module names (``""``: unprefixed, the run's only model)."""
        return self._root_labels.get(index, ("", True))[0]

    def relabel_root(self, index: int, label: str) -> None:
        """Prefix a root's module names with ``label`` from now on (see ModuleTable.relabel_root)."""
        self.table.relabel_root(index, label)
        self._root_labels[index] = (label, self._root_labels.get(index, ("", True))[1])

    def _on_module_registered(self, module: nn.Module, name: str, submodule: Any) -> None:
        self._modules_changed = True
        return None

    def index_root(self, root: nn.Module, label: str, descend: bool = True) -> list[tuple[int, nn.Module]]:
        """Index a root and any new submodules; builds their hooks. Returns the new modules."""
        if self._registration_hook is None:
            self._registration_hook = register_module_module_registration_hook(self._on_module_registered)
        added = self.table.add_root(root, label, descend=descend)
        index = self.table.index_of(root)
        if index is not None and index in self.table.roots and index not in self._root_labels:
            self._root_labels[index] = (label, descend)
        tensor_backward = self.backward != "off"
        for index, module in added:
            exclude_from_pickles(type(module))  # pickles and deep copies leave our hooks out
            self.modules.append(module)
            self._forward_hooks.append(make_forward_hooks(self, index, tensor_backward))
            pre, post = self._forward_hooks[-1]
            self._pairs.append(ForwardHookPair(module, pre, post) if self._direct else None)
            self._full_hooks.append(make_full_backward_hooks(self, index))
            if self.backward == "full" and getattr(module, "inplace", False) is True:
                self.full_skipped[index] = "inplace=True"
        return added

    def set_device_clock(self, clock: Clock) -> None:
        self.clock = clock
        self.stamp = clock.stamp
        if clock.kind == "cuda":
            if self.memory is not None and self.memory.cuda is None:
                device = torch.cuda.current_device()
                self.memory.cuda = CudaMemory(device)
                self.memory.cuda.reset(device)  # the first step's peaks start here, not at start-up
            capturing = torch.cuda.is_current_stream_capturing
            is_compiling = torch.compiler.is_compiling
            self.skip = lambda: is_compiling() or capturing()
        else:
            self.skip = torch.compiler.is_compiling

    def pin(self, index: int) -> None:
        """Keep a module's hooks on every step (``--watch``)."""
        self._pinned.add(index)
        self._register(index)

    @property
    def pinned(self) -> bool:
        """Whether some modules keep their hooks on every step (``--watch``)."""
        return bool(self._pinned) or self.anchor_every_step

    def forward_hooks(self, index: int) -> tuple[Callable[..., None], ...]:
        return self._forward_hooks[index]

    def activate(self, exclude: set[int]) -> int:
        """Register per-module hooks for a sampled step; returns the time it took (ns)."""
        start = time.perf_counter_ns()
        if self.memory is not None:
            self.memory.unwind()  # pairs a KeyboardInterrupt left pushed
        if self.memory is not None and self.buf.memory:
            table = self.table
            tensors: list[torch.Tensor] = [p for info in table.infos for _, p in info.params]
            tensors += [b for info in table.infos for _, b in info.buffers]
            self.buf.saved_params = storage_keys(tensors)
        for index in range(len(self.modules)):
            if index not in exclude and index not in self._active:
                self._register(index)
        return time.perf_counter_ns() - start

    def deactivate(self) -> int:
        """Remove the per-module hooks of a sampled step (pinned modules keep theirs)."""
        start = time.perf_counter_ns()
        if self.memory is not None and self.memory.depth:
            self.memory.unwind()
        for index in [i for i in self._active if i not in self._pinned]:
            self._active.pop(index).remove()
        return time.perf_counter_ns() - start

    def _register(self, index: int) -> None:
        use_full = self.preflight is not None and self.preflight.done and index not in self.full_skipped
        pair = self._pairs[index]
        if pair is not None and not use_full:
            pair.add()
            self._active[index] = pair
            return
        forward = self._forward_hooks[index]
        if use_full:  # full backward hooks time backward: forward hooks without tensor hooks
            if index not in self._full_forward:
                self._full_forward[index] = make_forward_hooks(self, index, tensor_backward=False)
            forward = self._full_forward[index]
        self._active[index] = register_module_hooks(
            self.modules[index], forward, self._full_hooks[index] if use_full else None
        )

    def remove_all(self) -> None:
        if self._registration_hook is not None:
            self._registration_hook.remove()
            self._registration_hook = None
        if self.memory is not None and self.memory.depth:
            self.memory.unwind()
        for hooks in self._active.values():
            hooks.remove()
        self._active.clear()
        self._pinned.clear()
