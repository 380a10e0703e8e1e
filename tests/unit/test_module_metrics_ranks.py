"""--module-metrics-ranks: which ranks export per-module series; the others stay within the budget."""

from __future__ import annotations

import dataclasses

import pytest
from click.testing import CliRunner
from prometheus_client import CollectorRegistry, generate_latest

from hooktrace import Config, ConfigError
from hooktrace._aggregate.snapshot import TOTAL
from hooktrace.cli.main import CONFIG_OPTIONS
from hooktrace.distributed import RankChoice
from hooktrace.envvars import CONFIG_ENV
from hooktrace.export.prometheus import HooktraceCollector, PrometheusExporter
from hooktrace.export.series_budget import STEP_LEVEL_BUDGET, step_level
from tests.unit.test_prometheus_export import INFO, make_snapshot

MODULE_FAMILIES = (
    "hooktrace_module_duration_seconds",
    "hooktrace_module_type_duration_seconds",
    "hooktrace_module_activation_bytes",
)


def test_module_metrics_ranks_is_one_flag_one_variable_and_one_field_defaulting_to_auto() -> None:
    assert Config.resolve({}, environ={}).module_metrics_ranks == "auto"
    assert CONFIG_ENV["module_metrics_ranks"] == "HOOKTRACE_MODULE_METRICS_RANKS"
    assert "--module-metrics-ranks" in [flag for flag, _ in CONFIG_OPTIONS]
    env = {"HOOKTRACE_MODULE_METRICS_RANKS": "4, 0"}
    assert Config.resolve({}, environ=env).module_metrics_ranks == "0,4"
    assert Config.resolve({"module_metrics_ranks": "1"}, environ=env).module_metrics_ranks == "1"
    assert Config.resolve({"module_metrics_ranks": " ALL "}, environ={}).module_metrics_ranks == "all"
    assert Config.resolve({"trace_ranks": "all"}, environ={}).trace_ranks == "all"


def test_a_bad_module_metrics_ranks_value_names_the_flag_and_the_variable() -> None:
    with pytest.raises(ConfigError, match=r"--module-metrics-ranks / HOOKTRACE_MODULE_METRICS_RANKS must be auto, all"):
        Config.resolve({}, environ={"HOOKTRACE_MODULE_METRICS_RANKS": "rank0"})


def test_the_cli_refuses_a_bad_module_metrics_ranks_before_running_anything() -> None:
    from hooktrace.cli.main import cli

    result = CliRunner().invoke(cli, ["run", "--module-metrics-ranks", "first", "train.py"])
    assert result.exit_code == 2 and "--module-metrics-ranks / HOOKTRACE_MODULE_METRICS_RANKS must be" in result.output


@pytest.mark.parametrize(
    ("value", "rank", "local_rank", "world", "slowest", "included"),
    [
        ("auto", 7, 7, 8, None, True),  # up to 8 ranks: every rank
        ("auto", 0, 0, 1000, None, True),  # rank 0
        ("auto", 16, 0, 1000, None, True),  # one rank per node: its local rank 0
        ("auto", 17, 1, 1000, None, False),
        ("auto", 17, 1, 1000, 17, True),  # the slowest, once known
        ("all", 17, 1, 1000, None, True),
        ("0,17", 17, 1, 1000, None, True),
        ("0", 1, 1, 2, None, False),
        ("0", 1, 1, 2, 1, False),  # a list is a list: the slowest is not added
    ],
)
def test_a_rank_choice_covers_the_ranks_its_value_names(
    value: str, rank: int, local_rank: int, world: int, slowest: int | None, included: bool
) -> None:
    assert RankChoice(value, rank, local_rank, world, slowest).includes_this_rank() is included


def _scrape(collector: HooktraceCollector) -> str:
    registry = CollectorRegistry()
    registry.register(collector)
    return generate_latest(registry).decode()


def _series(text: str) -> list[str]:
    return [line for line in text.splitlines() if line and not line.startswith("#")]


def test_a_rank_outside_the_choice_exports_step_level_series_and_keeps_counting_module_events() -> None:
    other = RankChoice("0", INFO.rank, INFO.local_rank, INFO.world_size)
    collector = HooktraceCollector(INFO, other)
    collector.update(make_snapshot())
    text = _scrape(collector)
    for family in MODULE_FAMILIES:
        assert f"\n{family}_" not in text, family
    assert 'hooktrace_grad_norm{module="__total__",rank="1",run_id="run-42"} 2.5' in text
    assert 'module="blocks.0.attn"' not in text and 'module="__other__"' not in text
    assert 'hooktrace_nonfinite_events_total{module="__total__",phase="backward",rank="1",run_id="run-42"} 2.0' in text
    assert 'hooktrace_grad_clips_total{module="__total__",rank="1",run_id="run-42"} 1.0' in text
    assert "hooktrace_step_duration_seconds_count" in text and "hooktrace_phase_duration_seconds_sum" in text
    assert len(_series(text)) <= STEP_LEVEL_BUDGET


def test_a_rank_that_becomes_the_slowest_exports_module_series_at_the_next_scrape() -> None:
    info = dataclasses.replace(INFO, rank=17, local_rank=1, world_size=1000)
    exporter = PrometheusExporter(
        addr="127.0.0.1", base_port=0, local_rank=1, out_dir=None, info=info,
        module_ranks=RankChoice("auto", 17, 1, 1000),
    )  # fmt: skip
    exporter.refresh(make_snapshot(info=info))
    assert "hooktrace_module_duration_seconds_count" not in _scrape(exporter.collector)
    exporter.slowest_rank = 17
    assert exporter.slowest_rank == 17
    assert "hooktrace_module_duration_seconds_count" in _scrape(exporter.collector)


def test_the_step_level_view_changes_nothing_else_and_a_chosen_rank_exports_everything() -> None:
    snap = make_snapshot()
    cut = step_level(make_snapshot(module_activation_bytes={"blocks.0.attn": 4096}, memory_bytes={"parameters": 8}))
    assert cut.grad_norm == {TOTAL: 2.5} and cut.module_duration == {} and cut.module_type_duration == {}
    assert cut.module_activation_bytes == {} and cut.memory_bytes == {"parameters": 8}
    assert (cut.steps_total, cut.dropped, cut.optimizer_steps) == (snap.steps_total, snap.dropped, snap.optimizer_steps)
    assert step_level(make_snapshot(grad_norm={}, grad_clips={})).grad_clips == {}
    chosen = HooktraceCollector(INFO, RankChoice("1", INFO.rank, INFO.local_rank, INFO.world_size))
    chosen.update(snap)
    assert 'module="blocks.0.attn"' in _scrape(chosen)
