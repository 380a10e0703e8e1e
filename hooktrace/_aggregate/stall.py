"""How much of the worker thread's CPU time cost training: the part during which training stood still.

The worker shares the GIL with the training thread. While the worker holds it and training
wants it, training waits: that time is the agent's overhead. While training runs kernels that
released the GIL (a convolution, a matmul), the worker runs beside it on another core and
training loses nothing. The training thread's CPU clock tells the two apart: over a stretch of
worker work lasting ``wall``, training ran for ``ran`` of it, and the worker's CPU time over that
stretch is charged in the proportion ``1 - ran / wall``.

Training that stands still for another reason meanwhile (reading a file, ``time.sleep``) is
charged too; training that runs but slower because the worker shares its core's caches is not.
Where another thread's CPU clock cannot be read (a platform without ``pthread_getcpuclockid``),
the worker's whole CPU time is charged.
"""

from __future__ import annotations

import time

_wall = time.perf_counter_ns
_own_cpu = time.thread_time_ns


class StallMeter:
    """Worker thread only (``watch`` from any thread): ``begin``/``end`` around each stretch of work."""

    def __init__(self) -> None:
        self._clock: int | None = None
        """CPU clock id of the training thread; None: charge the worker's whole CPU time."""
        self._ident: int | None = None
        self._start: tuple[int, int, int | None] = (0, 0, None)

    def watch(self, ident: int) -> None:
        """Follow the CPU clock of thread ``ident`` (the training thread)."""
        if ident == self._ident:
            return
        self._ident = ident
        try:
            clock = time.pthread_getcpuclockid(ident)
            time.clock_gettime_ns(clock)
        except (AttributeError, OSError):  # no such clock here: whole CPU time is charged
            self._clock = None
            return
        self._clock = clock

    def _training_cpu(self) -> int | None:
        clock = self._clock
        if clock is None:
            return None
        try:
            return time.clock_gettime_ns(clock)
        except OSError:  # the training thread is gone
            return None

    def begin(self) -> None:
        self._start = (_own_cpu(), _wall(), self._training_cpu())

    def end(self) -> int:
        """Nanoseconds of worker CPU time since ``begin`` that training spent standing still."""
        cpu0, wall0, trained0 = self._start
        used = _own_cpu() - cpu0
        if trained0 is None:
            return used
        trained1, wall = self._training_cpu(), _wall() - wall0
        if trained1 is None or wall <= 0:
            return used
        ran = (trained1 - trained0) / wall
        return round(used * min(1.0, max(0.0, 1.0 - ran)))
