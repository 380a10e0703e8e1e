"""Per-module times are right: known sleeps are measured, and nesting adds up."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import hooktrace
from tests import zoo
from tests.conftest import read_trace


def _run(tmp_path: Path, steps: int = 3, **options: object) -> hooktrace.RunSummary:
    torch.manual_seed(0)
    model = zoo.SleepyNet(forward_s=0.02, backward_s=0.03)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    agent = hooktrace.attach(model, out=str(tmp_path), metrics_port=0, sample_every=1, **options)
    for step in range(steps):
        opt.zero_grad()
        model(zoo.make_batch(step, model)).pow(2).mean().backward()
        opt.step()
    return agent.close()


def _row(summary: hooktrace.RunSummary, module: str, phase: str) -> dict[str, float]:
    return next(m for m in summary.modules if m["module"] == module and m["phase"] == phase)


@pytest.mark.parametrize("backward", ["auto", "full"])
def test_a_sleeping_module_is_measured_in_forward_and_in_backward(tmp_path: Path, backward: str) -> None:
    summary = _run(tmp_path, backward=backward)
    fwd = _row(summary, "slow.1", "forward")["per_step_s"]
    bwd = _row(summary, "slow.1", "backward")["per_step_s"]
    assert 0.020 <= fwd < 0.020 + 0.030  # a sleep never returns early; a loaded CI box may be late
    assert 0.030 <= bwd < 0.030 + 0.030
    # the parent contains the sleep, its sibling does not
    assert _row(summary, "slow", "forward")["per_step_s"] >= fwd
    assert _row(summary, "slow.0", "forward")["per_step_s"] < 0.005
    assert _row(summary, "inp", "backward")["per_step_s"] < 0.005


def test_inclusive_covers_children_and_self_is_inclusive_minus_children(tmp_path: Path) -> None:
    _run(tmp_path, steps=2)
    events = [e for e in read_trace(tmp_path) if e.get("ph") == "X" and e["cat"] in ("forward", "backward")]
    step_one = [e for e in events if e["ts"] < min(x["ts"] for x in events) + 1e6]
    for phase in ("forward", "backward"):
        spans = {e["args"]["module"]: e for e in step_one if e["cat"] == phase}
        children: dict[str, list[dict]] = defaultdict(list)
        for name, span in spans.items():
            parent = name.rpartition(".")[0] if "." in name else ("SleepyNet" if name != "SleepyNet" else None)
            if parent:
                children[parent].append(span)
        for parent, kids in children.items():
            total = spans[parent]["dur"]
            child_sum = sum(k["dur"] for k in kids)
            assert total + 1 >= child_sum, (phase, parent)
            assert spans[parent]["args"]["self_us"] == pytest.approx(total - child_sum, abs=2.0), (phase, parent)
            for kid in kids:  # children lie inside their parent (1 us rounding)
                assert kid["ts"] + 1 >= spans[parent]["ts"]
                assert kid["ts"] + kid["dur"] <= spans[parent]["ts"] + total + 1


def test_step_phases_add_up_to_the_step_duration(tmp_path: Path) -> None:
    from tests.conftest import read_steps

    _run(tmp_path, steps=3)
    for step in read_steps(tmp_path):
        assert sum(step["phases"].values()) == pytest.approx(step["duration_s"], rel=1e-6, abs=1e-8)
        assert step["phases"]["backward"] >= 0.03
        assert step["phases"]["forward"] >= 0.02


def test_full_backward_hooks_take_over_after_the_preflight_even_when_every_step_is_sampled(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(inplace=True), nn.Linear(8, 1))
    agent = hooktrace.attach(model, out=str(tmp_path), metrics_port=0, backward="full", sample_every=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    full_hooks = []
    for _ in range(3):
        opt.zero_grad()
        loss = model(torch.randn(2, 4)).pow(2).mean()
        full_hooks.append([len(m._backward_hooks) for m in model])
        loss.backward()
        opt.step()
    summary = agent.close()
    # step 1 runs the preflight; skipped: the inplace ReLU, and the modules whose input needs no grad
    assert full_hooks == [[0, 0, 0], [0, 0, 1], [0, 0, 1]]
    assert sorted(item["module"] for item in summary.backward_skipped) == ["0", "1", "Sequential"]


def test_the_plain_step_phases_equal_the_general_walk_on_random_marks() -> None:
    """The usual step (forward, backward, optimizer) skips the general walk over marks; it must
    give the same intervals, zero-length phases and equal stamps included."""
    import random

    from hooktrace._aggregate import timeline
    from hooktrace._record.buffer import M_BWD, M_BWD_END, M_FWD, M_OPT, M_OPT_END

    rng = random.Random(5)
    kinds = (M_FWD, M_BWD, M_BWD_END, M_OPT, M_OPT_END)
    for _ in range(3000):
        start = rng.randint(0, 50)
        stamps = sorted(start + rng.choice((0, rng.randint(0, 500))) for _ in kinds)
        marks = list(zip(kinds, stamps, strict=True))
        general = _walk(timeline, start, stamps[-1], marks)
        assert timeline.phase_intervals(start, stamps[-1], marks) == general
        assert sum(e - s for _, s, e in general) == stamps[-1] - start


def _walk(timeline: Any, start: int, end: int, marks: list[tuple[int, int]]) -> list[tuple[str, int, int]]:
    """``phase_intervals`` with its plain-step shortcut switched off."""
    shortcut, timeline._plain_step = timeline._plain_step, lambda *args: None
    try:
        return timeline.phase_intervals(start, end, marks)  # type: ignore[no-any-return]
    finally:
        timeline._plain_step = shortcut
