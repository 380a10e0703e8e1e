"""Timestamps for hooks: the monotonic clock on CPU, pooled CUDA events on a GPU.

A stamp is what a hook stores: an ``int`` (perf_counter_ns) on CPU, a recorded ``torch.cuda.Event``
on CUDA. Stamps are resolved to nanoseconds on the worker thread, never on the training thread:
CUDA events are recorded on the current stream (no sync) and read after they complete.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

import torch


class Clock(Protocol):
    """Makes stamps on the training thread and resolves them on the worker thread."""

    kind: str

    def stamp(self) -> Any:
        """Record now. Called in hooks: must be cheap and must not sync."""

    def anchor(self) -> tuple[Any, int]:
        """A stamp taken together with ``perf_counter_ns``: maps stamps onto the host clock."""

    def resolve(self, stamps: list[Any], anchor: tuple[Any, int]) -> list[int]:
        """Stamps -> host-clock nanoseconds. Worker thread; may wait for the device."""

    def release(self, stamps: list[Any]) -> None:
        """Give resolved stamps back (event pool)."""


class CpuClock:
    """``perf_counter_ns``: monotonic, ~50 ns per read."""

    kind = "cpu"
    stamp = staticmethod(time.perf_counter_ns)

    def anchor(self) -> tuple[Any, int]:
        now = time.perf_counter_ns()
        return now, now

    def resolve(self, stamps: list[Any], anchor: tuple[Any, int]) -> list[int]:
        return list(stamps)

    def release(self, stamps: list[Any]) -> None:
        return None


class CudaEventClock:
    """A pool of ``torch.cuda.Event(enable_timing=True)`` recorded on the current stream.

    ``stamp`` pops an event (or makes one) and records it: no host sync. The worker resolves a step's
    events with ``Event.synchronize`` + ``elapsed_time`` relative to the step's anchor event, whose
    host time was read when it was recorded, then returns the events to the pool. The pool is a
    deque: ``append``/``pop`` are atomic in CPython, so the two threads need no lock.
    """

    kind = "cuda"

    def __init__(self, event_factory: Callable[[], Any] | None = None, max_pool: int = 65536) -> None:
        self._factory = event_factory or (lambda: torch.cuda.Event(enable_timing=True))
        self._pool: deque[Any] = deque()
        self._max_pool = max_pool

    def stamp(self) -> Any:
        try:
            event = self._pool.pop()
        except IndexError:
            event = self._factory()
        event.record()
        return event

    def anchor(self) -> tuple[Any, int]:
        event = self.stamp()
        return event, time.perf_counter_ns()

    def resolve(self, stamps: list[Any], anchor: tuple[Any, int]) -> list[int]:
        ref, host_ns = anchor
        ref.synchronize()
        for event in stamps:  # backward hooks may record on other streams: wait for each
            event.synchronize()
        return [host_ns + int(ref.elapsed_time(event) * 1e6) for event in stamps]

    def release(self, stamps: list[Any]) -> None:
        room = self._max_pool - len(self._pool)
        for event in stamps[: max(room, 0)]:
            self._pool.append(event)


def clock_for(module: torch.nn.Module) -> Clock:
    """CUDA events when the module's parameters live on a CUDA device, else the CPU clock."""
    for param in module.parameters():
        if param.is_cuda:
            return CudaEventClock()
        break
    return CpuClock()
