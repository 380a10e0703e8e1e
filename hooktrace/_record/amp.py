"""The moment a GradScaler's gradients become real: right after ``GradScaler.unscale_``.

Under mixed precision, backward produces gradients multiplied by the loss scale; the script's
clipping (if any) comes after ``unscale_``, and ``scaler.step`` calls ``unscale_`` itself when the
script did not. PyTorch has no hook there, so ``unscale_`` is wrapped once, at class level, while
some agent listens; the wrapper calls the original and then each listener with the optimizer.
Values are never changed. Removing the last listener restores the original method.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

Listener = Callable[[torch.optim.Optimizer], None]

_listeners: list[Listener] = []
_original: Any = None


def _scaler_class() -> Any:
    amp = getattr(torch, "amp", None)
    return getattr(amp, "GradScaler", None)


class UnscaleHandle:
    """Removes one listener (and the wrapper with the last one)."""

    def __init__(self, listener: Listener) -> None:
        self.listener = listener

    def remove(self) -> None:
        global _original
        if self.listener in _listeners:
            _listeners.remove(self.listener)
        cls = _scaler_class()
        if not _listeners and _original is not None and cls is not None:
            cls.unscale_ = _original
            _original = None


def on_unscale(listener: Listener) -> UnscaleHandle:
    """Call ``listener(optimizer)`` after every enabled ``GradScaler.unscale_(optimizer)``."""
    global _original
    cls = _scaler_class()
    if cls is not None and _original is None:
        original = cls.unscale_

        @functools.wraps(original)
        def unscale_(self: Any, optimizer: torch.optim.Optimizer) -> None:
            result = original(self, optimizer)
            if getattr(self, "_enabled", True):
                for callback in list(_listeners):
                    callback(optimizer)  # listeners catch their own errors
            return result

        _original = original
        cls.unscale_ = unscale_
    _listeners.append(listener)
    return UnscaleHandle(listener)
