"""Per-step gradient verdicts: total and per-module norms, spikes, non-finite localisation.

Runs on the worker thread in ``warn`` mode, and on the training thread at the optimizer
pre-hook when the user asked to ``clip`` or ``raise`` (the decision must precede the step).

The spike rule (``grad_spike`` events, ``hooktrace_grad_spike_steps_total``, the
``HooktraceGradientExplosion`` alert, ``--on-explosion``), with F = ``--explode-factor``:

- total norm: a spike when it exceeds F x the rolling median of the total over the last
  ``window`` (50) steps, once that history holds ``warmup`` (10) steps;
- a module's norm (its own parameters, aggregated to ``--depth``): a spike when it exceeds F x
  its own rolling median after the same warm-up, **and** is at least :data:`MODULE_FLOOR` x
  the rolling median of the total norm (itself warmed up). A module far below the total is
  noise for the model however much it jumps relative to itself.

``--on-explosion clip`` applies the module rule to each tensor (its own median, the same floor).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any

from hooktrace._aggregate.snapshot import TOTAL
from hooktrace._record.module_table import ModuleTable
from hooktrace.health.norms import ParamRef
from hooktrace.health.spikes import SpikeDetector

MODULE_FLOOR = 0.05
"""A module spike also needs a norm of at least this fraction of the total norm's rolling median.

Why 0.05: a module at 5 % of the total adds 0.25 % to the total's square (the total moves by
0.13 %), so below it a "spike" changes neither the update nor the loss in a way anyone
can act on; the false alarm this stops was a last layer at 0.004 of a total of ~1 jumping 10x
to 0.0047. The floor still catches what matters: a module whose norm is 1/sqrt(N) of the total
(N equal modules; 0.0625 for 256, the default --max-modules) is above it already, and any
module blowing up to 5 % of the total or more is reported, as is the total itself. 0.1 would
miss a 10x jump of a module that normally holds 0.5-1 % of the total, which can be the first
sign of a layer going unstable.
"""


def total_series(optimizers: Sequence[str]) -> str:
    """The detector series of a step's total norm: one per optimizer (or set of optimizers that
    step together), so a GAN's two models never share a baseline; ``__total__`` without one."""
    return f"{TOTAL}/{','.join(optimizers)}" if optimizers else TOTAL


@dataclass(slots=True)
class Verdict:
    """The health of one step's gradients."""

    total: float | None = None
    """Total L2 norm; None when non-finite or when no parameter had a gradient."""
    module_norms: dict[str, float] = field(default_factory=dict)
    """Finite norms per module label (own parameters, aggregated to --depth)."""
    param_norms: dict[str, float] = field(default_factory=dict)
    """Finite per-parameter norms (sampled steps and --watch parameters)."""
    ratio: float | None = None
    spike: bool = False
    spike_modules: dict[str, tuple[float, float]] = field(default_factory=dict)
    """label -> (norm, ratio) of the modules that spiked (``__total__`` for the model)."""
    spike_params: dict[int, float] = field(default_factory=dict)
    """param position -> clip threshold, for ``--on-explosion clip``."""
    nonfinite: bool = False
    nonfinite_params: list[int] = field(default_factory=list)
    clipped: dict[int, tuple[float, float]] = field(default_factory=dict)
    """param position -> (norm before, norm after) for tensors clipped by ``--on-explosion clip``."""


class GradHealth:
    """Holds the rolling medians; one instance per agent, used from one thread at a time."""

    def __init__(self, table: ModuleTable, explode_factor: float, watch_params: set[str] | None = None) -> None:
        self.table = table
        self.detector = SpikeDetector(explode_factor)
        self.param_detector = SpikeDetector(explode_factor, max_series=1 << 20)
        self.watch_params = watch_params or set()
        self._labels: list[str] = []
        self._labels_for: list[ParamRef] | None = None
        self._groups: tuple[list[str], list[Callable[[list[float]], Any]]] = ([], [])
        self._groups_for: list[ParamRef] | None = None
        self._series_names: dict[str, list[str]] = {}
        """total series -> its module series' names, in label order (made once, not per step)."""

    def evaluate(
        self,
        params: list[ParamRef],
        present: list[int],
        values: list[float],
        *,
        detail: bool,
        per_param: bool,
        total_series: str = TOTAL,
    ) -> Verdict:
        """Aggregate per-parameter norms and detect spikes (module docstring: the rule).
        ``values[i]`` is the norm of ``present[i]``.

        ``total_series`` names the detector series of the total norm: one per optimizer (such as
        ``"__total__/Adam#1"``) gives each optimizer of a GAN its own baseline, and its modules'
        series and floor follow it. The verdict names the total ``__total__`` whatever the series.
        """
        verdict = Verdict()
        if not values:
            return verdict
        if not per_param and len(present) == len(params):
            total = math.hypot(*values)  # non-finite when any value is: the general path names them
            if math.isfinite(total):
                return self._evaluate_all_finite(params, values, total, detail, total_series)
        sq_total = 0.0
        sq_label: dict[str, float] = defaultdict(float)
        if self._labels_for is not params:  # the parameter list changed: label per position again
            infos = self.table.infos
            self._labels = [infos[ref.module].label for ref in params]
            self._labels_for = params
        labels, watched = self._labels, self.watch_params
        baseline = self.detector.baseline(total_series)  # before this step: a spike does not lift its own floor
        floor = math.inf if baseline is None else MODULE_FLOOR * baseline
        for pos, value in zip(present, values, strict=True):
            if not math.isfinite(value):
                verdict.nonfinite = True
                verdict.nonfinite_params.append(pos)
                continue
            sq = value * value
            sq_total += sq
            sq_label[labels[pos]] += sq
            if detail or (watched and params[pos].name in watched):
                verdict.param_norms[params[pos].name] = value
            if per_param:
                ref = params[pos]
                threshold = self.param_detector.threshold(ref.name)
                spike, _ = self.param_detector.check(ref.name, value, floor)
                if spike and threshold is not None:
                    verdict.spike_params[pos] = threshold
        verdict.module_norms = {label: math.sqrt(sq) for label, sq in sq_label.items()}
        if verdict.nonfinite:
            return verdict
        verdict.total = math.sqrt(sq_total)
        spike, ratio = self.detector.check(total_series, verdict.total)
        verdict.ratio = ratio
        if spike:
            verdict.spike_modules[TOTAL] = (verdict.total, ratio or 0.0)
        prefix = "" if total_series == TOTAL else total_series + "|"  # modules shared by two optimizers
        for label, norm in verdict.module_norms.items():
            m_spike, m_ratio = self.detector.check(prefix + label, norm, floor)
            if m_spike:
                verdict.spike_modules[label] = (norm, m_ratio or 0.0)
        verdict.spike = bool(verdict.spike_modules)
        return verdict

    def _evaluate_all_finite(
        self, params: list[ParamRef], values: list[float], total: float, detail: bool, total_series: str
    ) -> Verdict:
        """``evaluate`` of the usual step on the worker: every parameter had a finite gradient, no
        per-tensor spike rule. The same verdict, with a norm per module label computed in C
        (``math.hypot`` over its parameters' norms) and one spike loop over the labels."""
        verdict = Verdict(total=total)
        labels, pickers = self._label_groups(params)
        module_norms = [math.hypot(*pick(values)) for pick in pickers]
        verdict.module_norms = dict(zip(labels, module_norms, strict=True))
        watched = self.watch_params
        if detail:
            verdict.param_norms = {ref.name: value for ref, value in zip(params, values, strict=True)}
        elif watched:
            verdict.param_norms = {ref.name: v for ref, v in zip(params, values, strict=True) if ref.name in watched}
        baseline = self.detector.baseline(total_series)  # before this step: a spike does not lift its own floor
        floor = math.inf if baseline is None else MODULE_FLOOR * baseline
        spike, ratio = self.detector.check(total_series, total)
        verdict.ratio = ratio
        if spike:
            verdict.spike_modules[TOTAL] = (total, ratio or 0.0)
        names = self._series_names.get(total_series)
        if names is None or len(names) != len(labels):
            names = labels if total_series == TOTAL else [f"{total_series}|{label}" for label in labels]
            self._series_names[total_series] = names
        for i, m_ratio in self.detector.check_many(names, module_norms, floor):
            verdict.spike_modules[labels[i]] = (module_norms[i], m_ratio)
        verdict.spike = bool(verdict.spike_modules)
        return verdict

    def _label_groups(self, params: list[ParamRef]) -> tuple[list[str], list[Callable[[list[float]], Any]]]:
        """Module labels in first-seen order and, for each, a function that picks its parameters'
        values out of a step's list (a slice where they are adjacent, the usual case)."""
        if self._groups_for is not params:
            infos = self.table.infos
            groups: dict[str, list[int]] = {}
            for pos, ref in enumerate(params):
                groups.setdefault(infos[ref.module].label, []).append(pos)
            self._groups = (list(groups), [_picker(group) for group in groups.values()])
            self._groups_for = params
            self._series_names.clear()
        return self._groups


def _picker(positions: list[int]) -> Callable[[list[float]], Any]:
    """``values -> the values at positions``: a slice when the positions are adjacent."""
    first, last = positions[0], positions[-1]
    if last - first + 1 == len(positions):
        return itemgetter(slice(first, last + 1))
    if len(positions) == 1:
        return lambda values: (values[first],)
    return itemgetter(*positions)


def locate_nonfinite(
    output_sums: list[tuple[int, float]],
    input_grad_norms: list[tuple[int, float]],
    output_grad_norms: list[tuple[int, float]],
    nonfinite_params: list[int],
    params: list[ParamRef],
    present: list[int],
) -> tuple[int, str] | None:
    """``(module index, phase)`` of the first module that produced a non-finite value.

    Forward first (sampled steps): the first module output, in completion order (so the
    innermost module), whose sum is non-finite. Else backward: on deep steps, the first module
    in backward order whose input gradient is non-finite though its output gradient was finite;
    on any step, the parameter gradients tell it: a NaN made in backward spreads only to the
    modules before it, so the culprit is the last module (in module order) whose parameter
    gradients are non-finite while a later module's are finite. None when this cannot be told.
    """
    for index, value in output_sums:
        if not math.isfinite(value):
            return index, "forward"
    finite_out = {index for index, value in output_grad_norms if math.isfinite(value)}
    for index, value in input_grad_norms:
        if not math.isfinite(value) and index in finite_out:
            return index, "backward"
    bad = set(nonfinite_params)
    bad_modules = {params[pos].module for pos in bad}
    good_modules = {params[pos].module for pos in present if pos not in bad}
    if bad_modules and good_modules:
        latest_bad = max(bad_modules)
        if any(module > latest_bad for module in good_modules):
            return latest_bad, "backward"
    return None


def nonfinite_source(buf: Any, verdict: Verdict, params: list[ParamRef], table: ModuleTable) -> tuple[str, str, str]:
    """``(module name, module label, phase)`` of where a step's gradient went non-finite.

    ``buf`` is the step's StepBuffer (its recorded output and gradient norms). Phase ``input``
    (and the root) when the batch itself held the NaN/Inf; ``unknown`` (and the first parameter
    owner) when the step recorded too little to tell.
    """
    infos = table.infos
    if buf.nonfinite_input is not None:
        root = infos[buf.nonfinite_input]
        return root.display, root.label, "input"
    if buf.forward_source is not None:
        source = infos[buf.forward_source]
        return source.display, source.label, "forward"
    where = locate_nonfinite(
        resolve_pairs(buf.output_norms),
        resolve_pairs(buf.input_grad_norms),
        resolve_pairs(buf.output_grad_norms),
        verdict.nonfinite_params,
        params,
        buf.grad_present,
    )
    if where is not None:
        return infos[where[0]].display, infos[where[0]].label, where[1]
    if verdict.nonfinite_params:
        info = infos[params[verdict.nonfinite_params[0]].module]
        return info.display, info.label, "unknown"
    return TOTAL, TOTAL, "unknown"


def resolve_pairs(pairs: Any) -> list[tuple[int, float]]:
    """``(module index, device scalar)`` pairs, or their ``HostCopy``, as host floats (worker)."""
    from hooktrace.health.norms import HostCopy

    if isinstance(pairs, HostCopy):
        return pairs.values()
    return HostCopy(pairs).values() if pairs else []
