"""Reading a run directory for a report, and the diff's noise rules, on small hand-written files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from hooktrace.report.diff import compare, render_diff
from hooktrace.report.load import ReportError, RunData, load_run
from hooktrace.report.rows import module_times, rank_breakdown


def _trace_line(event: dict[str, Any]) -> str:
    return json.dumps(event) + ",\n"


def _killed_dir(tmp_path: Path) -> Path:
    """What a run killed in its first seconds leaves: steps (the last line cut), an unclosed trace."""
    steps = [
        {"step": s, "rank": 0, "duration_s": d, "phases": {"forward": d / 2, "backward": d / 2}, "events": []}
        for s, d in ((1, 0.5), (2, 0.010), (3, 0.012), (4, 0.011))
    ]
    text = "".join(json.dumps(s) + "\n" for s in steps) + '{"step": 5, "rank": 0, "durat'
    (tmp_path / "rank0.steps.jsonl").write_text(text)
    lines = ["[\n", _trace_line({"name": "process_name", "ph": "M", "pid": 0, "tid": 0, "args": {"name": "rank 0"}})]
    for step, fc in ((1, 900.0), (3, 100.0), (5, 300.0)):  # sampled steps; step 1 is warm-up
        lines.append(
            _trace_line({"name": f"step {step}", "cat": "step", "ph": "X", "ts": 0, "dur": 1, "args": {"step": step}})
        )
        for _ in range(2):  # called twice a step
            args = {"module": "fc", "module_type": "Linear", "self_us": fc / 2}
            lines.append(
                _trace_line({"name": "forward fc", "cat": "forward", "ph": "X", "ts": 0, "dur": fc, "args": args})
            )
    lines.append('{"name":"forward fc","cat":"forward","ph":"X","ts":')  # cut by the kill
    (tmp_path / "rank0.trace.json").write_text("".join(lines))
    return tmp_path


def test_a_killed_run_is_read_from_its_steps_and_trace_and_says_what_it_lacks(tmp_path: Path) -> None:
    run = load_run(str(_killed_dir(tmp_path)))
    assert run.summary == {} and [s["step"] for s in run.steps[0]] == [1, 2, 3, 4]
    (row,) = run.modules
    # medians over steps 3 and 5 (step 1 apart), each step the sum of its two calls
    assert row["total_s"] == pytest.approx((200 + 600) / 2 / 1e6)
    assert row["self_s"] == pytest.approx((100 + 300) / 2 / 1e6)
    assert row["calls_per_step"] == 2 and row["warmup_total_s"] == pytest.approx(1800 / 1e6)
    assert any(m.startswith("no rank*.summary.json (the run was killed") for m in run.missing)
    assert any("not closed" in m for m in run.missing)
    (rank,) = rank_breakdown(run)
    assert rank["step_time_s"] == pytest.approx(0.011)  # steps 2-4: the warm-up step is left out
    assert rank["phases"]["forward"] == pytest.approx(0.0055)


def test_a_directory_with_nothing_to_report_is_an_error_that_says_so(tmp_path: Path) -> None:
    (tmp_path / "rank0.steps.jsonl").write_text("")
    with pytest.raises(ReportError, match="is it a hooktrace run directory"):
        load_run(str(tmp_path))
    with pytest.raises(ReportError, match="not a directory"):
        load_run(str(tmp_path / "missing"))


def _run(step_s: float, modules: dict[str, float], run_id: str) -> RunData:
    rows = [{"module": m, "phase": "forward", "rank": 0, "total_s": v, "self_s": v} for m, v in modules.items()]
    summary = {"run_id": run_id, "ranks": [{"rank": 0, "step_time_s": step_s, "phases": {"forward": step_s}}]}
    return RunData(run_dir=run_id, summary=summary, steps={}, modules=rows)


def test_diff_counts_a_change_only_above_the_noise_and_the_floor() -> None:
    base = _run(0.100, {"big": 0.050, "small": 0.0001, "steady": 0.020}, "a")
    new = _run(0.103, {"big": 0.060, "small": 0.0003, "steady": 0.0205}, "b")
    diff = compare(base, new, noise_pct=5, min_share_pct=0.5, fail_above=10)
    by_name = {c.name: c for c in diff.modules}
    assert diff.modules[0].name == "forward big"  # the largest change in time first
    assert by_name["forward big"].significant and by_name["forward big"].pct == pytest.approx(20)
    # +200% but 0.2 ms: under 0.5% of a 100 ms step, noise
    assert by_name["forward small"].pct == pytest.approx(200) and not by_name["forward small"].significant
    assert not by_name["forward steady"].significant  # +2.5%: under the 5% noise
    assert not diff.step.significant  # +3%
    assert [c.name for c in diff.failed] == ["forward big"]
    assert compare(base, new, fail_above=25).failed == []


def test_diff_json_is_strict_even_for_a_module_that_took_no_time_before() -> None:
    base = _run(0.1, {"new_work": 0.0}, "a")
    new = _run(0.1, {"new_work": 0.01}, "b")
    diff = compare(base, new, fail_above=50)
    (change,) = diff.modules
    assert change.pct is None and change.significant and diff.failed == [change]
    json.dumps(diff.as_dict(), allow_nan=False)


def _ranks(run_id: str, *ranks: tuple[float, float]) -> RunData:
    """A run whose ranks have these (step time, forward time) medians."""
    rows = [{"rank": r, "step_time_s": step, "phases": {"forward": fwd}} for r, (step, fwd) in enumerate(ranks)]
    return RunData(run_dir=run_id, summary={"run_id": run_id, "ranks": rows}, steps={}, modules=[])


def test_diff_takes_the_same_median_over_ranks_for_the_step_and_its_phases() -> None:
    # two ranks: the median is their mean, for the step and for each phase alike (not the slower rank)
    base = _ranks("a", (0.010, 0.004), (0.020, 0.014))
    new = _ranks("b", (0.010, 0.004), (0.020, 0.014))
    diff = compare(base, new)
    forward = next(p for p in diff.phases if p.name == "forward")
    assert diff.step.base_s == pytest.approx(0.015)
    assert forward.base_s == pytest.approx(0.009) and forward.new_s == pytest.approx(0.009)


def test_diff_does_not_compare_a_warm_up_figure_with_a_median_and_says_so() -> None:
    base = _run(0.010, {"fc": 0.001, "head": 0.002}, "a")
    new = _run(0.010, {"fc": 0.001, "head": 0.002}, "b")
    # in the new run, head has no steady-state median: only its step-1 figure, 50x its usual time
    new.modules[1].update(total_s=None, self_s=None, warmup_total_s=0.1, warmup_self_s=0.1)
    diff = compare(base, new, fail_above=10)
    assert [c.name for c in diff.modules] == ["forward fc"]
    assert diff.warmup_only == ["forward head"] and diff.failed == []
    assert any("not compared" in n and "warm-up (step 1)" in n and "forward head" in n for n in diff.notes)
    assert diff.as_dict()["warmup_only"] == ["forward head"]
    text = render_diff(diff)
    assert "Note: 1 module row not compared: only a warm-up (step 1) figure" in text
    assert text.rstrip().endswith("OK: nothing slowed by more than 10%")


def test_a_module_with_a_steady_median_on_one_rank_is_timed_by_that_rank_not_its_warm_up() -> None:
    run = _run(0.010, {"fc": 0.001}, "a")
    run.modules.append({"module": "fc", "phase": "forward", "rank": 1, "total_s": None, "self_s": None,
                        "warmup_total_s": 0.5, "warmup_self_s": 0.5})  # fmt: skip
    times = module_times(run)["fc"]
    assert times.self_s["forward"] == pytest.approx(0.001) and times.warmup == set()
