"""Gradient-health charts (Plotly figure JSON): total norm, per-module heatmap, gradient flow.

Same rules as :mod:`hooktrace.report.figures`: plain dicts, bounded sizes, titles that say what
was left out.
"""

from __future__ import annotations

import math

from hooktrace.report.figures import (
    MAX_EVENTS,
    MAX_FLOW_STEPS,
    MAX_HEAT_MODULES,
    MAX_HEAT_STEPS,
    Figure,
    buckets,
    layout,
    reduce_series,
    rnd,
    spread,
    structure_of,
)
from hooktrace.report.load import RunData
from hooktrace.report.rows import first_rank_lines, module_norms
from hooktrace.report.tree import natural_key


def grad_norm_figure(run: RunData) -> Figure:
    """Total gradient norm, its rolling median and the spike threshold (factor x median)."""
    lines = [s for s in first_rank_lines(run) if "grad_norm" in s]
    factor = float(run.config.get("explode_factor", 10.0))
    xs = [s["step"] for s in lines]
    norms = [s.get("grad_norm") for s in lines]
    medians = [
        s["grad_norm"] / s["grad_norm_ratio"] if s.get("grad_norm") and s.get("grad_norm_ratio") else None
        for s in lines
    ]
    size = buckets(len(xs))
    bx, by = reduce_series(xs, norms, size, "max")
    mx, my = reduce_series(xs, medians, size)
    data = [
        {
            "type": "scatter",
            "mode": "lines",
            "name": "total norm" + (" (max per bucket)" if size > 1 else ""),
            "x": bx,
            "y": by,
            "line": {"color": "#1f77b4"},
        },
        {
            "type": "scatter",
            "mode": "lines",
            "name": "rolling median",
            "x": mx,
            "y": my,
            "line": {"color": "#555", "dash": "dot"},
        },
        {
            "type": "scatter",
            "mode": "lines",
            "name": f"spike threshold ({factor:g} x median)",
            "x": mx,
            "y": [rnd(v * factor) if v is not None else None for v in my],
            "line": {"color": "#d62728", "dash": "dash"},
        },
    ]
    spikes = [(s["step"], s.get("grad_norm")) for s in lines if any(e["kind"] == "grad_spike" for e in s["events"])]
    shown = spread(spikes, MAX_EVENTS)
    if shown:
        data.append(
            {
                "type": "scatter",
                "mode": "markers",
                "name": "spike",
                "x": [x for x, _ in shown],
                "y": [rnd(y) for _, y in shown],
                "marker": {"color": "#d62728", "size": 9},
            }
        )
    cut = f" ({len(shown):,} of {len(spikes):,} spikes marked, spread over the run)" if len(shown) < len(spikes) else ""
    return {
        "data": data,
        "layout": layout(
            f"Total gradient norm (log scale){cut}",
            xaxis={"title": {"text": "step"}},
            yaxis={"type": "log", "title": {"text": "norm"}},
        ),
    }


def heatmap_figure(run: RunData) -> Figure | None:
    """Per-module gradient norms, module x step, log colour: vanishing and exploding layers."""
    norms = module_norms(run)
    if not norms:
        return None
    order = {e["module"]: i for i, e in enumerate(structure_of(run))}
    modules = sorted(norms, key=lambda m: (order.get(m, len(order)), natural_key(m)))
    steps = sorted({s for values in norms.values() for s, _ in values})
    size = buckets(len(steps), MAX_HEAT_STEPS)
    column = {step: i // size for i, step in enumerate(steps)}  # recorded step -> its bucket
    shown = modules[:MAX_HEAT_MODULES]
    z = []
    for module in shown:
        # each cell is the largest norm of its bucket of steps: a one-step spike always shows
        cells: list[float | None] = [None] * math.ceil(len(steps) / size)
        for step, value in norms[module]:
            if value > 0 and math.isfinite(value):
                cell = cells[column[step]]
                cells[column[step]] = value if cell is None else max(cell, value)
        z.append([rnd(math.log10(v)) if v is not None else None for v in cells])
    cut = []
    if len(modules) > len(shown):
        cut.append(f"first {len(shown)} of {len(modules)} modules")
    if size > 1:
        cut.append(f"each cell the maximum over {size} recorded steps")
    data = [
        {
            "type": "heatmap",
            "x": steps[::size],  # a bucket is named by its first step
            "y": shown,
            "z": z,
            "colorscale": "Viridis",
            "colorbar": {"title": {"text": "log10 norm"}},
            "hovertemplate": "%{y}<br>step %{x}"
            + (f" and the next {size - 1} recorded<br>largest " if size > 1 else "<br>")
            + "log10 norm %{z:.2f}<extra></extra>",
        }
    ]
    return {
        "data": data,
        "layout": layout(
            "Gradient norm per module and step (log colour)" + (f" ({'; '.join(cut)})" if cut else ""),
            height=max(320, 16 * len(shown) + 140),
            xaxis={"title": {"text": "step (sampled or with an event)"}},
            yaxis={"autorange": "reversed", "automargin": True, "type": "category"},
        ),
    }


def flow_figure(run: RunData) -> Figure | None:
    """Gradient flow: ||grad_output|| per module, from the input end to the output, per flow step."""
    taken = [s for s in first_rank_lines(run) if s.get("output_grad_norms")][-MAX_FLOW_STEPS:]
    if not taken:
        return None
    order = {e["module"]: i for i, e in enumerate(structure_of(run))}
    data = []
    for line in taken:
        items = sorted(line["output_grad_norms"].items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0]))
        data.append(
            {
                "type": "scatter",
                "mode": "lines+markers",
                "name": f"step {line['step']}",
                "x": [k for k, _ in items],
                "y": [rnd(v) for _, v in items],
            }
        )
    return {
        "data": data,
        "layout": layout(
            "Gradient flow: norm of each module's output gradient (log scale)",
            yaxis={"type": "log", "title": {"text": "norm"}},
            xaxis={"automargin": True, "type": "category"},
            legend={"orientation": "v", "x": 1.01, "y": 1},  # clear of the slanted module names
        ),
    }
