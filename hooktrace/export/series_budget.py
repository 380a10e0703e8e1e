"""Step-level series: what a rank outside ``--module-metrics-ranks`` exports, within a fixed budget.

A rank exports per-module series (``hooktrace_module_duration_seconds``,
``hooktrace_module_type_duration_seconds``, per-module ``hooktrace_grad_norm``,
``hooktrace_module_activation_bytes``) only when it is one
of the chosen ranks. Every rank keeps its step-level series: steps, the step and phase histograms,
the total gradient norm and its ratio, the gradient event counters, drops, errors, overhead and
``hooktrace_info``. Their number does not grow with the model: it is at most ``STEP_LEVEL_BUDGET``.

The two event counters labelled by module (``hooktrace_nonfinite_events_total`` and
``hooktrace_grad_clips_total``) keep counting on such a rank, summed into ``module="__total__"``;
the rank's ``steps.jsonl`` still names the module of every event.
"""

from __future__ import annotations

import dataclasses

from hooktrace._aggregate.snapshot import TOTAL, MetricsSnapshot

__all__ = ["STEP_LEVEL_BUDGET", "step_level"]

STEP_LEVEL_BUDGET = 150
"""Most series a rank without per-module series exports on ``/metrics`` (README "Scale"; checked by
tests/e2e/test_module_metrics_ranks.py after a real two-rank run)."""


def step_level(snap: MetricsSnapshot) -> MetricsSnapshot:
    """``snap`` without its per-module series; module-labelled event counters summed per phase."""
    nonfinite: dict[tuple[str, str], int] = {}
    for (_, phase), count in snap.nonfinite_events.items():
        nonfinite[(TOTAL, phase)] = nonfinite.get((TOTAL, phase), 0) + count
    clips = {TOTAL: sum(snap.grad_clips.values())} if snap.grad_clips else {}
    return dataclasses.replace(
        snap,
        module_duration={},
        module_type_duration={},
        module_activation_bytes={},
        grad_norm={TOTAL: snap.grad_norm[TOTAL]} if TOTAL in snap.grad_norm else {},
        nonfinite_events=nonfinite,
        grad_clips=clips,
    )
