"""Per-module statistics are true: steady-state medians, warm-up and compile steps apart, no partial
step, and a depth-cut label timed as the module that covers it (summary, /metrics and ``top``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from prometheus_client import CollectorRegistry, generate_latest
from torch import nn

import hooktrace
from hooktrace._aggregate.module_stats import RING
from hooktrace._aggregate.snapshot import MetricsSnapshot, RankInfo
from hooktrace._aggregate.stats import RankStats
from hooktrace._aggregate.step_record import ModuleSpan, StepRecord
from hooktrace.cli.top import Scrape, Target, build_view, parse_exposition
from hooktrace.export.prometheus import HooktraceCollector
from hooktrace.summary import RunSummary, merge_summaries
from tests.conftest import train

INFO = RankInfo("run-1", 0, 0, 1, "node", "0.1.0", "2.13.0", "cpu")
MS = 1_000_000
STEP_NS = 1_000 * MS
"""Each step starts on its own second, so spans of different steps never overlap."""

# (display name, label at --depth 3, parent index) of a GPT-like block: mlp is cut at depth 3,
# so its three children carry the label "blocks.0.mlp" too.
TREE = {
    0: ("blocks.0", "blocks.0", -1),
    1: ("blocks.0.mlp", "blocks.0.mlp", 0),
    2: ("blocks.0.mlp.c_fc", "blocks.0.mlp", 1),
    3: ("blocks.0.mlp.act", "blocks.0.mlp", 1),
    4: ("blocks.0.mlp.c_proj", "blocks.0.mlp", 1),
}


# --depth 1 with a ModuleList "blocks" that is never called itself: every block and what is inside
# carry the label "blocks"
LIST_TREE = {
    0: ("blocks.0", "blocks", -1),
    1: ("blocks.0.mlp", "blocks", 0),
    2: ("blocks.1", "blocks", -1),
    3: ("blocks.1.attn", "blocks", 2),
}


def span(
    index: int,
    start_ms: float,
    end_ms: float,
    self_ms: float | None = None,
    tree: dict[int, tuple[str, str, int]] = TREE,
) -> ModuleSpan:
    module, label, parent = tree[index]
    start, end = int(start_ms * MS), int(end_ms * MS)
    own = end - start if self_ms is None else int(self_ms * MS)
    return ModuleSpan(index, module, label, "Linear", "forward", start, end, own, module.count("."), parent)


def record(step: int, spans: list[ModuleSpan], *, compiled: bool = False, partial: bool = False) -> StepRecord:
    """A sampled step whose spans (given from 0 ms) are shifted onto the step's own second."""
    base = step * STEP_NS
    for s in spans:
        s.start_ns, s.end_ns = s.start_ns + base, s.end_ns + base
    end = max((s.end_ns for s in spans), default=base) + MS
    return StepRecord(
        step=step, rank=0, sampled=True, start_ns=base, end_ns=end, wall_start_ns=base,
        phases={"forward": (end - base) / 1e9}, phase_spans=[("forward", base, end)],
        micro_batches=1, optimizer_steps=1, spans=spans, compiled=compiled, partial=partial,
    )  # fmt: skip


def stats_of(records: list[StepRecord]) -> RankStats:
    stats = RankStats(INFO)
    for r in records:
        stats.add(r)
    return stats


def row(stats: RankStats, module: str, phase: str = "forward") -> dict[str, object]:
    return next(r for r in stats.module_rows() if r["module"] == module and r["phase"] == phase)


def registry(snapshot: MetricsSnapshot) -> CollectorRegistry:
    collector = HooktraceCollector()
    collector.update(snapshot)
    reg = CollectorRegistry()
    reg.register(collector)
    return reg


def module_series(snapshot: MetricsSnapshot, module: str, phase: str = "forward") -> tuple[float | None, ...]:
    """(sum, count) of ``hooktrace_module_duration_seconds`` in the exposition of ``snapshot``."""
    labels = {"run_id": snapshot.info.run_id, "rank": str(snapshot.info.rank), "module": module, "phase": phase}
    reg = registry(snapshot)
    name = "hooktrace_module_duration_seconds"
    return reg.get_sample_value(f"{name}_sum", labels), reg.get_sample_value(f"{name}_count", labels)


def top_rows(snapshot: MetricsSnapshot) -> dict[tuple[str, str], tuple[float, float]]:
    """``hooktrace top``'s module rows, (phase, module) -> (mean per call, calls), from a real exposition."""
    text = generate_latest(registry(snapshot)).decode()
    view = build_view([Scrape(Target("node:9750"), 0.0, parse_exposition(text))], {}, top=20)
    return {(m.phase, m.module): (m.mean_s, m.calls) for m in view.modules}


def test_the_first_step_and_a_compile_step_do_not_move_the_module_medians() -> None:
    steady = {2: 10.0, 3: 12.0, 5: 11.0, 6: 13.0, 7: 40.0}  # mean 17.2, median 12
    records = [record(1, [span(1, 0, 1300)])]  # warm-up: 1.3 s
    records += [record(step, [span(1, 0, ms, self_ms=ms / 2)]) for step, ms in steady.items()]
    records.append(record(4, [span(1, 0, 660, self_ms=600)], compiled=True))
    mlp = row(stats_of(records), "blocks.0.mlp")
    assert mlp["total_s"] == pytest.approx(0.012) and mlp["self_s"] == pytest.approx(0.006)
    assert mlp["steps"] == 5 and mlp["calls_per_step"] == 1
    assert mlp["warmup_total_s"] == pytest.approx(1.3)
    assert mlp["compile_total_s"] == pytest.approx(0.66) and mlp["compile_steps"] == 1
    assert mlp["compile_self_s"] == pytest.approx(0.6)


def test_a_compile_during_step_one_is_still_the_warm_up_step() -> None:
    stats = stats_of([record(1, [span(1, 0, 900)], compiled=True), record(2, [span(1, 0, 5)])])
    mlp = row(stats, "blocks.0.mlp")
    assert (mlp["warmup_total_s"], mlp["compile_steps"]) == (pytest.approx(0.9), 0)
    assert mlp["total_s"] == pytest.approx(0.005)


def test_p90_interpolates_between_the_closest_steady_steps() -> None:
    records = [record(1, [span(1, 0, 500)])]
    records += [record(step, [span(1, 0, step - 1)]) for step in range(2, 12)]  # 1..10 ms
    mlp = row(stats_of(records), "blocks.0.mlp")
    assert mlp["total_s"] == pytest.approx(0.0055)
    assert mlp["total_p90_s"] == pytest.approx(0.0091)
    assert mlp["self_p90_s"] == pytest.approx(0.0091)


def test_a_module_without_a_steady_step_has_no_median_only_its_first_step() -> None:
    mlp = row(stats_of([record(1, [span(1, 0, 40)])]), "blocks.0.mlp")
    assert mlp["total_s"] is None and mlp["total_p90_s"] is None and mlp["calls_per_step"] is None
    assert mlp["steps"] == 0 and mlp["warmup_total_s"] == pytest.approx(0.04)


def test_a_partial_last_step_is_not_a_step_anywhere() -> None:
    records = [record(step, [span(1, 0, 4), span(1, 5, 9)]) for step in (1, 2, 3)]
    records.append(record(4, [span(1, 0, 300)], partial=True))  # SIGTERM mid-forward: one slow call
    stats = stats_of(records)
    mlp = row(stats, "blocks.0.mlp")
    assert mlp["calls_per_step"] == 2 and mlp["steps"] == 2 and mlp["calls"] == 6
    assert mlp["total_s"] == pytest.approx(0.008) and mlp["total_p90_s"] == pytest.approx(0.008)
    rank = stats.rank_summary()
    assert (rank["steps"], rank["sampled_steps"], rank["partial_steps"]) == (3, 3, 1)
    assert rank["step_time_s"] == pytest.approx(0.010)
    assert stats.snapshot().steps_total == 3
    assert module_series(stats.snapshot(), "blocks.0.mlp") == (pytest.approx(0.016), 4)


def test_a_depth_cut_label_is_timed_as_its_covering_module_in_the_exposition_and_in_top() -> None:
    def block(step: int, mlp_ms: float) -> StepRecord:
        third = mlp_ms / 3
        return record(step, [
            span(0, 0, mlp_ms + 1), span(1, 0, mlp_ms, self_ms=0.1),
            span(2, 0, third), span(3, third, 2 * third), span(4, 2 * third, mlp_ms),
        ])  # fmt: skip

    stats = stats_of([block(1, 900.0), block(2, 5.0), block(3, 7.0)])
    snapshot = stats.snapshot()
    # the label stands for blocks.0.mlp: its inclusive time, its calls; the children are inside it
    assert module_series(snapshot, "blocks.0.mlp") == (pytest.approx(0.012), 2)
    assert top_rows(snapshot)[("forward", "blocks.0.mlp")] == (pytest.approx(0.006), 2)
    assert row(stats, "blocks.0.mlp")["total_s"] == pytest.approx(0.006)
    assert module_series(snapshot, "blocks.0") == (pytest.approx(0.014), 2)


def test_a_never_called_module_list_lets_its_called_children_stand_for_its_label() -> None:
    def step(n: int) -> StepRecord:
        return record(
            n, [span(i, start, end, tree=LIST_TREE) for i, start, end in ((0, 0, 3), (1, 0, 2), (2, 3, 7), (3, 4, 6))]
        )

    snapshot = stats_of([step(1), step(2), step(3)]).snapshot()
    # blocks.0 (3 ms) + blocks.1 (4 ms) per steady step, 2 calls per step; blocks.0.mlp and
    # blocks.1.attn are inside their block and add nothing
    assert module_series(snapshot, "blocks") == (pytest.approx(0.014), 4)
    assert top_rows(snapshot)[("forward", "blocks")] == (pytest.approx(0.0035), 4)


def test_module_statistics_keep_a_bounded_window_of_the_most_recent_steady_steps() -> None:
    stats = RankStats(INFO)
    for step in range(1, RING + 101):
        stats.add(record(step, [span(1, 0, 1)]))
    for step in range(RING + 101, 2 * RING + 101):
        stats.add(record(step, [span(1, 0, 2)]))
    mlp = row(stats, "blocks.0.mlp")
    assert mlp["steps"] == 2 * RING + 99
    assert mlp["total_s"] == pytest.approx(0.002) and mlp["total_p90_s"] == pytest.approx(0.002)
    assert all(len(ring.values) == RING for ring in (s.totals for s in stats.modules.stats.values()))


def test_the_printed_table_shows_steady_medians_and_says_so_with_step_one_apart() -> None:
    records = [record(1, [span(1, 0, 1300)])] + [record(step, [span(1, 0, 4)]) for step in (2, 3, 4)]
    records.append(record(5, [span(1, 0, 660)], compiled=True))
    stats = stats_of(records)
    summary = RunSummary("run-1", 1, 5, [stats.rank_summary()], stats.module_rows(), [], 0.0)
    text = summary.render()
    assert "median per steady-state sampled step" in text and "step 1 and compile steps apart" in text
    line = next(line for line in text.splitlines() if "forward blocks.0.mlp" in line)
    assert line.split()[2:4] == ["4.00", "ms"]  # the median, not a mean pulled up by 1.3 s and 660 ms
    assert "1.30 s" in line and "660.00 ms in 1" in line


def test_a_run_with_step_one_only_prints_its_figures_as_step_one_not_as_medians() -> None:
    stats = stats_of([record(1, [span(1, 0, 40)])])
    text = RunSummary("run-1", 1, 1, [stats.rank_summary()], stats.module_rows(), [], 0.0).render()
    assert "step 1 alone" in text and "no medians" in text
    assert "forward blocks.0.mlp  40.00 ms" in text


def test_merged_ranks_sort_modules_by_median_and_the_straggler_is_found_by_median_self_time() -> None:
    parts = []
    for rank, ms in ((0, 5.0), (1, 30.0)):
        stats = RankStats(RankInfo("run-1", rank, rank, 2, "node", "0.1.0", "2.13.0", "cpu"))
        for step in (1, 2, 3):
            r = record(step, [span(1, 0, 900 if step == 1 else ms)])
            r.rank = rank
            stats.add(r)
        parts.append(RunSummary("run-1", 2, 3, [stats.rank_summary()], stats.module_rows(), [], 0.0).as_dict())
    merged = merge_summaries(parts)
    assert [(m["rank"], m["total_s"]) for m in merged["modules"]] == [
        (1, pytest.approx(0.03)),
        (0, pytest.approx(0.005)),
    ]
    straggler = merged["straggler"]
    assert straggler["rank"] == 1
    assert straggler["modules"][0]["extra_s_per_step"] == pytest.approx(0.025)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.Linear(16, 16)
        self.mlp = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.attn(x))


class TinyGPT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def _train_tiny_gpt(tmp_path: Path, depth: int, steps: int = 3) -> hooktrace.Agent:
    torch.manual_seed(0)
    return train(TinyGPT(), lambda: torch.randn(8, 16), steps, tmp_path, sample_every=1, depth=depth)


def test_a_real_model_cut_at_depth_3_exposes_each_mlp_as_the_mlp_itself(tmp_path: Path) -> None:
    agent = _train_tiny_gpt(tmp_path, depth=3)
    mlp = row(agent.stats, "blocks.0.mlp")
    assert mlp["steps"] == 2 and mlp["calls_per_step"] == 1
    total, calls = module_series(agent.stats.snapshot(), "blocks.0.mlp")
    # two steady steps: their sum is twice their median; the three children are not added on top
    assert calls == 2 and total == pytest.approx(2 * mlp["total_s"], rel=1e-9)


def test_a_real_model_cut_at_depth_1_exposes_the_module_list_as_its_blocks_side_by_side(tmp_path: Path) -> None:
    agent = _train_tiny_gpt(tmp_path, depth=1)
    blocks = [row(agent.stats, f"blocks.{i}") for i in (0, 1)]
    total, calls = module_series(agent.stats.snapshot(), "blocks")
    assert calls == 4 and total == pytest.approx(sum(2 * b["total_s"] for b in blocks), rel=1e-9)
