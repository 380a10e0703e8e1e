"""The gradient warnings a run prints: rate-limited per module, summed up, capped, summarised."""

from __future__ import annotations

from hooktrace._aggregate.step_record import StepEvent, StepRecord
from hooktrace.health.reporting import CAPPED, SpikeReporter
from tests.conftest import step_record


def _record(step: int, *events: StepEvent, rank: int = 0) -> StepRecord:
    return step_record(step, rank=rank, events=list(events))


def _spike(module: str, ratio: float = 12.0, value: float = 0.5) -> StepEvent:
    return StepEvent("grad_spike", module, "backward", value, {"ratio": ratio})


def test_a_module_spiking_every_step_is_named_once_per_hundred_steps() -> None:
    reporter = SpikeReporter()
    printed = {step: reporter.lines(_record(step, _spike("head"))) for step in range(1, 251)}
    assert {step for step, lines in printed.items() if lines} == {1, 101, 201}
    assert printed[101] == ["gradient spike at step 101 (rank 0): head 0.5 (12.0x median)"]


def test_a_total_spike_is_printed_at_every_step_and_names_the_modules_held_back() -> None:
    reporter = SpikeReporter()
    assert reporter.lines(_record(5, _spike("__total__", 41.0, 812.0), _spike("body.0"))) == [
        "gradient spike at step 5 (rank 0): __total__ 812 (41.0x median), body.0 0.5 (12.0x median)"
    ]
    assert reporter.lines(_record(6, _spike("__total__", 20.0, 400.0), _spike("body.0"))) == [
        "gradient spike at step 6 (rank 0): __total__ 400 (20.0x median) and 1 more module"
    ]


def test_many_modules_on_one_step_make_one_line_naming_the_three_largest() -> None:
    reporter = SpikeReporter()
    lines = reporter.lines(_record(7, *(_spike(f"blocks.{i}", ratio=10.0 + i) for i in range(10))))
    assert lines == [
        "gradient spike at step 7 (rank 0): blocks.9 0.5 (19.0x median), blocks.8 0.5 (18.0x median), "
        "blocks.7 0.5 (17.0x median) and 7 more modules"
    ]
    # the next step names the modules not named yet, never those named a step ago
    lines = reporter.lines(_record(8, *(_spike(f"blocks.{i}", ratio=10.0 + i) for i in range(10))))
    assert "blocks.6" in lines[0] and "blocks.9" not in lines[0]


def test_after_twenty_lines_one_line_says_the_rest_is_counted_and_nothing_more_is_printed() -> None:
    reporter = SpikeReporter()
    printed = [line for step in range(1, 40) for line in reporter.lines(_record(step, _spike("__total__")))]
    assert len(printed) == 21 and printed[-1] == CAPPED
    assert reporter.lines(_record(50, StepEvent("nonfinite", "head", "backward", None, {"first_module": "head"}))) == []


def test_non_finite_lines_name_where_the_gradient_went_non_finite_first() -> None:
    reporter = SpikeReporter()
    nan_input = StepEvent("nonfinite", "Sequential", "input", None, {"first_module": "Sequential"})
    nan_backward = StepEvent("nonfinite", "blocks", "backward", None, {"first_module": "blocks.3.attn"})
    assert reporter.lines(_record(295, nan_input, rank=1)) == [
        "non-finite gradient at step 295 (rank 1): the input of Sequential already held a NaN"
    ]
    assert reporter.lines(_record(296, nan_backward, rank=1)) == [
        "non-finite gradient at step 296 (rank 1): first in backward of blocks.3.attn"
    ]


def test_under_clip_or_raise_spikes_are_counted_but_not_printed() -> None:
    reporter = SpikeReporter(warn_spikes=False)
    assert reporter.lines(_record(3, _spike("__total__"), _spike("head"))) == []
    assert reporter.summary_lines() == [
        "gradient spikes on rank 0 at step 3: __total__ 1 step (max 12x median), head 1 step (max 12x median)"
    ]


def test_the_summary_counts_spikes_per_module_with_the_total_first() -> None:
    reporter = SpikeReporter()
    assert reporter.summary_lines() == []
    for step in range(150, 160):
        reporter.lines(_record(step, _spike("head", ratio=10.0 + step - 150)))
    reporter.lines(_record(160, _spike("__total__", 41.0), _spike("body.0", 15.0)))
    reporter.lines(_record(295, StepEvent("nonfinite", "head", "backward", None, {"first_module": "head"})))
    reporter.lines(_record(296, StepEvent("nonfinite", "head", "backward", None, {"first_module": "head"})))
    assert reporter.summary_lines() == [
        "gradient spikes on rank 0 at 11 steps from 150 to 160: __total__ 1 step (max 41x median), "
        "head 10 steps (max 19x median), body.0 1 step (max 15x median); 9 module spikes were not printed",
        "non-finite gradients on rank 0 at 2 steps; first at step 295: first in backward of head",
    ]


def test_memory_stays_bounded_by_the_modules_it_tracks() -> None:
    reporter = SpikeReporter(max_tracked=4)
    for step in range(1, 101):
        reporter.lines(_record(step, *(_spike(f"m{step}.{i}") for i in range(5))))
    assert len(reporter._modules) == 4
    summary = reporter.summary_lines()[0]
    assert summary.startswith("gradient spikes on rank 0 at 100 steps from 1 to 100: m1.0 1 step")
    assert "(and modules beyond the 4 counted one by one)" in summary
