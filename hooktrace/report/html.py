"""``hooktrace report --html``: one self-contained HTML file that opens offline.

Plotly's JavaScript bundle (from the ``plotly`` Python package, the ``report`` extra) is inlined
in a ``<script>`` element, followed by the figures as JSON; styles are inline too and fonts are the
system's, so the page fetches nothing. See :mod:`hooktrace.report.figures` for the charts.
"""

from __future__ import annotations

import html
import json
import os
import time
from typing import Any

from hooktrace.report import figures, grad_figures
from hooktrace.report.load import ReportError, RunData
from hooktrace.report.rows import fmt_s, header

MAX_BYTES = 10 * 1024 * 1024
"""The budget of a report file; the charts are capped so that no run exceeds it."""

INSTALL_HINT = (
    "hooktrace report --html needs Plotly's JavaScript: pip install 'hooktrace[report]' (or: pip install plotly)"
)


def plotly_js() -> str:
    """The minified plotly.js shipped inside the ``plotly`` Python package."""
    try:
        from plotly.offline import get_plotlyjs
    except ImportError:
        raise ReportError(INSTALL_HINT) from None
    return str(get_plotlyjs())


_STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;background:#fafafa;color:#222}
header{background:#263238;color:#fff;padding:14px 24px}header h1{margin:0 0 6px;font-size:20px}
header dl{display:flex;flex-wrap:wrap;gap:4px 22px;margin:0}header dt{opacity:.7;font-size:12px}
header dd{margin:0;font-weight:600}main{padding:8px 24px 40px}section{background:#fff;border:1px solid #e0e0e0;
border-radius:6px;margin:14px 0;padding:8px 14px}h2{font-size:16px;margin:8px 0}.chart{width:100%;min-height:320px}
.two{display:grid;grid-template-columns:1fr 1fr;gap:12px}@media(max-width:1000px){.two{grid-template-columns:1fr}}
table{border-collapse:collapse;font-size:13px}td,th{padding:3px 10px;border-bottom:1px solid #eee;text-align:left}
.note{background:#fff8e1;border-color:#ffe082}.muted{color:#777;font-size:12px}
"""

_CATCH = """
window.hooktraceErrors=[];window.addEventListener('error',function(e){window.hooktraceErrors.push(String(e.message));
document.documentElement.setAttribute('data-errors',window.hooktraceErrors.join(' | '));});
"""
"""First script of the page: a failing chart says so in the page (and in ``data-errors``) instead of
leaving a blank space; the browser test reads the attribute too."""

_BOOT = """
(function(){var figs=JSON.parse(document.getElementById('hooktrace-figures').textContent);
var cfg={responsive:true,displaylogo:false,scrollZoom:true};
Object.keys(figs).forEach(function(id){try{Plotly.newPlot(id,figs[id].data,figs[id].layout,cfg);}
catch(e){document.getElementById(id).textContent='This chart failed: '+e;window.hooktraceErrors.push(String(e));
document.documentElement.setAttribute('data-errors',window.hooktraceErrors.join(' | '));}});
document.body.setAttribute('data-charts',String(Object.keys(figs).length));})();
"""


def _esc(value: Any) -> str:
    return html.escape(str(value))


def _table(head: list[str], rows: list[list[Any]]) -> str:
    cells = "".join(f"<th>{_esc(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{_esc(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{cells}</tr>{body}</table>"


def _header(run: RunData) -> str:
    facts = header(run)
    overhead = facts["overhead_ratio"]
    events = ", ".join(f"{k} {v}" for k, v in sorted(facts["events"].items())) or "none"
    items = [
        ("run", facts["run_id"]),
        ("ranks", f"{facts['ranks']} (world size {facts['world_size']})"),
        ("device", facts["device"]),
        ("steps", facts["steps"]),
        ("wall time (steps)", fmt_s(facts["wall_s"])),
        ("agent overhead", "-" if overhead is None else f"{overhead * 100:.2f}% of step time"),
        ("dropped / hook errors", f"{facts['dropped']} / {facts['hook_errors']}"),
        ("events", events),
    ]
    dl = "".join(f"<div><dt>{_esc(k)}</dt><dd>{_esc(v)}</dd></div>" for k, v in items)
    return f"<header><h1>hooktrace report</h1><dl>{dl}</dl></header>"


def _straggler(run: RunData) -> str:
    straggler = run.summary.get("straggler")
    if len(run.ranks) < 2:
        return "<p class='muted'>One rank: no straggler to name.</p>"
    if not run.summary:
        return "<p class='muted'>No rank*.summary.json: the straggler is not known.</p>"
    if not straggler:
        return "<p>No straggler: no rank is 10% slower than the median rank.</p>"
    rows = [[m["phase"], m["module"], fmt_s(m["extra_s_per_step"])] for m in straggler.get("modules", [])]
    return (
        f"<p><b>Straggler: rank {_esc(straggler['rank'])}</b>, busy {straggler['ratio']:.2f}x the median rank. "
        "Where it loses time (per step, against the other ranks' median):</p>"
        + (_table(["phase", "module", "extra per step"], rows) if rows else "")
    )


def _modules_lists(run: RunData) -> str:
    never = run.summary.get("never_called", [])
    skipped = run.summary.get("backward_skipped", [])
    parts = []
    if not run.summary:
        parts.append("<p class='muted'>No rank*.summary.json: never-called and skipped modules are not known.</p>")
    parts.append(
        f"<p><b>Never called</b> ({len(never)}): {_esc(', '.join(never[:200])) or 'none'}"
        + (" ..." if len(never) > 200 else "")
        + "</p>"
    )
    if skipped:
        parts.append("<p><b>Skipped by <code>--backward full</code></b> (timed with tensor hooks instead):</p>")
        parts.append(_table(["module", "reason"], [[s["module"], s["reason"]] for s in skipped[:500]]))
    else:
        parts.append("<p><b>Skipped by <code>--backward full</code></b>: none</p>")
    return "".join(parts)


def _memory(run: RunData) -> str:
    """Where memory goes (``--memory on``): per rank, and the modules that save the most for backward."""
    from hooktrace.summary import fmt_bytes

    ranks = [r for r in run.summary.get("ranks", []) if "parameters" in (r.get("memory") or {})]
    rows = sorted(
        (m for m in run.modules if m.get("phase") in ("forward", "recompute") and m.get("activation_bytes")),
        key=lambda m: -m["activation_bytes"],
    )[:20]
    if not ranks and not rows:
        return "<p class='muted'>Memory was not measured (--memory off, or no rank*.summary.json).</p>"
    totals = [
        [r["rank"], *(fmt_bytes(r["memory"].get(k)) for k in ("parameters", "gradients", "optimizer_state")),
         fmt_bytes(r["memory"].get("activations")), fmt_bytes(r["memory"].get("activations_max"))]
        for r in ranks
    ]  # fmt: skip
    largest = [
        [f"{m['phase']} {m['module']}", fmt_bytes(m["activation_bytes"]), fmt_bytes(m.get("self_activation_bytes")),
         m.get("module_type", ""), m.get("rank", "")]
        for m in rows
    ]  # fmt: skip
    head = ["rank", "parameters", "gradients", "optimizer state", "activations", "activations (largest)"]
    return (
        _table(head, totals) + "<p>Largest activations: bytes saved for backward per measured step, children included "
        "(self: saved by the module's own operations).</p>"
        + _table(["module", "saved", "self", "type", "rank"], largest)
    )


def build_html(run: RunData) -> str:
    """The whole page as one string."""
    figs: dict[str, Any] = {}
    sections: list[str] = []

    def chart(fig_id: str, fig: dict[str, Any] | None) -> str:
        if fig is None:
            return ""
        figs[fig_id] = fig
        return f"<div id='{fig_id}' class='chart'></div>"

    if run.missing:
        items = "".join(f"<li>{_esc(m)}</li>" for m in run.missing)
        sections.append(f"<section class='note'><h2>What this directory lacks</h2><ul>{items}</ul></section>")
    ranks = figures.shown_ranks(run)
    step_charts = "".join(chart(f"steps-rank{r}", figures.step_figure(run, r)) for r in ranks if run.steps.get(r))
    if len(ranks) < len(run.ranks):
        step_charts += (
            f"<p class='muted'>{len(ranks)} of {len(run.ranks)} ranks drawn: the lowest and the straggler.</p>"
        )
    sections.append(f"<section><h2>Step time</h2>{step_charts or '<p>No steps recorded.</p>'}</section>")
    bars = chart("modules-forward", figures.module_bars(run, "forward")) + chart(
        "modules-backward", figures.module_bars(run, "backward")
    )
    sections.append(f"<section><h2>Slowest modules</h2><div class='two'>{bars}</div>")
    sections.append(chart("module-tree", figures.icicle_figure(run)) + "</section>")
    sections.append(f"<section><h2>Memory</h2>{_memory(run)}</section>")
    health = chart("grad-norm", grad_figures.grad_norm_figure(run)) + chart(
        "grad-heatmap", grad_figures.heatmap_figure(run)
    )
    flow = grad_figures.flow_figure(run)
    health += chart("grad-flow", flow) if flow else "<p class='muted'>No gradient-flow step (--flow-every).</p>"
    sections.append(f"<section><h2>Gradient health</h2>{health}</section>")
    sections.append(f"<section><h2>Ranks</h2>{chart('ranks', figures.ranks_figure(run))}{_straggler(run)}</section>")
    sections.append(f"<section><h2>Modules not timed</h2>{_modules_lists(run)}</section>")
    notes = run.summary.get("notes", [])
    if notes:
        sections.append(
            "<section><h2>Notes</h2><ul>" + "".join(f"<li>{_esc(n)}</li>" for n in notes) + "</ul></section>"
        )
    data = json.dumps(figs, separators=(",", ":"), allow_nan=False).replace("</", "<\\/")
    made = time.strftime("%Y-%m-%d %H:%M:%S")
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<meta name='viewport' content='width=device-width, initial-scale=1'><title>hooktrace {_esc(run.run_id)}"
        f"</title><style>{_STYLE}</style><script>{_CATCH}</script><script>{plotly_js()}</script></head><body>{_header(run)}<main>"
        + "".join(sections)
        + f"<p class='muted'>Made by hooktrace report from {_esc(os.path.abspath(run.run_dir))} at {made}; "
        "charts by plotly.js (inlined: the page works offline).</p></main>"
        f"<script type='application/json' id='hooktrace-figures'>{data}</script><script>{_BOOT}</script>"
        "</body></html>"
    )


def write_html(run: RunData, path: str | None = None) -> str:
    """Write the report to ``path`` (default ``<run_dir>/report.html``) atomically; its path."""
    target = path or os.path.join(run.run_dir, "report.html")
    page = build_html(run)
    os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
    tmp = f"{target}.tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(page)
    os.replace(tmp, target)
    return target
