"""Where a step's gradient norms are read, so they are the gradients backward produced.

- At the end of every backward (the engine's final callback): the norms of every parameter with a
  gradient. This is before the script's clipping (``clip_grad_norm_`` runs after backward), and
  inside ``optimizer.step(closure)`` when the closure ran backward (Lightning, LBFGS).
- Right after ``GradScaler.unscale_(optimizer)`` (see ``_record/amp.py``): the unscaled norms of
  that optimizer's parameters, before the clipping that follows. Once a scaler was seen, the
  end-of-backward reading is skipped: its values would be scaled.
- At an optimizer's step, the latest reading is restricted to the parameters it updates, so two
  optimizers (a GAN) never mix: each takes its share of the reading once.

Training thread only. One ``_foreach_norm`` per reading; nothing waits for the device.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

from hooktrace.health.norms import GradNormCapture, NormCapture


class GradientTaps:
    """The latest end-of-backward reading and each optimizer's share of it."""

    def __init__(self, capture: GradNormCapture) -> None:
        self.capture = capture
        self.latest: NormCapture | None = None
        self.scaler_seen = False
        self._taken: set[int] = set()
        """ids of the optimizers that took their share of ``latest`` already."""
        self._shares: weakref.WeakKeyDictionary[torch.optim.Optimizer, tuple[int, int, set[int] | None]] = (
            weakref.WeakKeyDictionary()
        )
        self._last: tuple[Any, int, int, set[int] | None] = (None, 0, 0, None)
        """(optimizer, groups, table size, positions) of the last lookup: one step's optimizer."""

    def after_backward(self) -> NormCapture | None:
        """End of a backward: read every gradient (unless a GradScaler will give unscaled ones)."""
        self._taken.clear()
        self.latest = None if self.scaler_seen else self.capture.capture()
        return self.latest

    def share(self, optimizer: torch.optim.Optimizer) -> NormCapture | None:
        """``optimizer``'s share of the latest reading, once per backward; None when it took it
        already (a second step() without a backward, or a closure that will run backward now)."""
        if self.latest is None or id(optimizer) in self._taken:
            return None
        self._taken.add(id(optimizer))
        keep = self.positions(optimizer)
        if keep is None or len(keep) == len(self.capture.params()):
            return self.latest  # it updates the whole model: no selection to make
        return self.latest.only(keep)

    def after_unscale(self, optimizer: torch.optim.Optimizer) -> NormCapture | None:
        """Right after ``GradScaler.unscale_``: the unscaled norms of ``optimizer``'s parameters."""
        self.scaler_seen = True
        keep = self.positions(optimizer)
        return self.capture.capture(sorted(keep) if keep is not None else None)

    def positions(self, optimizer: torch.optim.Optimizer) -> set[int] | None:
        """Positions of the parameters ``optimizer`` updates; None when it updates none of ours
        by identity (fp32 master copies): then it stands for the whole model."""
        groups = optimizer.param_groups
        size = len(self.capture.table.infos)
        last = self._last
        if last[0] is optimizer and last[1] == len(groups) and last[2] == size:
            return last[3]  # the usual call: the optimizer of the previous step, unchanged
        known = self._shares.get(optimizer)
        if known is not None and known[0] == len(groups) and known[1] == size:
            self._last = (optimizer, known[0], known[1], known[2])
            return known[2]
        found = self.capture.positions_of(p for group in groups for p in group["params"])
        keep = found or None
        self._shares[optimizer] = (len(groups), size, keep)
        self._last = (optimizer, len(groups), size, keep)
        return keep
