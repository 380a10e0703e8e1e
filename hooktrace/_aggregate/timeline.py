"""Turn a step's marks into phase durations and its module events into timed intervals.

Runs on the worker thread. Phases partition the step exactly (they sum to its duration):
``data`` until the first forward, ``forward`` until backward starts (the loss included),
``backward`` until the end-of-backward callback, ``optimizer`` from there to the last
optimizer step; gaps between micro-batches are ``data``; no-grad forwards are ``eval``.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from hooktrace._record.buffer import (
    BWD_END,
    BWD_START,
    FORWARD_KIND_PHASE,
    FWD_END,
    M_AR_END,
    M_BWD,
    M_BWD_END,
    M_EVAL,
    M_EVAL_END,
    M_FWD,
    M_OPT,
    M_OPT_END,
)

_AFTER_BACKWARD = "after_backward"


_PLAIN_STEP = (M_FWD, M_BWD, M_BWD_END, M_OPT, M_OPT_END)
_PLAIN_PHASES = ("data", "forward", "backward", "optimizer", "optimizer")


def phase_intervals(start_ns: int, end_ns: int, marks: list[tuple[int, int]]) -> list[tuple[str, int, int]]:
    """``[(phase, start, end), ...]`` covering ``[start_ns, end_ns]`` without gaps or overlaps."""
    if len(marks) == 5:
        plain = _plain_step(start_ns, end_ns, marks)
        if plain is not None:
            return plain
    out: list[tuple[str, int, int]] = []
    pending: list[tuple[int, int]] = []  # time after a backward, assigned once we know what follows
    current = "data"
    before_eval = "data"
    in_optimizer = False  # inside optimizer.step(closure): gaps between closure calls are the optimizer's
    cursor = start_ns

    def spend(until: int) -> None:
        nonlocal cursor
        stop = max(cursor, min(until, end_ns))
        if stop > cursor:
            if current == _AFTER_BACKWARD:
                pending.append((cursor, stop))
            else:
                out.append((current, cursor, stop))
        cursor = stop

    def settle(phase: str) -> None:
        out.extend((phase, s, e) for s, e in pending)
        pending.clear()

    for mark, t in sorted(marks, key=lambda m: m[1]):
        spend(t)
        if mark == M_FWD:
            settle("optimizer" if in_optimizer else "data")
            current = "forward"
        elif mark == M_EVAL:
            before_eval = current
            current = "eval"
        elif mark == M_EVAL_END:
            current = before_eval
        elif mark == M_BWD:
            settle("forward")
            current = "backward"
        elif mark == M_BWD_END:
            current = _AFTER_BACKWARD
        elif mark in (M_OPT, M_OPT_END):
            settle("optimizer")
            current = "optimizer"
            in_optimizer = mark == M_OPT
        elif mark == M_AR_END and current == _AFTER_BACKWARD:
            settle("allreduce")  # compute is done: this wait is exposed communication
    spend(end_ns)
    settle("optimizer")
    out.sort(key=lambda item: item[1])
    merged: list[tuple[str, int, int]] = []
    for phase, s, e in out:
        if merged and merged[-1][0] == phase and merged[-1][2] == s:
            merged[-1] = (phase, merged[-1][1], e)
        else:
            merged.append((phase, s, e))
    return merged


def _plain_step(start_ns: int, end_ns: int, marks: list[tuple[int, int]]) -> list[tuple[str, int, int]] | None:
    """The usual step (one forward, backward, optimizer step; nothing between backward and the
    optimizer but its own time), without the general walk: most steps of most runs."""
    kinds = tuple(mark for mark, _ in marks)
    if kinds != _PLAIN_STEP:
        return None
    times = [start_ns, *(t for _, t in marks)]
    if times != sorted(times) or times[-1] != end_ns:
        return None
    out: list[tuple[str, int, int]] = []
    for phase, start, stop in zip(_PLAIN_PHASES, times, times[1:], strict=False):
        if stop > start:
            if out and out[-1][0] == phase:
                out[-1] = (phase, out[-1][1], stop)
            else:
                out.append((phase, start, stop))
    return out


def phase_durations(intervals: list[tuple[str, int, int]]) -> dict[str, float]:
    """Seconds per phase of ``phase_intervals``; they sum to the step's duration."""
    totals: dict[str, int] = defaultdict(int)
    for phase, s, e in intervals:
        totals[phase] += e - s
    return {phase: ns / 1e9 for phase, ns in totals.items()}


@dataclass(slots=True)
class Interval:
    """One call of one module in one phase, in host-clock nanoseconds."""

    index: int
    phase: str
    start: int
    end: int
    child_ns: int = 0
    depth: int = 0

    @property
    def inclusive_ns(self) -> int:
        return max(0, self.end - self.start)

    @property
    def self_ns(self) -> int:
        return max(0, self.inclusive_ns - self.child_ns)


def module_intervals(
    events: list[tuple[int, int, int, int]], backward_end_ns: list[int], parents: list[int]
) -> list[Interval]:
    """Pair forward pre/post and backward start/end events into nested intervals with self time.

    ``events`` carry resolved host-clock stamps. A backward that has a start but no end (its
    inputs needed no grad, e.g. the first layer) ends at the next event of a module outside its
    subtree, or at the end of that backward pass.
    """
    intervals: list[Interval] = []
    open_fwd: dict[int, list[Interval]] = defaultdict(list)
    bwd: dict[tuple[int, int], Interval] = {}
    full_open: dict[int, list[Interval]] = defaultdict(list)
    for kind, index, call, t in events:
        if kind in FORWARD_KIND_PHASE:
            iv = Interval(index, FORWARD_KIND_PHASE[kind], t, -1)
            open_fwd[index].append(iv)
            intervals.append(iv)
        elif kind == FWD_END:
            stack = open_fwd.get(index)
            if stack:
                stack.pop().end = t
        elif kind == BWD_START:
            if call < 0:
                iv = Interval(index, "backward", t, -1)
                full_open[index].append(iv)
                intervals.append(iv)
            elif (index, call) not in bwd:
                iv = Interval(index, "backward", t, -1)
                bwd[(index, call)] = iv
                intervals.append(iv)
            else:
                iv = bwd[(index, call)]
                iv.start = min(iv.start, t)
        elif kind == BWD_END:
            if call < 0:
                stack = full_open.get(index)
                if stack:
                    stack.pop().end = t
            else:
                found = bwd.get((index, call))
                if found is not None and t >= found.start:
                    found.end = max(found.end, t)
    _close_open_backward([iv for iv in intervals if iv.phase == "backward"], backward_end_ns, parents)
    intervals = [iv for iv in intervals if iv.end >= iv.start]
    _nest(intervals, parents)
    return intervals


def _is_ancestor(ancestor: int, index: int, parents: list[int]) -> bool:
    while index >= 0:
        if index == ancestor:
            return True
        index = parents[index] if index < len(parents) else -1
    return False


def _close_open_backward(backward: list[Interval], backward_end_ns: list[int], parents: list[int]) -> None:
    """End each unfinished backward interval at the first later stamp outside its subtree."""
    stamps = sorted([(iv.start, iv.index) for iv in backward] + [(iv.end, iv.index) for iv in backward if iv.end >= 0])
    for iv in backward:
        if iv.end >= 0:
            continue
        limit = next((t for t in backward_end_ns if t >= iv.start), None)
        end = limit if limit is not None else iv.start
        for t, index in stamps:
            if t > iv.start and (limit is None or t <= limit) and not _is_ancestor(iv.index, index, parents):
                end = t
                break
        iv.end = end


def _nest(intervals: list[Interval], parents: list[int]) -> None:
    """Attach each interval to its enclosing one of the same phase group; compute child time."""
    depth: dict[int, int] = {}

    def tree_depth(index: int) -> int:
        if index not in depth:
            parent = parents[index] if 0 <= index < len(parents) else -1
            depth[index] = 0 if parent < 0 else tree_depth(parent) + 1
        return depth[index]

    for group in ({"forward", "eval", "recompute"}, {"backward"}):
        # equal intervals (a wrapper and its only child share stamps): the module tree decides
        members = sorted(
            (iv for iv in intervals if iv.phase in group), key=lambda iv: (iv.start, -iv.end, tree_depth(iv.index))
        )
        stack: list[Interval] = []
        for iv in members:
            while stack and not (iv.start >= stack[-1].start and iv.end <= stack[-1].end):
                stack.pop()
            if stack:
                parent = stack[-1]
                iv.depth = parent.depth + 1
                parent.child_ns += iv.inclusive_ns
            stack.append(iv)
