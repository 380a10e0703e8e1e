"""Per-module hooks: the hot path.

A hook body is one clock read, a few list appends and ``return None``; any exception is caught
and counted by the recorder. Forward pre/post hooks exist for every module; backward timing uses
tensor hooks made in the forward hooks (``auto``: input tensors' hooks fire when the module's
backward is done, output tensors' hooks when it starts) or full backward hooks (``full``) on
modules that passed the preflight. Hooks are registered on sampled steps only.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Iterator
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from hooktrace._record.buffer import (
    BWD_END,
    BWD_START,
    FWD_END,
    FWD_EVAL,
    FWD_RECOMPUTE,
    FWD_TRAIN,
    MAX_EVENTS_PER_STEP,
    StepBuffer,
)

if TYPE_CHECKING:
    from hooktrace._record.recorder import Recorder

_grad_enabled = torch.is_grad_enabled
_graph_task_id = torch._C._current_graph_task_id
_Tensor = torch.Tensor
_now = time.perf_counter_ns
_weakref = weakref.ref


def iter_tensors(value: Any) -> Iterator[torch.Tensor]:
    """Tensors of a module output: the value itself, or one level of tuple/list/dict."""
    if isinstance(value, _Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            if isinstance(item, _Tensor):
                yield item
    elif isinstance(value, dict):
        for item in value.values():
            if isinstance(item, _Tensor):
                yield item


def watch_tensor(rec: Recorder, buf: StepBuffer, tensor: torch.Tensor, kind: int, index: int, call: int) -> None:
    """One gradient hook per tensor per step, shared by every module that returned or took it.

    A Sequential returns its last child's output, a block and its first child take the same
    input, and one module's input is the previous one's output: one hook, one stamp, so these
    backward boundaries coincide exactly and intervals nest.
    """
    watched = buf.tensor_hooks
    key = id(tensor)
    entry = watched.get(key)
    if entry is not None and entry[0]() is tensor:
        entry[1].append((kind, index, call))
        return
    node = tensor.grad_fn
    if node is None:
        return  # a leaf (a parameter passed as an argument): its hooks would outlive the step
    targets = [(kind, index, call)]
    watched[key] = (_weakref(tensor), targets)
    # A pre-hook on the tensor's autograd node fires when its gradient is complete, like a tensor
    # hook, and stays with the node if the tensor is later modified in place; it costs ~2 us to
    # register where Tensor.register_hook costs ~20 us.
    node.register_prehook(partial(rec.on_node_grad, targets, tensor.output_nr))


def _is_one_of(tensor: torch.Tensor, args: tuple[Any, ...]) -> bool:
    for arg in args:  # noqa: SIM110 (a loop, not any(): no generator on the hot path)
        if arg is tensor:
            return True
    return False


def unwatch_inputs(buf: StepBuffer, args: tuple[Any, ...], index: int, call: int) -> None:
    """A module that returned its input as is has no backward of its own: drop the end stamp its
    forward pre-hook asked for, so the module that made the tensor keeps its backward time."""
    target = (BWD_END, index, call)
    for arg in args:
        if isinstance(arg, _Tensor):
            entry = buf.tensor_hooks.get(id(arg))
            if entry is not None and target in entry[1]:
                entry[1].remove(target)


def make_forward_hooks(rec: Recorder, index: int, tensor_backward: bool) -> tuple[Callable[..., None], ...]:
    """Forward pre/post hooks of module ``index``; with ``tensor_backward`` they also set the
    tensor hooks that time the module's backward."""

    def forward_pre(module: nn.Module, args: tuple[Any, ...]) -> None:
        if rec.skip():
            return None
        start = _now()
        buf = rec.buf
        try:
            events = buf.events
            if len(events) >= MAX_EVENTS_PER_STEP:
                buf.dropped_events += 1
                return None
            calls = buf.calls
            call = calls.get(index, 0)
            calls[index] = call + 1
            if not _grad_enabled():
                kind = FWD_EVAL
            elif _graph_task_id() != -1:
                kind = FWD_RECOMPUTE
            else:
                kind = FWD_TRAIN
                if tensor_backward:
                    # Registered before forward runs, so an in-place op inside the module
                    # (ReLU(inplace=True)) cannot move the hook to the module's own output.
                    for arg in args:
                        if isinstance(arg, _Tensor) and arg.requires_grad:
                            watch_tensor(rec, buf, arg, BWD_END, index, call)
            memory = rec.memory
            if memory is not None and kind != FWD_EVAL and buf.memory:
                memory.enter(buf, index, call, kind)  # bytes saved for backward (--memory-every)
            events.append((kind, index, call, rec.stamp()))
        except Exception as exc:  # never reaches training
            rec.hook_error(exc)
        buf.hook_ns += _now() - start  # the agent's own time, for hooktrace_overhead_seconds_total
        return None

    def forward_post(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        if rec.skip():
            return None
        start = _now()
        buf = rec.buf
        memory = rec.memory
        pop = memory is not None and memory.depth > 0  # a saved-tensor pair may be ours to pop
        try:
            events = buf.events
            if len(events) >= MAX_EVENTS_PER_STEP:
                buf.dropped_events += 1
                return None
            events.append((FWD_END, index, 0, rec.stamp()))
            if pop:
                pop = False
                memory.exit(buf, index)  # type: ignore[union-attr]  # after the stamp: not the module's time
            if not (_grad_enabled() and _graph_task_id() == -1):
                return None  # eval and checkpoint-recompute calls: timing only
            if rec.preflight is not None:
                rec.preflight.observe(index, args, kwargs, output)
            if rec.check_outputs:
                # Sampled steps: keep the output until the root's forward ends, where one
                # _foreach_norm checks them all (see Recorder.check_pending_outputs).
                first = next(iter_tensors(output), None)
                if first is not None and first.is_floating_point():
                    buf.pending_outputs.append((index, first))
            if tensor_backward and output is not None:
                call = buf.calls.get(index, 1) - 1
                passed_through = computed = False
                for tensor in iter_tensors(output):
                    if tensor.requires_grad:
                        if _is_one_of(tensor, args):
                            passed_through = True  # Identity, Dropout(p=0): not this module's work
                        else:
                            computed = True
                            watch_tensor(rec, buf, tensor, BWD_START, index, call)
                if passed_through and not computed:
                    unwatch_inputs(buf, args, index, call)
        except Exception as exc:
            rec.hook_error(exc)
        finally:
            if pop:  # an early return or an error came first: a pushed pair must never stay
                try:
                    memory.exit(buf, index)  # type: ignore[union-attr]
                except Exception as exc:
                    rec.hook_error(exc)
        buf.hook_ns += _now() - start
        return None

    return forward_pre, forward_post


def make_full_backward_hooks(rec: Recorder, index: int) -> tuple[Callable[..., None], Callable[..., None]]:
    """``register_full_backward_pre_hook`` / ``register_full_backward_hook`` bodies (``--backward
    full``): the same body as the node hooks of ``auto``, on the module's first gradient."""
    on_grad = rec.on_node_grad
    starts, ends = [(BWD_START, index, -1)], [(BWD_END, index, -1)]

    def backward_pre(module: nn.Module, grad_output: Any) -> None:
        on_grad(starts, 0, grad_output)
        return None

    def backward_post(module: nn.Module, grad_input: Any, grad_output: Any) -> None:
        on_grad(ends, 0, grad_input)
        return None

    return backward_pre, backward_post


class ForwardHookPair:
    """A module's forward pre/post hooks (``with_kwargs=True, always_call=True`` for the post),
    put into and taken out of the module's hook dicts directly: the dict entries that
    ``register_forward_pre_hook``/``register_forward_hook`` make, under ids taken from the same
    counter, without building handle objects at every sampled step (~1 us per module instead of
    ~6). Removing restores the dicts exactly as they were."""

    __slots__ = ("module", "post", "post_id", "pre", "pre_id")

    def __init__(self, module: nn.Module, pre: Callable[..., None], post: Callable[..., None]) -> None:
        self.module, self.pre, self.post = module, pre, post
        self.pre_id = RemovableHandle.next_id
        self.post_id = RemovableHandle.next_id + 1
        RemovableHandle.next_id += 2

    def add(self) -> None:
        module = self.module
        module._forward_pre_hooks[self.pre_id] = self.pre
        module._forward_hooks[self.post_id] = self.post
        module._forward_hooks_with_kwargs[self.post_id] = True
        module._forward_hooks_always_called[self.post_id] = True

    def remove(self) -> None:
        module = self.module
        module._forward_pre_hooks.pop(self.pre_id, None)
        module._forward_hooks.pop(self.post_id, None)
        module._forward_hooks_with_kwargs.pop(self.post_id, None)
        module._forward_hooks_always_called.pop(self.post_id, None)


def direct_hooks_supported() -> bool:
    """Whether this PyTorch keeps forward hooks where ``ForwardHookPair`` writes them: registers a
    pair through the public API on a probe and looks for exactly those dict entries (the package
    accepts future PyTorch versions, whose private layout may differ; then hooks go through
    ``register_module_hooks``)."""

    def hook(*args: Any) -> None:
        return None

    probe = nn.Module()
    try:
        pre = probe.register_forward_pre_hook(hook)
        post = probe.register_forward_hook(hook, with_kwargs=True, always_call=True)
        found = (
            probe._forward_pre_hooks.get(pre.id) is hook
            and probe._forward_hooks.get(post.id) is hook
            and probe._forward_hooks_with_kwargs.get(post.id) is True
            and probe._forward_hooks_always_called.get(post.id) is True
            and isinstance(RemovableHandle.next_id, int)
        )
    except (AttributeError, TypeError):
        return False
    pre.remove()
    post.remove()
    return bool(found) and not (probe._forward_pre_hooks or probe._forward_hooks)


class HookSet:
    """The handles of one module's registered hooks, removable in one call."""

    __slots__ = ("handles",)

    def __init__(self) -> None:
        self.handles: list[RemovableHandle] = []

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def register_module_hooks(
    module: nn.Module,
    forward: tuple[Callable[..., None], ...],
    full_backward: tuple[Callable[..., None], Callable[..., None]] | None,
) -> HookSet:
    """Register a module's forward hooks (and full backward hooks when given)."""
    hooks = HookSet()
    pre, post = forward
    hooks.handles.append(module.register_forward_pre_hook(pre))
    hooks.handles.append(module.register_forward_hook(post, with_kwargs=True, always_call=True))
    if full_backward is not None:
        hooks.handles.append(module.register_full_backward_pre_hook(full_backward[0]))
        hooks.handles.append(module.register_full_backward_hook(full_backward[1]))
    return hooks
