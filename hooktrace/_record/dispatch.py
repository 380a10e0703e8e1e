"""What PyTorch spends calling our hooks, outside their bodies: measured once, at start.

A hook body times itself (``StepBuffer.hook_ns``), but the module call path with hooks (the
slow path of ``Module._call_impl``, building the hook lists, entering Python) costs the training
thread too. This measures that cost per hook call on a probe module, so the overhead the agent
reports about itself includes it (``events x per-call cost`` on sampled steps).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

PROBE_CALLS = 200


def hook_dispatch_ns(calls: int = PROBE_CALLS) -> int:
    """Nanoseconds a forward pre/post hook pair adds to one module call, per hook (best of 3)."""

    def pre(module: nn.Module, args: tuple[object, ...]) -> None:
        return None

    def post(module: nn.Module, args: tuple[object, ...], kwargs: dict[str, object], output: object) -> None:
        return None

    probe = nn.Identity()
    x = torch.zeros(1)

    def timed() -> int:
        best = 1 << 62
        for _ in range(3):
            start = time.perf_counter_ns()
            for _ in range(calls):
                probe(x)
            best = min(best, time.perf_counter_ns() - start)
        return best

    bare = timed()
    handles = [probe.register_forward_pre_hook(pre), probe.register_forward_hook(post, with_kwargs=True)]
    try:
        hooked = timed()
    finally:
        for handle in handles:
            handle.remove()
    return max(0, (hooked - bare) // (2 * calls))


def saved_tensor_hook_ns(pack: Callable[[torch.Tensor], Any], unpack: Callable[[Any], torch.Tensor]) -> int:
    """Nanoseconds one saved tensor costs with ``pack``/``unpack`` as saved-tensor hooks (the
    pack in forward, PyTorch calling it, the unpack in backward), per save (best of 3): the
    memory measurement's share of a sampled step that no hook body times."""
    x = torch.ones(8, requires_grad=True)

    def timed(hooked: bool) -> int:
        # this thread's CPU time: measured on the worker while training runs, wall time would
        # count the waits for the GIL (a CPU backward runs on the calling thread)
        best = 1 << 62
        for _ in range(3):
            start = time.thread_time_ns()
            for _ in range(PROBE_CALLS // 4):
                if hooked:
                    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
                        y = x * x  # saves x twice
                else:
                    y = x * x
                y.sum().backward()
            best = min(best, time.thread_time_ns() - start)
        return best

    bare = timed(False)
    hooked = timed(True)
    # the hooked loop also enters and leaves the context once per iteration (a module's enter and
    # exit, which the forward hooks time themselves): counted here too, a slight overestimate
    return max(0, (hooked - bare) // (2 * (PROBE_CALLS // 4)))
