"""The HTML report's limits: a run of 10,000 steps and 1,000 modules stays under 10 MiB, is built in
seconds and says what it left out; without Plotly the error is one line naming the fix."""

from __future__ import annotations

import json
import math
import re
import sys
import time
from typing import Any

import pytest

from hooktrace.report import figures, grad_figures
from hooktrace.report.html import MAX_BYTES, build_html
from hooktrace.report.load import ReportError, RunData

STEPS = 10_000
MODULES = 1_000


def _big_run() -> RunData:
    names = [f"layers.{i // 4}.{'abcd'[i % 4]}" for i in range(MODULES - 251)]
    names = [*(f"layers.{i}" for i in range(250)), *names]
    model = [{"module": "Big", "type": "Big", "parent": None, "key": "", "extra_repr": "", "trainable": 0, "frozen": 0}]
    model += [{"module": "layers", "type": "ModuleList", "parent": "Big", "key": "layers", "extra_repr": ""}]
    for name in names:
        parent = name.rsplit(".", 1)[0]
        model.append({"module": name, "type": "Linear", "parent": "Big" if parent == "layers.x" else parent,
                      "key": name.rsplit(".", 1)[1], "extra_repr": "in_features=8, out_features=8, bias=True",
                      "trainable": 72, "frozen": 0})  # fmt: skip
    modules = [
        {"module": name, "phase": phase, "rank": 0, "total_s": 1e-5 * (i % 37 + 1), "self_s": 1e-6 * (i % 37 + 1),
         "calls_per_step": 1.0, "module_type": "Linear"}
        for i, name in enumerate(names) for phase in ("forward", "backward")
    ]  # fmt: skip
    lines: list[dict[str, Any]] = []
    for step in range(1, STEPS + 1):
        line: dict[str, Any] = {
            "step": step, "rank": 0, "duration_s": 0.01 + 0.001 * math.sin(step), "sampled": step % 10 == 1,
            "phases": {"data": 0.001, "forward": 0.003, "backward": 0.004, "optimizer": 0.001},
            "grad_norm": 1.0 + 0.1 * math.cos(step), "grad_norm_ratio": 1.0, "events": [],
        }  # fmt: skip
        if step % 10 == 1:
            line["module_grad_norms"] = {name: 0.5 + (i % 13) for i, name in enumerate(names)}
        if step % 500 == 0:
            line["events"] = [{"kind": "grad_spike", "module": "__total__", "phase": "backward", "value": 50.0}]
            line["output_grad_norms"] = {name: 0.1 * (i + 1) for i, name in enumerate(names[:50])}
        lines.append(line)
    summary = {
        "run_id": "big", "world_size": 1, "steps": STEPS, "device": "cpu", "modules": modules, "model": model,
        "ranks": [{"rank": 0, "step_time_s": 0.01, "phases": {"forward": 0.003}, "overhead_ratio": 0.01}],
        "never_called": names[-3:], "backward_skipped": [{"module": names[0], "reason": "inplace=True"}],
        "config": {"explode_factor": 10.0},
    }  # fmt: skip
    return RunData(run_dir="/nonexistent/big", summary=summary, steps={0: lines}, modules=modules)


def test_ten_thousand_steps_and_a_thousand_modules_fit_the_budget_and_say_what_was_cut() -> None:
    run = _big_run()
    started = time.monotonic()
    page = build_html(run)
    took = time.monotonic() - started
    assert took < 20, f"built in {took:.1f} s"
    assert len(page.encode()) <= MAX_BYTES
    data = json.loads(re.search(r"id='hooktrace-figures'>(.*?)</script>", page, re.S).group(1))  # type: ignore[union-attr]
    steps = data["steps-rank0"]["data"]
    assert all(len(trace["x"]) <= figures.MAX_POINTS for trace in steps)
    assert "mean of every 5 steps" in data["steps-rank0"]["layout"]["title"]["text"]
    assert [t["name"] for t in steps if t["mode"] == "markers"] == ["grad_spike"]  # events kept, not averaged
    heat = data["grad-heatmap"]["data"][0]
    assert len(heat["y"]) == figures.MAX_HEAT_MODULES and len(heat["x"]) <= figures.MAX_HEAT_STEPS
    assert (
        f"first {figures.MAX_HEAT_MODULES} of {MODULES - 1} modules" in data["grad-heatmap"]["layout"]["title"]["text"]
    )
    assert len(data["module-tree"]["data"][0]["ids"]) <= figures.MAX_TREE_MODULES
    assert "the slowest and their parents" in data["module-tree"]["layout"]["title"]["text"]
    norm = data["grad-norm"]["data"]
    assert len(norm[0]["x"]) <= figures.MAX_POINTS and "(max per bucket)" in norm[0]["name"]
    assert "inplace=True" in page and "Never called</b> (3)" in page
    # module names such as "0" (an nn.Sequential's children) must not be read as numbers
    for fig_id, axis in (("modules-forward", "yaxis"), ("modules-backward", "yaxis"), ("grad-heatmap", "yaxis")):
        assert data[fig_id]["layout"][axis]["type"] == "category", fig_id
    assert data["grad-flow"]["layout"]["xaxis"]["type"] == "category"


def test_the_heatmap_is_a_log_scale_of_the_norms() -> None:
    run = _big_run()
    heat = grad_figures.heatmap_figure(run)
    assert heat is not None
    row = heat["data"][0]["z"][0]
    name = heat["data"][0]["y"][0]
    first = run.steps[0][0]["module_grad_norms"][name]
    assert row[0] == pytest.approx(math.log10(first), rel=1e-5)


def test_without_plotly_the_error_is_one_line_naming_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "plotly.offline", None)
    with pytest.raises(ReportError) as info:
        build_html(_big_run())
    message = str(info.value)
    assert "\n" not in message and "pip install 'hooktrace[report]'" in message


def test_ranks_are_drawn_side_by_side_and_the_straggler_is_named_with_its_modules() -> None:
    def lines(rank: int, step_s: float) -> list[dict[str, Any]]:
        return [
            {"step": s, "rank": rank, "duration_s": step_s, "phases": {"forward": step_s / 2}, "events": []}
            for s in range(1, 30)
        ]

    straggler = {
        "rank": 1,
        "ratio": 1.8,
        "modules": [{"module": "enc.3", "phase": "backward", "extra_s_per_step": 0.004}],
    }
    summary = {
        "run_id": "ddp", "world_size": 2, "steps": 29, "device": "cpu", "straggler": straggler,
        "ranks": [{"rank": 0, "step_time_s": 0.010, "phases": {"forward": 0.005}},
                  {"rank": 1, "step_time_s": 0.018, "phases": {"forward": 0.013}}],
    }  # fmt: skip
    run = RunData(
        run_dir="/nonexistent/ddp", summary=summary, steps={0: lines(0, 0.01), 1: lines(1, 0.018)}, modules=[]
    )
    page = build_html(run)
    data = json.loads(re.search(r"id='hooktrace-figures'>(.*?)</script>", page, re.S).group(1))  # type: ignore[union-attr]
    assert {"steps-rank0", "steps-rank1"} <= set(data)
    forward = next(t for t in data["ranks"]["data"] if t["name"] == "forward")
    assert forward["x"] == ["rank 0", "rank 1"] and forward["y"] == [5.0, 13.0]
    assert "Straggler: rank 1</b>, busy 1.80x the median rank" in page
    assert "<td>backward</td><td>enc.3</td><td>4.00 ms</td>" in page


def test_a_non_finite_step_is_marked_and_its_null_numbers_draw_as_gaps() -> None:
    lines: list[dict[str, Any]] = [
        {"step": s, "rank": 0, "duration_s": 0.01, "phases": {"forward": 0.004, "backward": 0.005},
         "grad_norm": 2.0, "grad_norm_ratio": 1.0, "events": []}
        for s in range(1, 6)
    ]  # fmt: skip
    lines[3].update(
        phases={"forward": None, "backward": 0.005},
        grad_norm=None,
        grad_norm_ratio=None,
        events=[{"kind": "nonfinite", "module": "fc", "first_module": "fc", "phase": "forward", "value": None}],
    )
    run = RunData(run_dir="/nonexistent/nan", summary={}, steps={0: lines}, modules=[])
    data = json.loads(re.search(r"id='hooktrace-figures'>(.*?)</script>", build_html(run), re.S).group(1))  # type: ignore[union-attr]
    marks = next(t for t in data["steps-rank0"]["data"] if t["name"] == "nonfinite")
    assert marks["x"] == [4] and "nonfinite fc (forward)" in marks["text"][0]
    forward = next(t for t in data["steps-rank0"]["data"] if t["name"] == "forward")
    assert forward["y"] == [4.0, 4.0, 4.0, 0.0, 4.0]
    norm = data["grad-norm"]["data"][0]
    assert norm["y"] == [2.0, 2.0, 2.0, None, 2.0]


def _figures(run: RunData) -> dict[str, Any]:
    page = build_html(run)
    return json.loads(re.search(r"id='hooktrace-figures'>(.*?)</script>", page, re.S).group(1))  # type: ignore[union-attr]


def test_past_the_event_cap_the_severe_events_are_kept_the_rest_spread_and_the_title_says_so() -> None:
    # a clip on every one of 3,000 steps, a spike late in the run and a non-finite step near the end
    lines: list[dict[str, Any]] = [
        {"step": s, "rank": 0, "duration_s": 0.01, "phases": {"forward": 0.004}, "grad_norm": 1.0,
         "grad_norm_ratio": 1.0, "events": [{"kind": "grad_clip", "module": "__total__", "value": 1.5}]}
        for s in range(1, 3001)
    ]  # fmt: skip
    lines[2499]["events"].append({"kind": "grad_spike", "module": "__total__", "phase": "backward", "value": 40.0})
    lines[2899]["events"].append({"kind": "nonfinite", "module": "fc", "first_module": "fc", "value": None})
    run = RunData(run_dir="/nonexistent/clips", summary={}, steps={0: lines}, modules=[])
    steps = _figures(run)["steps-rank0"]
    marks = {t["name"]: t["x"] for t in steps["data"] if t["mode"] == "markers"}
    assert marks["nonfinite"] == [2900] and marks["grad_spike"] == [2500]
    assert len(marks["grad_clip"]) == figures.MAX_EVENTS - 2
    assert marks["grad_clip"][0] == 1 and marks["grad_clip"][-1] == 3000  # spread over the run, not the first ones
    assert f"{figures.MAX_EVENTS:,} of 3,002 events marked" in steps["layout"]["title"]["text"]


def test_under_the_event_cap_every_event_is_marked_and_the_title_cuts_nothing() -> None:
    lines: list[dict[str, Any]] = [
        {"step": s, "rank": 0, "duration_s": 0.01, "phases": {"forward": 0.004},
         "events": [{"kind": "grad_clip", "module": "__total__", "value": 1.5}] if s % 3 == 0 else []}
        for s in range(1, 31)
    ]  # fmt: skip
    run = RunData(run_dir="/nonexistent/few", summary={}, steps={0: lines}, modules=[])
    steps = _figures(run)["steps-rank0"]
    (clips,) = [t for t in steps["data"] if t["mode"] == "markers"]
    assert clips["x"] == list(range(3, 31, 3)) and steps["layout"]["title"]["text"].endswith("; events marked")


def test_a_thinned_heatmap_keeps_a_one_step_module_spike_and_says_cells_are_bucket_maxima() -> None:
    # 1,200 recorded steps make buckets of 3 (at most 500 columns); the spike is on a bucket's 2nd step
    lines: list[dict[str, Any]] = [
        {"step": s, "rank": 0, "duration_s": 0.01, "events": [],
         "module_grad_norms": {"a": 1.0, "b": 1e6 if s == 1001 else 0.01}}
        for s in range(1, 1201)
    ]  # fmt: skip
    run = RunData(run_dir="/nonexistent/heat", summary={}, steps={0: lines}, modules=[])
    heat = grad_figures.heatmap_figure(run)
    assert heat is not None
    trace = heat["data"][0]
    assert len(trace["x"]) == 400 and trace["x"][:3] == [1, 4, 7]
    row = trace["z"][trace["y"].index("b")]
    assert max(row) == pytest.approx(6.0)  # log10 of the spike's 1e6
    assert row[1000 // 3] == pytest.approx(6.0) and row[0] == pytest.approx(-2.0)
    assert "each cell the maximum over 3 recorded steps" in heat["layout"]["title"]["text"]
