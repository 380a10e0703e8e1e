"""Which sampled steps also read gradient flow (``--flow-every``) and activation memory
(``--memory-every``): both cost a sampled step several percent and change slowly over training."""

from __future__ import annotations


class Cadence:
    """Decides, as each step opens, whether it reads gradient flow and activation memory."""

    def __init__(self, flow_every: int, memory_every: int) -> None:
        self.flow_every = flow_every
        self.memory_every = memory_every
        self._next_flow = flow_every
        """Gradient flow is read on the first sampled step at or after this step number."""
        self._next_memory = 1
        """Activation memory is read on the first sampled step at or after this step number."""

    def flow(self, number: int, sampled: bool, hunting: bool) -> bool:
        """``--flow-every``: the sampled step at or after each multiple, and every deep step that
        hunts the source of a non-finite gradient."""
        if hunting:
            return True
        if not sampled or not self.flow_every or number < self._next_flow:
            return False
        while self._next_flow <= number:
            self._next_flow += self.flow_every
        return True

    def memory(self, number: int, sampled: bool) -> bool:
        """``--memory-every``: step 1, the next sampled step (the first steady one), then the
        sampled step at or after each multiple; every sampled step with 1."""
        if not sampled or number < self._next_memory:
            return False
        every = self.memory_every
        self._next_memory = number + 1 if number == 1 else (number // every + 1) * every
        return True
