"""The ``--backward full`` preflight: find modules where full backward hooks are known to break.

Full backward hooks wrap a module's inputs and outputs in an autograd Function; PyTorch then
rejects in-place changes of those tensors and ignores dict outputs. On the first sampled step
(timed with tensor hooks) the forward post-hooks report each module's output type, keyword-only
tensor inputs and output tensor versions; any output whose ``_version`` moved before backward was
modified in place. Those modules keep tensor-hook timing; the summary lists them with the reason.
"""

from __future__ import annotations

from typing import Any

import torch


class Preflight:
    """Observations of one step, turned into ``{module index: reason}`` for modules to skip."""

    def __init__(self) -> None:
        self.done = False
        self.reasons: dict[int, str] = {}
        self._outputs: list[tuple[int, torch.Tensor, int]] = []

    def observe(self, index: int, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        """Forward post-hook side of the preflight (first sampled step only)."""
        if self.done or index in self.reasons:
            return
        if isinstance(output, dict):
            self.reasons[index] = "dict output"
            return
        if not isinstance(output, (torch.Tensor, tuple)):
            self.reasons[index] = f"{type(output).__name__} output"
            return
        if not any(isinstance(a, torch.Tensor) for a in args) and any(
            isinstance(v, torch.Tensor) for v in kwargs.values()
        ):
            self.reasons[index] = "tensor inputs passed as keyword arguments"
            return
        if not any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            self.reasons[index] = "no input requires grad"  # PyTorch would warn and fire early
            return
        tensors = (output,) if isinstance(output, torch.Tensor) else output
        for tensor in tensors:
            if isinstance(tensor, torch.Tensor):
                self._outputs.append((index, tensor, tensor._version))

    def finish(self) -> dict[int, str]:
        """Called when backward starts: outputs changed since forward were modified in place."""
        if not self.done:
            for index, tensor, version in self._outputs:
                if tensor._version != version and index not in self.reasons:
                    self.reasons[index] = "output modified in place"
            self._outputs.clear()
            self.done = True
        return self.reasons
