"""Which optimizers are ours, and their stable names (``Adam#0``).

The optimizer step hooks are global: every optimizer of the process calls them, and one of a
model this agent does not watch must not end its steps. Both answers are asked on every step, so
the usual call (the optimizer of the previous step, unchanged) is one identity test.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch

from hooktrace._record.module_table import ModuleTable


class OptimizerBook:
    """Ownership and names of the optimizers seen by the step hooks (training thread)."""

    def __init__(self, table: ModuleTable, orphan_gradients: Callable[[], bool]) -> None:
        self.table = table
        self._orphan_gradients = orphan_gradients
        """True while no optimizer of the watched parameters stepped yet and they hold gradients."""
        self._known: weakref.WeakKeyDictionary[torch.optim.Optimizer, tuple[bool, int, int]] = (
            weakref.WeakKeyDictionary()
        )
        """Optimizer -> (steps instrumented parameters, its group count, table size when checked)."""
        self._names: weakref.WeakKeyDictionary[torch.optim.Optimizer, str] = weakref.WeakKeyDictionary()
        """Optimizer -> its stable name: class and index in the order they first stepped (``Adam#1``)."""
        self._last_ours: tuple[Any, int, int] = (None, 0, 0)
        """(optimizer, groups, table size) of the last optimizer found ours (a strong reference
        for one step's time: an optimizer lives as long as its training anyway)."""
        self._last_name: tuple[Any, str] = (None, "")

    def is_ours(self, optimizer: torch.optim.Optimizer) -> bool:
        """Whether ``optimizer`` updates an instrumented parameter. Checked once per optimizer,
        again when it gained parameter groups or the agent gained modules. May raise (an
        unhashable optimizer subclass, odd param_groups): the caller counts it."""
        groups, size = len(optimizer.param_groups), len(self.table.infos)
        last = self._last_ours
        if last[0] is optimizer and last[1] == groups and last[2] == size:
            return True  # the usual call: the optimizer of the previous step, unchanged
        known = self._known.get(optimizer)
        if known is not None and (known[0] or (known[1] == groups and known[2] == size)):
            return known[0]
        mine = self.table.param_ids
        ours = any(id(p) in mine for group in optimizer.param_groups for p in group["params"])
        if not ours and self._orphan_gradients():
            # no optimizer of the watched parameters yet, and they hold gradients: this one updates
            # copies of them (fp32 master weights, parameters swapped after attach), so it is ours
            ours = True
        self._known[optimizer] = (ours, groups, size)
        if ours:
            self._last_ours = (optimizer, groups, size)
        return ours

    def name_of(self, optimizer: torch.optim.Optimizer) -> str:
        """``Adam#0``: the optimizer's class and its index among this run's optimizers."""
        last = self._last_name
        if last[0] is optimizer:
            return last[1]  # the usual call: no weak reference made to look it up
        name = self._names.get(optimizer)
        if name is None:
            name = self._names[optimizer] = f"{type(optimizer).__name__}#{len(self._names)}"
        self._last_name = (optimizer, name)
        return name
