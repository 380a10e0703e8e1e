"""Generate hooktrace's Grafana dashboards with the Grafana Foundation SDK.

The committed JSON under ``grafana/dashboards/`` is the product: ``hooktrace dashboards DIR`` copies
it and Grafana provisioning loads it, so nothing needs the SDK at runtime. This file is how that JSON
is made. Regenerate after editing::

    .venv/bin/python grafana/build.py          # rewrites grafana/dashboards/*.json

Output is deterministic (sorted keys, two-space indent, trailing newline);
``tests/unit/test_dashboards.py`` checks that regenerating reproduces the committed files byte for
byte, and that every query only uses the metric names of DESIGN §4.

Every query filters ``run_id=~"$run_id"`` and, where the series has one, ``rank=~"$rank"`` (never
``job``); every panel and target reads from the ``${datasource}`` variable; every panel sets a unit.
"""

from __future__ import annotations

import functools
import json
import sys
from importlib import metadata
from itertools import count
from pathlib import Path
from typing import TYPE_CHECKING, Any

from grafana_foundation_sdk.builders import common as cb
from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import heatmap, stat, table, timeseries
from grafana_foundation_sdk.builders import prometheus as pb
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common as cm
from grafana_foundation_sdk.models import dashboard as dm
from grafana_foundation_sdk.models import heatmap as hm
from grafana_foundation_sdk.models import prometheus as pm

if TYPE_CHECKING:
    from collections.abc import Iterator

    from grafana_foundation_sdk.cog.builder import Builder

GRAFANA_VERSION = "11.6"
"""The Grafana release the dashboards target (the image deploy/ names)."""

SDK_REQUIREMENT = "grafana-foundation-sdk==1769699379!11.6.0"
"""The SDK build for GRAFANA_VERSION; another build emits different JSON (schemaVersion, defaults)."""

DASHBOARDS_DIR = Path(__file__).resolve().parent / "dashboards"

DATASOURCE = dm.DataSourceRef(type_val="prometheus", uid="${datasource}")

SEL = 'run_id=~"$run_id", rank=~"$rank"'
"""The matchers every per-rank series gets."""

RATE = "[$__rate_interval]"


def _sel(*extra: str) -> str:
    return "{" + ", ".join((SEL, *extra)) + "}"


def _per_call(metric: str, by: str, *extra: str, window: str = RATE) -> str:
    """Mean seconds per observation of a summary/histogram: rate(_sum) / rate(_count)."""
    sel = _sel(*extra)
    return f"sum by ({by}) (rate({metric}_sum{sel}{window}))\n/ sum by ({by}) (rate({metric}_count{sel}{window}))"


def _increase(metric: str, by: str) -> str:
    return f"sum by ({by}) (increase({metric}{_sel()}{RATE}))"


def _target(expr: str, legend: str, ref: str = "A", *, fmt: pm.PromQueryFormat | None = None) -> pb.Dataquery:
    query = pb.Dataquery().expr(expr).legend_format(legend).ref_id(ref).datasource(DATASOURCE)
    if fmt is not None:
        query = query.format(fmt)
    if fmt is pm.PromQueryFormat.TABLE:
        query = query.instant()
    return query


def _targets(*pairs: tuple[str, str]) -> list[Builder[Any]]:
    """(expr, legend) pairs with refIds A, B, ..."""
    return [_target(expr, legend, chr(ord("A") + i)) for i, (expr, legend) in enumerate(pairs)]


def _legend(*calcs: str) -> cb.VizLegendOptions:
    mode = cm.LegendDisplayMode.TABLE if calcs else cm.LegendDisplayMode.LIST
    return (
        cb.VizLegendOptions()
        .display_mode(mode)
        .placement(cm.LegendPlacement.BOTTOM)
        .show_legend(True)
        .calcs(list(calcs))
    )


def _graph(
    ids: Iterator[int],
    title: str,
    description: str,
    unit: str,
    targets: list[Builder[Any]],
    *,
    w: int = 12,
    h: int = 8,
    bars: bool = False,
    stacked: bool = False,
    log: bool = False,
) -> timeseries.Panel:
    panel = (
        timeseries.Panel()
        .id(next(ids))
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .targets(targets)
        .unit(unit)
        .span(w)
        .height(h)
        .legend(_legend("mean", "max", "lastNotNull") if not bars else _legend())
        .tooltip(cb.VizTooltipOptions().mode(cm.TooltipDisplayMode.MULTI).sort(cm.SortOrder.DESCENDING))
    )
    if bars:
        panel = panel.draw_style(cm.GraphDrawStyle.BARS).fill_opacity(80)
    if stacked:
        panel = panel.stacking(cb.StackingConfig().mode(cm.StackingMode.NORMAL)).fill_opacity(60)
    if log:
        panel = panel.scale_distribution(cb.ScaleDistributionConfig().type(cm.ScaleDistribution.LOG).log(10))
    return panel


def _table(
    ids: Iterator[int],
    title: str,
    description: str,
    unit: str,
    expr: str,
    value_name: str,
    *,
    w: int = 12,
    hide: tuple[str, ...] = ("Time",),
) -> table.Panel:
    organize = dm.DataTransformerConfig(
        id_val="organize",
        options={"excludeByName": dict.fromkeys(hide, True), "renameByName": {"Value": value_name}},
    )
    return (
        table.Panel()
        .id(next(ids))
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .with_target(_target(expr, "", fmt=pm.PromQueryFormat.TABLE))
        .with_transformation(organize)
        .unit(unit)
        .sort_by([cb.TableSortByFieldState().display_name(value_name).desc(True)])
        .span(w)
        .height(10)
    )


def _stat(ids: Iterator[int], title: str, description: str, unit: str, expr: str, legend: str) -> stat.Panel:
    return (
        stat.Panel()
        .id(next(ids))
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .with_target(_target(expr, legend))
        .unit(unit)
        .decimals(2)
        .graph_mode(cm.BigValueGraphMode.AREA)
        .color_mode(cm.BigValueColorMode.VALUE)
        .reduce_options(cb.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
        .span(4)
        .height(6)
    )


def _thresholds(*steps: tuple[float | None, str]) -> db.ThresholdsConfig:
    return (
        db.ThresholdsConfig()
        .mode(dm.ThresholdsMode.ABSOLUTE)
        .steps([dm.Threshold(value=value, color=color) for value, color in steps])
    )


def _variable(name: str, label: str, query: str, *, multi: bool) -> db.QueryVariable:
    variable = (
        db.QueryVariable(name)
        .label(label)
        .datasource(DATASOURCE)
        .query(query)
        .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(dm.VariableSort.NATURAL_ASC)
    )
    if multi:
        # ".*" instead of Grafana's (a|b|...) keeps "All" queries short with hundreds of modules.
        variable = variable.multi(True).include_all(True).all_value(".*")
    return variable


def _variables() -> list[Builder[dm.VariableModel]]:
    return [
        db.DatasourceVariable("datasource").label("Data source").type("prometheus"),
        _variable("run_id", "Run", "label_values(hooktrace_info, run_id)", multi=False),
        _variable("rank", "Rank", 'label_values(hooktrace_info{run_id=~"$run_id"}, rank)', multi=True),
        _variable(
            "module",
            "Module",
            'label_values(hooktrace_module_duration_seconds_count{run_id=~"$run_id"}, module)',
            multi=True,
        ),
        _variable(
            "module_type",
            "Module type",
            'label_values(hooktrace_module_type_duration_seconds_count{run_id=~"$run_id"}, module_type)',
            multi=True,
        ),
    ]


def _overview(d: db.Dashboard, ids: Iterator[int]) -> None:
    d.with_row(db.Row("Overview").id(next(ids)))
    step = "hooktrace_step_duration_seconds"
    p90 = f"histogram_quantile(0.9, sum by (rank, le) (rate({step}_bucket{_sel()}{RATE})))"
    d.with_panel(
        _graph(
            ids,
            "Step time per rank",
            "Mean optimizer-step wall time per rank, and its p90 from the step histogram.",
            "s",
            _targets((_per_call(step, "rank"), "rank {{rank}} mean"), (p90, "rank {{rank}} p90")),
        )
    )
    d.with_panel(
        _graph(
            ids,
            "Step phase breakdown",
            "Mean seconds per step in each phase, averaged over the selected ranks; the stack is the step.",
            "s",
            _targets((_per_call("hooktrace_phase_duration_seconds", "phase"), "{{phase}}")),
            stacked=True,
        )
    )
    d.with_panel(
        _graph(
            ids,
            "Steps per second",
            "Optimizer steps per second on each rank.",
            "ops",
            _targets((f"sum by (rank) (rate(hooktrace_steps_total{_sel()}{RATE}))", "rank {{rank}}")),
            w=8,
            h=6,
        )
    )
    d.with_panel(
        _graph(
            ids,
            "Step time / median rank",
            "Each rank's 5m mean step time divided by the median rank's (recording rule); a straggler stands above 1.",
            "none",
            _targets(
                (f"hooktrace:step_duration_seconds:ratio_to_median{_sel()}", "rank {{rank}}"),
            ),
            w=8,
            h=6,
        )
    )
    d.with_panel(
        _stat(
            ids,
            "Straggler skew",
            "Slowest rank's step time over the median rank's (rule hooktrace:straggler_skew:ratio).",
            "none",
            'max(hooktrace:straggler_skew:ratio{run_id=~"$run_id"})',
            "skew",
        ).thresholds(_thresholds((None, "green"), (1.2, "orange"), (1.5, "red")))
    )
    d.with_panel(
        _stat(
            ids,
            "Agent overhead",
            "Time spent in hooktrace on the training threads, as a share of step time, per rank.",
            "percent",
            _overhead_expr(),
            "rank {{rank}}",
        ).thresholds(_thresholds((None, "green"), (2, "orange"), (5, "red")))
    )


def _overhead_expr() -> str:
    return (
        f"100 * sum by (rank) (rate(hooktrace_overhead_seconds_total{_sel()}{RATE}))\n"
        f"/ sum by (rank) (rate(hooktrace_step_duration_seconds_sum{_sel()}{RATE}))"
    )


def _modules(d: db.Dashboard, ids: Iterator[int]) -> None:
    d.with_row(db.Row("Modules (sampled steps)").id(next(ids)))
    module_time = "hooktrace_module_duration_seconds"
    bucket = "hooktrace_module_type_duration_seconds_bucket" + _sel('module_type=~"$module_type"')
    d.with_panel(
        heatmap.Panel()
        .id(next(ids))
        .title("Module time distribution: $module_type")
        .description("Forward and backward call durations of the modules of one type (a panel per type).")
        .datasource(DATASOURCE)
        .with_target(_target(f"sum by (le) (rate({bucket}{RATE}))", "{{le}}", fmt=pm.PromQueryFormat.HEATMAP))
        .unit("s")
        .calculate(False)
        .y_axis(heatmap.YAxisConfig().unit("s"))
        .cell_values(heatmap.CellValues().unit("short"))
        .color(heatmap.HeatmapColorOptions().mode(hm.HeatmapColorMode.SCHEME).scheme("Oranges").steps(64))
        .repeat("module_type")
        .repeat_direction("h")
        .max_per_row(4)
        .span(24)
        .height(8)
    )
    for phase in ("forward", "backward"):
        mean = _per_call(module_time, "module", f'phase="{phase}"', window="[$__range]")
        d.with_panel(
            _table(
                ids,
                f"Slowest modules: {phase}",
                f"The 20 modules with the longest mean {phase} time per call over the dashboard range, "
                "selected ranks together.",
                "s",
                f"topk(20,\n{mean}\n)",
                "mean per call",
            )
        )
    d.with_panel(
        _graph(
            ids,
            "Module time: $module",
            "Mean seconds per call of the selected modules, per rank and phase.",
            "s",
            _targets(
                (
                    _per_call(module_time, "rank, module, phase", 'module=~"$module"'),
                    "rank {{rank}} {{module}} {{phase}}",
                )
            ),
            w=24,
        )
    )


def _gradients(d: db.Dashboard, ids: Iterator[int]) -> None:
    d.with_row(db.Row("Gradient health").id(next(ids)))
    total = _sel('module="__total__"')
    d.with_panel(
        _graph(
            ids,
            "Total gradient norm",
            "L2 norm of all gradients at each optimizer step (finite only) and its 10m rolling median.",
            "none",
            _targets(
                (f"hooktrace_grad_norm{total}", "rank {{rank}}"),
                (f"quantile_over_time(0.5, hooktrace_grad_norm{total}[10m])", "rank {{rank}} median 10m"),
            ),
            log=True,
        )
    )
    d.with_panel(
        _graph(
            ids,
            "Gradient norm / rolling median",
            "A step is a spike when this ratio passes --explode-factor (default 10, the red line).",
            "none",
            _targets((f"hooktrace_grad_norm_ratio{_sel()}", "rank {{rank}}")),
            log=True,
        )
        .thresholds(_thresholds((None, "green"), (10, "red")))
        .thresholds_style(cb.GraphThresholdsStyleConfig().mode(cm.GraphThresholdsStyleMode.DASHED))
    )
    modules = _sel('module!="__total__"', 'module=~"$module"')
    top = f"topk(10, hooktrace_grad_norm{modules})"
    d.with_panel(
        _graph(
            ids,
            "Module gradient norms (top 10)",
            "The ten largest per-module gradient norms among the selected modules.",
            "none",
            _targets((top, "rank {{rank}} {{module}}")),
            log=True,
        )
    )
    d.with_panel(
        _graph(
            ids,
            "Gradient events",
            "Steps with a gradient spike, with a non-finite gradient, clipped tensors, "
            "steps the AMP GradScaler skipped, and steps per optimizer (which one stepped: a GAN has two).",
            "short",
            _targets(
                (_increase("hooktrace_grad_spike_steps_total", "rank"), "rank {{rank}} spike"),
                (_increase("hooktrace_nonfinite_grad_steps_total", "rank"), "rank {{rank}} non-finite"),
                (_increase("hooktrace_grad_clips_total", "rank"), "rank {{rank}} clipped"),
                (_increase("hooktrace_amp_skipped_steps_total", "rank"), "rank {{rank}} AMP skipped"),
                (_increase("hooktrace_optimizer_steps_total", "rank, optimizer"), "rank {{rank}} {{optimizer}} steps"),
            ),
            bars=True,
        )
    )
    d.with_panel(
        _table(
            ids,
            "Where gradients went non-finite",
            "First module to produce a non-finite gradient, per rank and phase, since the run started.",
            "short",
            f"sum by (rank, module, phase) (hooktrace_nonfinite_events_total{_sel()})",
            "steps",
        )
    )
    d.with_panel(
        _table(
            ids,
            "Clipped modules",
            "Gradient clips per module and rank since the run started (--on-explosion clip).",
            "short",
            f"sum by (rank, module) (hooktrace_grad_clips_total{_sel()})",
            "clips",
        )
    )


def _memory(d: db.Dashboard, ids: Iterator[int]) -> None:
    """Where the memory goes (--memory on): kinds, the modules that keep the most for backward,
    and on CUDA the reserved share of the device (the HooktraceMemoryNearLimit alert's figure)."""
    d.with_row(db.Row("Memory").id(next(ids)))
    kinds = _sel('kind!="device_total"')
    chosen = _sel('module=~"$module"')
    d.with_panel(
        _graph(
            ids,
            "Memory by kind",
            "Parameters, gradients and optimizer state; activations: bytes saved for backward in the last "
            "sampled step. On CUDA also the last step's allocated and reserved peaks (the CPU measures "
            "activation bytes only).",
            "bytes",
            _targets((f"max by (rank, kind) (hooktrace_memory_bytes{kinds})", "rank {{rank}} {{kind}}")),
        )
    )
    d.with_panel(
        _table(
            ids,
            "Largest activations",
            "The 20 modules that saved the most for backward in the last sampled step (children included), "
            "selected ranks together.",
            "bytes",
            f"topk(20, max by (module) (hooktrace_module_activation_bytes{_sel()}))",
            "saved for backward",
        )
    )
    d.with_panel(
        _graph(
            ids,
            "Activation bytes: $module",
            "Bytes the selected modules saved for backward, per sampled step and rank.",
            "bytes",
            _targets(
                (f"hooktrace_module_activation_bytes{chosen}", "rank {{rank}} {{module}}"),
            ),
        )
    )
    d.with_panel(
        _graph(
            ids,
            "GPU memory reserved / device",
            "CUDA: the allocator's reserved memory (step peak) as a share of the device; "
            "HooktraceMemoryNearLimit fires above 90 % (the red line) for 5 minutes.",
            "percent",
            _targets((f"100 * hooktrace:memory_reserved:ratio{_sel()}", "rank {{rank}}")),
        )
        .thresholds(_thresholds((None, "green"), (90, "red")))
        .thresholds_style(cb.GraphThresholdsStyleConfig().mode(cm.GraphThresholdsStyleMode.DASHED))
    )


def _agent(ids: Iterator[int]) -> db.Row:
    """A collapsed row: the agent's own health, rarely needed."""
    row = db.Row("Agent").id(next(ids))
    info = _table(
        ids,
        "Agent and ranks",
        "One line per rank: node, device, world size, hooktrace and torch versions.",
        "none",
        f"hooktrace_info{_sel()}",
        "info",
        w=24,
        hide=("Time", "Value", "__name__"),
    ).height(6)
    small = functools.partial(_graph, ids, w=8, h=6)
    panels: list[Builder[dm.Panel]] = [
        info,
        small(
            "Dropped",
            "Records the agent dropped instead of blocking training, by kind.",
            "short",
            _targets((_increase("hooktrace_dropped_total", "rank, what"), "rank {{rank}} {{what}}")),
            bars=True,
        ),
        small(
            "Hook errors",
            "Exceptions caught in hooks; after repeated errors the agent detaches.",
            "short",
            _targets((_increase("hooktrace_hook_errors_total", "rank"), "rank {{rank}}")),
            bars=True,
        ),
        small(
            "Export errors",
            "Errors raised by exporters on the worker thread, by exporter.",
            "short",
            _targets((_increase("hooktrace_export_errors_total", "rank, exporter"), "rank {{rank}} {{exporter}}")),
            bars=True,
        ),
        small(
            "Agent overhead over time",
            "Time spent in hooktrace on the training threads, as a share of step time.",
            "percent",
            _targets((_overhead_expr(), "rank {{rank}}")),
        ),
        small(
            "Scrape size",
            "Bytes of the last /metrics response of each rank.",
            "bytes",
            _targets((f"hooktrace_scrape_size_bytes{_sel()}", "rank {{rank}}")),
        ),
        small(
            "Module labels",
            "Distinct module label values in use, and modules folded into __other__ by --max-modules.",
            "short",
            _targets(
                (f"hooktrace_module_labels{_sel()}", "rank {{rank}} in use"),
                (f"hooktrace_module_labels_truncated{_sel()}", "rank {{rank}} folded into __other__"),
            ),
        ),
    ]
    for panel in panels:
        row = row.with_panel(panel)
    return row


def _training() -> dict[str, Any]:
    ids = count(1)
    d = (
        db.Dashboard("hooktrace / training")
        .uid("hooktrace-training")
        .description("One training run of hooktrace: step time, modules, gradient health and the agent.")
        .tags(["hooktrace", "pytorch"])
        .editable()
        .tooltip(dm.DashboardCursorSync.CROSSHAIR)
        .time("now-30m", "now")
        .refresh("10s")
        .variables(_variables())
    )
    _overview(d, ids)
    _modules(d, ids)
    _gradients(d, ids)
    _memory(d, ids)
    d.with_row(_agent(ids))
    model: dict[str, Any] = json.loads(json.dumps(d.build(), cls=JSONEncoder))
    return model


def _check_sdk() -> None:
    # Raise rather than emit: another SDK build writes other defaults and the committed JSON drifts.
    wanted = SDK_REQUIREMENT.split("==", 1)[1]
    found = metadata.version("grafana-foundation-sdk")
    if found != wanted:
        raise RuntimeError(
            f"grafana-foundation-sdk {found} is installed; the dashboards are built with {wanted} "
            f"(Grafana {GRAFANA_VERSION}): run `pip install '{SDK_REQUIREMENT}'`"
        )


def build_dashboards() -> dict[str, dict[str, Any]]:
    """File name -> dashboard JSON model, for every dashboard hooktrace ships."""
    _check_sdk()
    return {"hooktrace-training.json": _training()}


def render(model: dict[str, Any]) -> str:
    """The committed text of a dashboard model: sorted keys, two-space indent, trailing newline."""
    return json.dumps(model, indent=2, sort_keys=True) + "\n"


def write_dashboards(out_dir: Path | str = DASHBOARDS_DIR) -> list[Path]:
    """Write every dashboard into out_dir and return the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, model in build_dashboards().items():
        path = out / name
        path.write_text(render(model), encoding="utf-8")
        written.append(path)
    return written


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else DASHBOARDS_DIR
    for written_path in write_dashboards(target):
        print(written_path)
