"""How much of the worker thread's CPU time cost training: the part during which training stood still.

The worker shares the GIL with the training thread. While the worker holds it and training
wants it, training waits: that time is the agent's overhead. While training runs kernels that
released the GIL (a convolution, a matmul), the worker runs beside it on another core and
training loses nothing. The training thread's CPU clock tells the two apart: over a stretch of
worker work lasting ``wall``, training ran for ``ran`` of it and stood still for ``wall - ran``;
the charge is that time, at most the worker's own CPU time over the stretch. (A long stretch in
which the two take turns at the GIL is charged the worker's whole share, not a fraction of it.)

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
        self._thread: tuple[int, int] | None = None
        """(``threading.get_ident()``, ``threading.get_native_id()``) of the training thread: a new
        thread may reuse an ended one's ident, never while both live with the same native id."""
        self._start: tuple[int, int, int | None, int | None] = (0, 0, None, None)

    def watch(self, ident: int, native_id: int) -> None:
        """Follow the CPU clock of the thread ``(ident, native_id)`` (the training thread)."""
        if (ident, native_id) == self._thread:
            return
        clock: int | None = None
        try:
            found = time.pthread_getcpuclockid(ident)
            time.clock_gettime_ns(found)
            clock = found
        except (AttributeError, OSError):  # no such clock here: whole CPU time is charged
            pass
        self._clock = clock  # one assignment: a stretch reads one clock or the other, never a mix
        self._thread = (ident, native_id)

    @staticmethod
    def _cpu_of(clock: int | None) -> int | None:
        if clock is None:
            return None
        try:
            return time.clock_gettime_ns(clock)
        except OSError:  # the training thread is gone
            return None

    def begin(self) -> None:
        clock = self._clock
        self._start = (_own_cpu(), _wall(), clock, self._cpu_of(clock))

    def end(self) -> int:
        """Nanoseconds of worker CPU time since ``begin`` during which training stood still."""
        cpu0, wall0, clock, trained0 = self._start
        used = _own_cpu() - cpu0
        if trained0 is None:
            return used
        trained1 = self._cpu_of(clock)  # the clock of begin(), even if the training thread changed since
        if trained1 is None:
            return used
        still = (_wall() - wall0) - (trained1 - trained0)
        return min(used, max(0, still))
