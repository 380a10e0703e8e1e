"""Zero-code attach: one global forward-pre hook that finds root modules on their first call.

Used by ``hooktrace run``. A root is a module with trainable parameters called with gradients
enabled while no known root is running: a module only ever called under ``no_grad`` or
``inference_mode`` (an EMA copy, an eval-only model, a validation pass before training) is not
adopted, and not rejected either: it is adopted at its first training call. The global hook is
removed after the first step (so unsampled steps run the fast path) and re-added on sampled
steps, so models created later are still found.

``torch.compile(module)`` returns an ``OptimizedModule`` that warns at every call while any
global module hook exists, before any hook could run. So a global module-registration hook
(which that check ignores) watches ``torch.compile`` build its wrapper: from then on, the wrapper
(or the outermost module it is put into, ``model.block = torch.compile(model.block)``) is
watched through a hook of its own, and the global forward-pre hook stays off. The first call of
such a module, or of a compiled module the global hook meets, retires discovery for good: the
global hooks are removed and never come back; modules watched on their own are still adopted at
their first training call, new ones are not discovered any more.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn.modules.module import register_module_forward_pre_hook, register_module_module_registration_hook
from torch.utils.hooks import RemovableHandle

from hooktrace._record.pickling import exclude_from_pickles


def is_compiled_module(module: nn.Module) -> bool:
    """``torch.compile(module)``'s wrapper (``OptimizedModule``, which has ``_orig_mod``)."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")  # no compiled module before its import
    return eval_frame is not None and isinstance(module, eval_frame.OptimizedModule)


class Discovery:
    """Calls ``adopt(module, args)`` for every new root; remembers modules it rejected.

    The agent enables it before the first step and on sampled steps. While enabled, the global
    forward-pre hook is on unless discovery retired or some module is watched on its own (see
    the module docstring); watched modules carry their own pre-hook only while enabled, so a
    disabled (or detached) discovery adopts nothing. The registration watch stays from the first
    ``enable`` until discovery retires or closes (a model may be compiled on an unsampled step);
    while disabled it only takes notes. Hooks run on the training thread and never raise: errors
    go to ``on_error``."""

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
        self._watch: RemovableHandle | None = None
        self._enabled = False
        self.retired = False
        """The global hooks are gone for good: a compiled module was called or went into a root."""
        self._compiled: weakref.WeakSet[nn.Module] = weakref.WeakSet()
        """Every ``torch.compile`` wrapper built since the first ``enable``."""
        self._watched: weakref.WeakKeyDictionary[nn.Module, RemovableHandle | None] = weakref.WeakKeyDictionary()
        """Modules that are or hold a compiled module, not adopted yet -> their own pre-hook."""

    def enable(self) -> None:
        """Turn discovery on; once retired, only modules watched on their own are looked at."""
        self._enabled = True
        if self._watch is None and not self.retired:
            self._watch = register_module_module_registration_hook(self._on_registration)
        self._sync()

    def disable(self) -> None:
        self._enabled = False
        self._sync()

    def close(self) -> None:
        """Remove every hook of discovery's, the registration watch included."""
        self.disable()
        self.retire()
        self._watched.clear()

    def retire(self) -> None:
        """Remove the global hooks for good (``enable`` will not add them again)."""
        if self.retired:
            return
        self.retired = True
        if self._watch is not None:
            self._watch.remove()
            self._watch = None
        self._sync()

    def _sync(self) -> None:
        """Put the global hook and the watched modules' hooks in the state the flags ask for."""
        wanted = self._enabled and not self.retired and not self._watched
        if wanted and self._handle is None:
            self._handle = register_module_forward_pre_hook(self._hook)
        elif not wanted and self._handle is not None:
            self._handle.remove()
            self._handle = None
        for module, handle in list(self._watched.items()):
            if self._enabled and handle is None:
                self._watched[module] = module.register_forward_pre_hook(self._watched_hook)
            elif not self._enabled and handle is not None:
                handle.remove()
                self._watched[module] = None

    def _watch_module(self, module: nn.Module) -> None:
        if self._known(module):
            self.retire()  # a compiled module went into a known root: its calls must not warn
        elif module not in self._watched:
            exclude_from_pickles(type(module))  # its watch hook stays out of pickles and copies
            self._watched[module] = None
            self._sync()

    def _unwatch(self, module: nn.Module) -> None:
        handle = self._watched.pop(module, None)
        if handle is not None:
            handle.remove()
        self._sync()

    # -- hooks ------------------------------------------------------------------------------------
    def _on_registration(self, parent: nn.Module, name: str, child: Any) -> None:
        try:
            if not isinstance(child, nn.Module):
                return None
            built = name == "_orig_mod" and is_compiled_module(parent)  # torch.compile(child)
            if built:
                self._compiled.add(parent)
            watched = bool(self._watched) and child in self._watched
            if built or watched:  # the outermost module is the root to be
                if watched:
                    self._unwatch(child)
                self._watch_module(parent)
        except Exception as exc:
            self._on_error(exc)
        return None

    def _hook(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if torch.compiler.is_compiling():
            return None
        try:
            if self._busy():
                if is_compiled_module(module):
                    self.retire()  # compiled before discovery watched: this call warned already
                return None
            if not self._holds_compiled(module):
                self._consider(module, args)
            else:
                self.retire()  # before the compiled module's call: it will not warn
                if not self._consider(module, args):
                    self._watch_module(module)  # an eval call now: adopt it at its first training call
        except Exception as exc:
            self._on_error(exc)
        return None

    def _watched_hook(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if torch.compiler.is_compiling():
            return None
        try:
            self.retire()
            if self._consider(module, args):
                self._unwatch(module)
        except Exception as exc:
            self._on_error(exc)
        return None

    def _holds_compiled(self, module: nn.Module) -> bool:
        if is_compiled_module(module):
            return True
        compiled = self._compiled
        return bool(compiled) and any(m in compiled for m in module.modules())

    def _consider(self, module: nn.Module, args: tuple[Any, ...]) -> bool:
        """Adopt ``module`` if it is a new root; True once there is nothing left to decide."""
        if self._busy():
            return False
        if module in self._rejected or self._known(module):
            return True
        if not torch.is_grad_enabled():
            return False  # eval, EMA or validation call: not a root now, maybe at a training call
        if not any(p.requires_grad for p in module.parameters()):
            self._rejected.add(module)  # losses, activations, frozen teachers
            return True
        self._adopt(module, args)
        return True
