"""What torch's process-wide state says about the current step: the autocast dtype in force,
whether torch.compile compiled a graph, whether ``optimizer.step`` was given a closure."""

from __future__ import annotations

import sys
from typing import Any

import torch


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype in force for ``device_type``, None when autocast is off."""
    if _autocast_by_device:
        return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    if device_type == "cpu":  # PyTorch < 2.4
        return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None
    return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None


try:
    torch.is_autocast_enabled("cpu")
    _autocast_by_device = hasattr(torch, "get_autocast_dtype")
except TypeError:
    _autocast_by_device = False


def has_closure(args: Any, kwargs: Any) -> bool:
    """``optimizer.step(closure)`` or ``step(closure=...)``."""
    if kwargs and kwargs.get("closure") is not None:
        return True
    return bool(args) and callable(args[0])


_dynamo_counters: Any = None


def compiled_graphs() -> int:
    """Graphs torch.compile has compiled in this process (0 before Dynamo is imported)."""
    global _dynamo_counters
    if _dynamo_counters is None:
        utils = sys.modules.get("torch._dynamo.utils")
        if utils is None:
            return 0
        _dynamo_counters = getattr(utils, "counters", None)
        if _dynamo_counters is None:
            return 0
    try:
        return int(_dynamo_counters["stats"]["unique_graphs"])
    except Exception:
        return 0
