"""Zero-code attach: one global forward-pre hook that finds root modules on their first call.

Used by ``hooktrace run``. A root is a module with trainable parameters called while no known
root is running. The global hook is removed after the first step (so unsampled steps run the
fast path) and re-added on sampled steps, so models created later are still found.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn.modules.module import register_module_forward_pre_hook
from torch.utils.hooks import RemovableHandle


class Discovery:
    """Calls ``adopt(module, args)`` for every new root; remembers modules it rejected."""

    def __init__(
        self,
        adopt: Callable[[nn.Module, tuple[Any, ...]], None],
        busy: Callable[[], bool],
        known: Callable[[nn.Module], bool],
        on_error: Callable[[BaseException], None],
    ) -> None:
        self._adopt = adopt
        self._busy = busy
        self._known = known
        self._on_error = on_error
        self._rejected: weakref.WeakSet[nn.Module] = weakref.WeakSet()
        self._handle: RemovableHandle | None = None

    def enable(self) -> None:
        if self._handle is None:
            self._handle = register_module_forward_pre_hook(self._hook)

    def disable(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _hook(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if torch.compiler.is_compiling():
            return None
        try:
            if self._busy() or module in self._rejected or self._known(module):
                return None
            if not any(p.requires_grad for p in module.parameters()):
                self._rejected.add(module)  # losses, activations, frozen teachers
                return None
            self._adopt(module, args)
        except Exception as exc:
            self._on_error(exc)
        return None
