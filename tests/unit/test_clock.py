"""Clocks: CUDA event stamps are resolved off the training thread, anchored to the host clock.

The CUDA path runs here on the CPU with an event stand-in that has ``torch.cuda.Event``'s API
(record, synchronize, elapsed_time); tests/cuda/ runs the real thing when a GPU is present.
"""

from __future__ import annotations

import time

from hooktrace._record.clock import CpuClock, CudaEventClock


class FakeEvent:
    """Records the host time when 'recorded'; elapsed_time in milliseconds like CUDA events."""

    created = 0

    def __init__(self) -> None:
        FakeEvent.created += 1
        self.t_ns = 0
        self.synced = False

    def record(self) -> None:
        self.t_ns = time.perf_counter_ns()

    def synchronize(self) -> None:
        self.synced = True

    def elapsed_time(self, other: FakeEvent) -> float:
        return (other.t_ns - self.t_ns) / 1e6


def test_cpu_stamps_are_host_nanoseconds() -> None:
    clock = CpuClock()
    a, b = clock.stamp(), clock.stamp()
    assert clock.resolve([a, b], clock.anchor()) == [a, b]


def test_cuda_stamps_resolve_relative_to_the_anchor_and_return_to_the_pool() -> None:
    clock = CudaEventClock(event_factory=FakeEvent)
    anchor = clock.anchor()
    time.sleep(0.002)
    stamps = [clock.stamp() for _ in range(3)]
    resolved = clock.resolve(stamps, anchor)
    assert all(s.synced for s in stamps)
    assert resolved == sorted(resolved)
    assert resolved[0] - anchor[1] >= 2_000_000  # 2 ms after the anchor, on the host clock
    before = FakeEvent.created
    clock.release(stamps)
    clock.stamp()
    clock.stamp()
    assert FakeEvent.created == before  # pooled events are reused, not created again


def test_the_event_pool_is_bounded() -> None:
    clock = CudaEventClock(event_factory=FakeEvent, max_pool=2)
    clock.release([FakeEvent() for _ in range(5)])
    assert len(clock._pool) == 2
