"""Activation bytes of a sampled step, from the storages each module call saved (worker thread).

A call's saves are ``(storage address, bytes)`` pairs (``_record/memory.py``). Here, per call:

- own: its saves, parameters and buffers left out, each storage once (a view counts its storage);
- inclusive: the union of its own and its subtree's storages (a tensor saved by two children
  counts once in the parent);
- self: its own storages that no child saved.

Saved tensors live until their backward, so the figures of one step are grouped by forward-backward:
the calls between two backward starts are alive together. A module's figure in a step is its
union over its calls in one such group (a module called twice keeps both calls' tensors), the
largest over the groups (micro-batches do not add up: each backward frees its forward's).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from hooktrace._aggregate.step_record import ModuleSpan
from hooktrace._record.buffer import FORWARD_KIND_PHASE, FWD_TRAIN, M_BWD, StepBuffer
from hooktrace._record.memory import UNMEASURED
from hooktrace._record.module_table import ModuleInfo

_Storages = dict[int, int]
"""storage address -> bytes"""


@dataclass(slots=True)
class StepMemory:
    """The activation figures of one sampled step."""

    calls: dict[tuple[int, int], tuple[int, int, int | None]] = field(default_factory=dict)
    """(module, call) -> (inclusive bytes, self bytes, CUDA allocated delta or None)."""
    modules: dict[tuple[int, str], tuple[int, int]] = field(default_factory=dict)
    """(module, phase) -> (inclusive, self) bytes in the step (see the module doc)."""
    labels: dict[str, int] = field(default_factory=dict)
    """metric label -> inclusive bytes of the training forward calls the label stands for."""
    total: int = 0
    """Bytes saved for backward by the step's module calls (largest forward-backward)."""
    unmeasured: int = 0
    """Saves whose storage could not be read (tensor subclasses without storage)."""


_EMPTY: _Storages = {}


def _union(parts: list[_Storages]) -> int:
    """Bytes of the union of several storage maps (one map: its own sum, no copy)."""
    if len(parts) == 1:
        return sum(parts[0].values())
    merged: _Storages = {}
    for part in parts:
        merged.update(part)
    return sum(merged.values())


def step_memory(buf: StepBuffer, infos: list[ModuleInfo]) -> StepMemory:
    """Inclusive and self bytes of every counted call of ``buf``, and their sums per module and label.

    Worker thread, once per sampled step: maps are built only where a call saved something, and
    unions only where several calls meet (a module called twice, a label shared by siblings)."""
    out = StepMemory()
    calls = buf.saved_calls
    params = buf.saved_params
    count = len(calls)
    own: list[_Storages] = [_EMPTY] * count
    for pos, record in enumerate(calls):
        if record[5]:
            kept: _Storages = {}
            for key, nbytes in record[5]:
                if nbytes == UNMEASURED:
                    out.unmeasured += 1
                elif key not in params:
                    kept[key] = nbytes
            own[pos] = kept
    inclusive: list[_Storages] = [_EMPTY] * count
    mine: list[_Storages] = [_EMPTY] * count
    below: list[_Storages | None] = [None] * count  # union of the children's inclusive maps
    sizes: list[tuple[int, int]] = [(0, 0)] * count
    for pos in range(count - 1, -1, -1):  # pre-order positions: every child is done before its parent
        mine_map, children = own[pos], below[pos]
        if children is None:
            whole = mine_map
        else:
            if mine_map:
                mine_map = {key: n for key, n in mine_map.items() if key not in children}
                children.update(mine_map)
            whole = children
        inclusive[pos], mine[pos] = whole, mine_map
        sizes[pos] = (sum(whole.values()), sum(mine_map.values()))
        parent = calls[pos][3]
        if whole and 0 <= parent < pos:
            into = below[parent]
            if into is None:
                below[parent] = dict(whole)
            else:
                into.update(whole)
    backward_before = _backward_counts(buf)
    last = len(backward_before) - 1
    groups: dict[tuple[int, str, int], list[int]] = {}
    labels: dict[tuple[str, int], list[int]] = {}
    roots: dict[int, list[int]] = {}
    for pos, record in enumerate(calls):
        index, call, kind, parent = record[0], record[1], record[2], record[3]
        out.calls[(index, call)] = (*sizes[pos], record[6])
        group = backward_before[min(record[4], last)]
        groups.setdefault((index, FORWARD_KIND_PHASE[kind], group), []).append(pos)
        if kind == FWD_TRAIN:
            label = infos[index].label if index < len(infos) else ""
            above = calls[parent][0] if parent >= 0 else -1
            if not (0 <= above < len(infos) and infos[above].label == label):  # else its parent covers it
                labels.setdefault((label, group), []).append(pos)
            if parent < 0:
                roots.setdefault(group, []).append(pos)
    for (index, phase, _), where in groups.items():
        if len(where) == 1:
            figures = sizes[where[0]]
        else:
            figures = (_union([inclusive[p] for p in where]), _union([mine[p] for p in where]))
        old = out.modules.get((index, phase), (0, 0))
        out.modules[(index, phase)] = (max(old[0], figures[0]), max(old[1], figures[1]))
    for (label, _), where in labels.items():
        out.labels[label] = max(out.labels.get(label, 0), _union([inclusive[p] for p in where]))
    out.total = max((_union([inclusive[p] for p in where]) for where in roots.values()), default=0)
    return out


def _backward_counts(buf: StepBuffer) -> list[int]:
    """``counts[n]``: backward passes started among the first ``n`` marks of the step."""
    counts = [0]
    for mark, _ in buf.marks:
        counts.append(counts[-1] + (mark == M_BWD))
    return counts


def annotate_spans(
    spans: Iterable[ModuleSpan], events: list[tuple[int, int, int, int]], memory: StepMemory, skipped: set[int]
) -> None:
    """Put each forward-kind span's bytes on it. A span is matched to its call through its start
    stamp (the forward pre-hook's event carries the call number). A call that counted nothing
    saved nothing (eval, inside a checkpointed region): 0; a module never counted: None."""
    call_of: dict[tuple[int, int], list[int]] = {}
    for kind, index, call, stamp in events:
        if kind in FORWARD_KIND_PHASE:
            call_of.setdefault((index, stamp), []).append(call)
    for span in spans:
        if span.phase == "backward" or span.index in skipped:
            continue
        found = call_of.get((span.index, span.start_ns))
        figures = memory.calls.get((span.index, found.pop(0))) if found else None
        if figures is None:
            span.activation_bytes, span.self_activation_bytes = 0, 0
        else:
            span.activation_bytes, span.self_activation_bytes, span.allocated_delta = figures
