"""Clocks: CUDA event stamps are resolved off the training thread, anchored to the host clock.

The CUDA path runs here on the CPU with an event stand-in that has ``torch.cuda.Event``'s API
(record, synchronize, elapsed_time); tests/cuda/ runs the real thing when a GPU is present.
"""

from __future__ import annotations

import time

import pytest

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


def test_device_side_allreduce_completions_become_an_allreduce_phase(tmp_path: object) -> None:
    """The CUDA path of DDP timing: completion events, read against the step's anchor."""
    import hooktrace
    from hooktrace._record.buffer import M_BWD, M_BWD_END, M_FWD, M_OPT, M_OPT_END, StepBuffer

    agent = hooktrace.Agent(out=str(tmp_path), metrics_port=0, write_files=False)
    clock = CudaEventClock(event_factory=FakeEvent)
    buf = StepBuffer(number=2, sampled=False, start_ns=0, clock=clock)
    buf.anchor = clock.anchor()
    t0 = buf.anchor[1]
    buf.start_ns = t0
    buf.marks = [(M_FWD, t0 + 1_000_000), (M_BWD, t0 + 2_000_000), (M_BWD_END, t0 + 3_000_000)]
    while time.perf_counter_ns() < t0 + 8_000_000:  # the bucket's all-reduce completes at ~8 ms
        time.sleep(0.0005)
    buf.comm_stamps = [clock.stamp()]
    done = buf.comm_stamps[0].t_ns
    buf.marks += [(M_OPT, done + 1_000_000), (M_OPT_END, done + 2_000_000)]
    buf.end_ns = done + 2_000_000
    record = agent.worker.processor.process(buf)
    agent.close()
    assert abs(record.phases["allreduce"] - (done - (t0 + 3_000_000)) / 1e9) < 1e-5  # event times are float ms
    assert sum(record.phases.values()) == pytest.approx(record.duration_s)
