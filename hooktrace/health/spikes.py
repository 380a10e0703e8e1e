"""Rolling-median spike detection for many series at once.

A spike is a finite value above ``factor`` x the median of the same series over the last
``window`` steps, after ``warmup`` steps. Spikes enter the history too: a median ignores a few
outliers, and a lasting change of level becomes the new baseline within half a window instead
of being reported at every later step. Non-finite values never enter it.

A caller may add an absolute ``floor``: the value must also reach it to count as a spike (the
per-module floor of :class:`hooktrace.health.monitor.GradHealth`); it enters the history all
the same.
"""

from __future__ import annotations

import math
from bisect import bisect_left, insort
from collections import deque


class RollingMedian:
    """The last ``window`` accepted values of one series, in arrival order (to evict) and sorted
    (bisect), so a median costs O(log n) comparisons in C instead of a sort per step on the worker
    thread."""

    __slots__ = ("_sorted", "values")

    def __init__(self, window: int) -> None:
        self.values: deque[float] = deque(maxlen=window)
        self._sorted: list[float] = []

    def median(self) -> float | None:
        n = len(self._sorted)
        if n == 0:
            return None
        mid = n // 2
        return self._sorted[mid] if n % 2 else (self._sorted[mid - 1] + self._sorted[mid]) / 2

    def add(self, value: float) -> None:
        if len(self.values) == self.values.maxlen:
            del self._sorted[bisect_left(self._sorted, self.values[0])]
        self.values.append(value)
        insort(self._sorted, value)


class SpikeDetector:
    """Keeps one rolling median per series name; bounded by ``max_series``."""

    def __init__(self, factor: float, window: int = 50, warmup: int = 10, max_series: int = 4096) -> None:
        self.factor = factor
        self.window = window
        self.warmup = warmup
        self.max_series = max_series
        self._series: dict[str, RollingMedian] = {}
        self._found: tuple[list[str] | None, list[RollingMedian | None]] = (None, [])
        """``check_many``'s last names list and their series, looked up once for every step."""

    def check(self, name: str, value: float, floor: float = 0.0) -> tuple[bool, float | None]:
        """``(is_spike, ratio to median)``; records ``value`` in the history (evicting the oldest
        once the window is full). A spike is also at least ``floor``."""
        series = self._series.get(name)
        if series is None:
            if len(self._series) >= self.max_series:
                return False, None
            series = self._series[name] = RollingMedian(self.window)
        if not math.isfinite(value):
            return False, None
        med = series.median()
        ratio = value / med if med else None
        spike = (
            med is not None
            and len(series.values) >= self.warmup
            and med > 0
            and value > self.factor * med
            and value >= floor
        )
        series.add(value)
        return spike, ratio

    def check_many(self, names: list[str], values: list[float], floor: float) -> list[tuple[int, float]]:
        """``check`` of many finite values at once (the worker's every-step module series):
        ``[(i, ratio)]`` of the spikes, each value recorded. The same rule, one loop without a
        call per series."""
        spikes: list[tuple[int, float]] = []
        found = self._found
        if found[0] is not names or len(found[1]) != len(names):
            found = self._found = (names, [self._series_of(name) for name in names])
        factor, warmup, window = self.factor, self.warmup, self.window
        for i, series in enumerate(found[1]):
            if series is None:
                continue  # beyond max_series
            value = values[i]
            ordered = series._sorted
            n = len(ordered)
            if n >= warmup:
                mid = n // 2
                med = ordered[mid] if n % 2 else (ordered[mid - 1] + ordered[mid]) / 2
                if med > 0 and value > factor * med and value >= floor:
                    spikes.append((i, value / med))
            history = series.values
            if n == window:
                del ordered[bisect_left(ordered, history[0])]
            history.append(value)
            insort(ordered, value)
        return spikes

    def _series_of(self, name: str) -> RollingMedian | None:
        series = self._series.get(name)
        if series is None and len(self._series) < self.max_series:
            series = self._series[name] = RollingMedian(self.window)
        return series

    def baseline(self, name: str) -> float | None:
        """The rolling median of ``name`` once it holds ``warmup`` values, else None."""
        series = self._series.get(name)
        if series is None or len(series.values) < self.warmup:
            return None
        return series.median()

    def threshold(self, name: str) -> float | None:
        """The value above which ``name`` counts as a spike, once warmed up."""
        series = self._series.get(name)
        if series is None or len(series.values) < self.warmup:
            return None
        med = series.median()
        return self.factor * med if med else None
