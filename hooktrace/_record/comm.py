"""All-reduce timing for DDP through a communication hook that wraps the default all-reduce.

The hook is PyTorch's own ``allreduce_hook`` (DDP's documented equivalent of running without a
hook, so gradients are bit-identical), with a mark when a bucket's future completes: time after
backward compute ended and before the last bucket completed is the exposed ``allreduce`` phase.
On a GPU the completion is a CUDA event recorded in the future's callback, whose current stream
waits for the collective (CUDA futures run callbacks after their streams), so it completes when
the NCCL kernel does; the worker reads it against the step's anchor event. On gloo it is the host
clock when the callback runs.
A user's own comm hook is never replaced: with one present, hooktrace does not register
anything and says so in the summary. DDP cannot unregister a comm hook, so after
``detach`` the wrapper keeps running as a plain ``allreduce_hook`` that records nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn


def is_ddp(module: nn.Module) -> bool:
    return isinstance(module, torch.nn.parallel.DistributedDataParallel)


class AllReduceTimer:
    """Installs the timing comm hook on one DDP module; ``on_complete()`` runs as each bucket's
    all-reduce completes (it must not raise, and never delays the gradient)."""

    def __init__(self, on_complete: Callable[[], None]) -> None:
        self._on_complete = on_complete
        self.enabled = True

    def install(self, ddp: Any) -> str | None:
        """Register the hook; returns why not when it cannot (a user hook is already there)."""
        if getattr(ddp, "_comm_hooks", None):
            return "the model has its own DDP comm hook; all-reduce is not timed separately"
        try:
            self._register(ddp)
        except (RuntimeError, ValueError) as exc:  # e.g. a built-in comm hook is already there
            return f"could not time all-reduce ({exc}); the model's own communication is unchanged"
        return None

    def _register(self, ddp: Any) -> None:
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        process_group = ddp.process_group

        # No annotations: DDP checks them literally, and this module's are postponed strings.
        def timed_allreduce(state, bucket):
            future = allreduce_hook(process_group, bucket)
            if not self.enabled:
                return future

            def done(fut: torch.futures.Future[torch.Tensor]) -> torch.Tensor:
                if self.enabled:
                    try:
                        self._on_complete()
                    except Exception:
                        self.enabled = False
                return fut.value()

            return future.then(done)

        ddp.register_comm_hook(None, timed_allreduce)
