"""``hooktrace top``: a live terminal view of a running job, read from its ranks' ``/metrics``.

Three steps with one job each, so tests can feed real expositions without a server: ``fetch``
(urllib, one thread per target, never raises: a rank that is down is a row), ``build_view``
(two scrapes of every target → rows; recent values are deltas between refreshes, like ``rate()``)
and ``render`` (rows → rich renderables). The command only loops over the three.
"""

from __future__ import annotations

import contextlib
import io
import json
import statistics
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import click
from click.core import ParameterSource
from prometheus_client.parser import text_string_to_metric_families
from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from hooktrace._aggregate.snapshot import PHASES, TOTAL
from hooktrace.cli.stack import NO_PROXY_OPENER

__all__ = ["Scrape", "Target", "View", "build_view", "fetch_all", "read_targets", "render", "top_command"]

DEFAULT_PORT = 9750  # DESIGN §3: default --metrics-port of a run
FETCH_TIMEOUT_S = 1.0

Series = dict[str, list[tuple[dict[str, str], float]]]
"""Sample name → [(labels, value), ...] of one exposition."""

STEP_SUM, STEP_COUNT = "hooktrace_step_duration_seconds_sum", "hooktrace_step_duration_seconds_count"
MODULE_SUM, MODULE_COUNT = "hooktrace_module_duration_seconds_sum", "hooktrace_module_duration_seconds_count"
EVENTS: tuple[tuple[str, str, str, str], ...] = (
    ("grad spikes", "hooktrace_grad_spike_steps_total", "", ""),
    ("non-finite steps", "hooktrace_nonfinite_grad_steps_total", "hooktrace_nonfinite_events_total", "module"),
    ("grad clips", "hooktrace_grad_clips_total", "hooktrace_grad_clips_total", "module"),
    ("AMP skipped steps", "hooktrace_amp_skipped_steps_total", "", ""),
    ("dropped", "hooktrace_dropped_total", "hooktrace_dropped_total", "what"),
    ("hook errors", "hooktrace_hook_errors_total", "", ""),
    ("export errors", "hooktrace_export_errors_total", "hooktrace_export_errors_total", "exporter"),
)
"""(row, counter, counter broken down in the detail column, by this label)."""


@dataclass(frozen=True, slots=True)
class Target:
    """One rank's ``host:port``, with the file_sd labels that name it while it is down."""

    address: str
    labels: Mapping[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        base = self.address if "://" in self.address else f"http://{self.address}"
        return base if base.rstrip("/").endswith("/metrics") else base.rstrip("/") + "/metrics"


@dataclass(frozen=True, slots=True)
class Scrape:
    """One fetch of one target: its samples, or ``series is None`` and why."""

    target: Target
    at: float
    """``time.monotonic()`` when the response arrived (deltas become rates)."""
    series: Series | None
    error: str = ""

    def values(self, name: str) -> list[tuple[dict[str, str], float]]:
        return self.series.get(name, []) if self.series is not None else []

    def total(self, name: str, **match: str) -> float | None:
        """Sum of the samples named ``name`` whose labels include ``match``; None when there are none."""
        found = [v for labels, v in self.values(name) if all(labels.get(k) == w for k, w in match.items())]
        return sum(found) if found else None

    @property
    def rank(self) -> str:
        for labels, _ in self.values("hooktrace_info"):
            return labels.get("rank", "?")
        return self.target.labels.get("rank", "?")


@dataclass(slots=True)
class RankRow:
    rank: str
    address: str
    error: str = ""
    steps: float | None = None
    step_mean_s: float | None = None
    step_recent_s: float | None = None
    steps_per_s: float | None = None
    vs_median: float | None = None
    grad_norm: float | None = None
    grad_ratio: float | None = None
    overhead_pct: float | None = None


@dataclass(slots=True)
class ModuleRow:
    phase: str
    module: str
    mean_s: float
    calls: float
    delta_s: float | None = None
    """Seconds spent since the previous refresh (all ranks); None on the first frame."""
    recent_mean_s: float | None = None


@dataclass(slots=True)
class View:
    ranks: list[RankRow]
    modules: list[ModuleRow]
    events: list[tuple[str, float, float | None, str]]
    """(name, total, delta since the previous refresh, detail)."""
    run_ids: list[str]


def parse_exposition(text: str) -> Series:
    """Sample name → labelled values; raises ``ValueError`` on a body that is not an exposition."""
    series: Series = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            series.setdefault(sample.name, []).append((dict(sample.labels), float(sample.value)))
    return series


def _reason(exc: BaseException) -> str:
    """A few words for the "down" line: the cause, not a traceback."""
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code}"
    reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    if isinstance(reason, TimeoutError):
        return "timed out"
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror.lower()
    if isinstance(reason, ValueError):
        return f"not a /metrics exposition ({str(reason)[:60]})"
    return f"{type(reason).__name__}: {reason}" if isinstance(reason, BaseException) else str(reason)


def fetch(target: Target, timeout: float = FETCH_TIMEOUT_S) -> Scrape:
    """Scrape one target; every failure becomes a down ``Scrape`` (the view must never crash)."""
    try:
        with NO_PROXY_OPENER.open(target.url, timeout=timeout) as response:
            text = response.read().decode("utf-8")
        return Scrape(target, time.monotonic(), parse_exposition(text))
    except Exception as exc:  # refused, timed out, HTTP error, not an exposition: all mean "down"
        return Scrape(target, time.monotonic(), None, _reason(exc))


def fetch_all(targets: Sequence[Target], timeout: float = FETCH_TIMEOUT_S) -> list[Scrape]:
    """Scrape every target at once, so N unreachable ranks cost one timeout, not N."""
    with ThreadPoolExecutor(max_workers=max(1, min(32, len(targets))), thread_name_prefix="hooktrace-top") as pool:
        return list(pool.map(lambda t: fetch(t, timeout), targets))


def read_targets(path: str) -> list[Target]:
    """Targets of a Prometheus file_sd JSON file, once per address; ``ValueError`` says what is wrong.

    A reused ``--out`` keeps entries of earlier runs (``hooktrace run`` only replaces its own), so the
    same address can appear under two run ids: it is scraped once, and the scrape names its rank.
    """
    try:
        with open(path, encoding="utf-8") as handle:
            groups = json.load(handle)
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}; `hooktrace run` writes <out>/targets.json") from exc
    except json.JSONDecodeError as exc:
        raise ValueError(f'{path} is not JSON ({exc}); expected [{{"targets": ["host:port"]}}]') from exc
    groups = groups if isinstance(groups, list) else [None]
    if not all(isinstance(g, dict) and isinstance(g.get("targets", []), list) for g in groups):
        raise ValueError(f'{path} is not a file_sd list: expected [{{"targets": ["host:port"], "labels": {{}}}}]')
    targets: dict[str, Target] = {}
    for group in groups:
        labels = group.get("labels") if isinstance(group.get("labels"), dict) else {}
        for address in group.get("targets", []):
            targets.setdefault(str(address), Target(str(address), {str(k): str(v) for k, v in labels.items()}))
    return list(targets.values())


def _delta(now: float | None, before: float | None) -> float | None:
    """Counter increase; a decrease means the rank restarted, so everything now is new."""
    if now is None or before is None:
        return None
    return now if now < before else now - before


def _ratio(num: float | None, den: float | None) -> float | None:
    return num / den if num is not None and den else None


def _rank_row(now: Scrape, before: Scrape | None) -> RankRow:
    row = RankRow(now.rank, now.target.address, now.error)
    if now.series is None:
        return row
    step_sum, step_count = now.total(STEP_SUM), now.total(STEP_COUNT)
    overhead = now.total("hooktrace_overhead_seconds_total")
    row.steps = now.total("hooktrace_steps_total")
    row.step_mean_s = _ratio(step_sum, step_count)
    row.grad_norm = now.total("hooktrace_grad_norm", module=TOTAL)
    row.grad_ratio = now.total("hooktrace_grad_norm_ratio")
    row.overhead_pct = _ratio(overhead, step_sum)
    if before is not None and before.series is not None:
        d_sum = _delta(step_sum, before.total(STEP_SUM))
        row.step_recent_s = _ratio(d_sum, _delta(step_count, before.total(STEP_COUNT)))
        d_steps = _delta(row.steps, before.total("hooktrace_steps_total"))
        row.steps_per_s = _ratio(d_steps, now.at - before.at) if d_steps is not None else None
        recent_overhead = _ratio(_delta(overhead, before.total("hooktrace_overhead_seconds_total")), d_sum)
        row.overhead_pct = recent_overhead if recent_overhead is not None else row.overhead_pct
    row.overhead_pct = row.overhead_pct * 100 if row.overhead_pct is not None else None
    return row


def _module_key(labels: Mapping[str, str]) -> tuple[str, str]:
    return labels.get("phase", ""), labels.get("module", "")


def _modules(pairs: list[tuple[Scrape, Scrape | None]], top: int) -> list[ModuleRow]:
    """Per (phase, module label), summed over ranks. A label cut to ``--depth`` is its covering
    module (the exporter never adds the descendants folded into it), so mean/call is that module's."""
    totals: dict[tuple[str, str], list[float]] = {}  # (phase, module) -> [sum, count, Δsum, Δcount]
    has_before = any(b is not None and b.series is not None for _, b in pairs)
    for now, before in pairs:
        for slot, name in enumerate((MODULE_SUM, MODULE_COUNT)):
            old = {_module_key(labels): v for labels, v in before.values(name)} if before is not None else {}
            for labels, value in now.values(name):
                key = _module_key(labels)
                acc = totals.setdefault(key, [0.0, 0.0, 0.0, 0.0])
                acc[slot] += value
                if before is not None:  # a rank seen for the first time has no "recent" part yet
                    acc[slot + 2] += _delta(value, old.get(key, 0.0)) or 0.0
    order = {phase: i for i, phase in enumerate(PHASES)}
    rows: list[ModuleRow] = []
    for phase in sorted({p for p, _ in totals}, key=lambda p: (order.get(p, len(order)), p)):
        keyed = [(m, acc) for (p, m), acc in totals.items() if p == phase]
        keyed.sort(key=lambda item: (item[1][2] if has_before else item[1][0], item[1][0]), reverse=True)
        for module, (total, calls, d_sum, d_calls) in keyed[:top]:
            row = ModuleRow(phase, module or "(root)", total / calls if calls else 0.0, calls)
            if has_before:
                row.delta_s, row.recent_mean_s = d_sum, _ratio(d_sum, d_calls)
            rows.append(row)
    return rows


def _events(pairs: list[tuple[Scrape, Scrape | None]]) -> list[tuple[str, float, float | None, str]]:
    rows: list[tuple[str, float, float | None, str]] = []
    for name, sample, detail_sample, label in EVENTS:
        total, delta, parts = 0.0, None, dict[str, float]()
        for now, before in pairs:
            value = now.total(sample) or 0.0
            total += value
            if before is not None and before.series is not None:
                delta = (delta or 0.0) + (_delta(value, before.total(sample) or 0.0) or 0.0)
            for labels, v in now.values(detail_sample):
                parts[labels.get(label, "")] = parts.get(labels.get(label, ""), 0.0) + v
        top = sorted(((v, k) for k, v in parts.items() if v), reverse=True)[:3]
        rows.append((name, total, delta, ", ".join(f"{k}: {v:g}" for v, k in top)))
    return rows


def build_view(scrapes: Iterable[Scrape], previous: Mapping[str, Scrape], top: int = 5) -> View:
    """The rows of one frame; ``previous`` (by address) holds each target's last good scrape."""
    scrapes = list(scrapes)
    ranks = [_rank_row(s, previous.get(s.target.address)) for s in scrapes]
    ranks.sort(key=lambda r: (int(r.rank) if r.rank.isdigit() else 1 << 30, r.address))
    recent = [r.step_recent_s for r in ranks if r.step_recent_s]
    if len(recent) > 1:
        median = statistics.median(recent)
        for row in ranks:
            row.vs_median = _ratio(row.step_recent_s, median)
    pairs = [(s, previous.get(s.target.address)) for s in scrapes if s.series is not None]
    run_ids = sorted({labels.get("run_id", "") for s, _ in pairs for labels, _ in s.values("hooktrace_info")})
    return View(ranks, _modules(pairs, top), _events(pairs), [r for r in run_ids if r])


def _s(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    return f"{seconds * 1e3:.2f} ms" if seconds >= 1e-3 else f"{seconds * 1e6:.0f} us"


def _n(value: float | None, fmt: str = ".4g", suffix: str = "") -> str:
    return "-" if value is None else f"{value:{fmt}}{suffix}"


def _table(title: str, left: str, right: str) -> Table:
    """A table whose ``|``-separated ``left`` columns are text and ``right`` columns are numbers."""
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD)
    for name in left.split("|"):
        table.add_column(name)
    for name in right.split("|"):
        table.add_column(name, justify="right")
    return table


def render(view: View, note: str = "") -> RenderableType:
    """One frame: header, ranks, slowest modules per phase, events. Deltas are since the last frame."""
    up = sum(1 for r in view.ranks if not r.error)
    header = Text(f"hooktrace top  run {', '.join(view.run_ids) or '?'}  {up}/{len(view.ranks)} ranks up", "bold")
    header.append(f"  {note}" if note else "", "dim")
    ranks = _table("Step time per rank", "rank|target|status",
                   "steps|mean step|recent step|steps/s|skew|grad norm|ratio|overhead")  # fmt: skip
    for r in view.ranks:
        ranks.add_row(
            r.rank, r.address, Text("down", "red") if r.error else Text("up", "green"),
            _n(r.steps, ".0f"), _s(r.step_mean_s), _s(r.step_recent_s), _n(r.steps_per_s, ".1f"),
            Text(_n(r.vs_median, ".2f", "x"), "yellow" if (r.vs_median or 0) > 1.2 else ""),
            _n(r.grad_norm), Text(_n(r.grad_ratio, ".3g"), "red" if (r.grad_ratio or 0) > 5 else ""),
            _n(r.overhead_pct, ".2f", "%"),
        )  # fmt: skip
    parts: list[RenderableType] = [header, ranks]
    parts += [Text(f"  rank {r.rank} {r.address} down: {r.error}", "red") for r in view.ranks if r.error]
    modules = _table(
        "Slowest modules (steady-state sampled steps, all ranks)", "phase|module", "mean/call|calls|Δ time|Δ mean/call"
    )
    for m in view.modules:
        modules.add_row(m.phase, m.module, _s(m.mean_s), f"{m.calls:.0f}", _s(m.delta_s), _s(m.recent_mean_s))
    events = _table("Events (all ranks)", "event", "total|Δ|detail")
    events.columns[-1].justify = "left"
    for name, total, delta, detail in view.events:
        style = "red" if total and name not in ("dropped", "grad clips") else ""
        events.add_row(Text(name, style), f"{total:g}", "-" if delta is None else f"+{delta:g}", detail)
    no_modules = Text("\nno module timings yet (they come with the sampled steps after step 1)\n", "dim")
    return Group(*parts, modules if view.modules else no_modules, events)


def render_text(view: View, note: str = "", width: int = 120) -> str:
    """A frame as plain text, for ``--once`` (scripts, tests, logs)."""
    out = io.StringIO()
    Console(file=out, width=width, color_system=None, force_terminal=False).print(render(view, note))
    return "".join(line.rstrip() + "\n" for line in out.getvalue().splitlines())


def _watch(targets: Callable[[], list[Target]], interval: float, top: int) -> None:
    """Refresh until Ctrl-C; ``targets`` is asked again each time (ranks join as they start serving)."""
    previous: dict[str, Scrape] = {}
    current = targets()
    with Live(auto_refresh=False, redirect_stdout=False, redirect_stderr=False) as live:
        while True:
            started = time.monotonic()
            scrapes = fetch_all(current)
            note = f"every {interval:g}s  {time.strftime('%H:%M:%S')}  Ctrl-C quits"
            live.update(render(build_view(scrapes, previous, top), note), refresh=True)
            previous.update({s.target.address: s for s in scrapes if s.series is not None})
            time.sleep(max(0.0, interval - (time.monotonic() - started)))
            with contextlib.suppress(click.BadParameter):  # keep the last good list while a file is replaced
                current = targets()


@click.command("top")
@click.option("--port", type=click.IntRange(1, 65535), help=f"Base /metrics port of the job [{DEFAULT_PORT}].")
@click.option("--ranks", type=click.IntRange(min=1), default=1, show_default=True, help="Watch ports PORT..PORT+N-1.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Host of --port.")
@click.option("--targets", "targets_file", type=click.Path(dir_okay=False),
              help="Prometheus file_sd JSON of host:port (hooktrace run writes <out>/targets.json).")  # fmt: skip
@click.option("--interval", type=click.FloatRange(min=0.1), default=2.0, show_default=True, help="Seconds per refresh.")
@click.option("--top", "top_n", type=click.IntRange(min=1), default=5, show_default=True, help="Modules per phase.")
@click.option("--once", is_flag=True, help="Print one frame as plain text and exit (1 if every target is down).")
@click.pass_context
def top_command(ctx: click.Context, port: int | None, ranks: int, host: str, targets_file: str | None,
                interval: float, top_n: int, once: bool) -> None:  # fmt: skip
    """Live view of a running job's /metrics: slow modules, step time per rank, gradient health."""
    given = [f"--{p}" for p in ("port", "ranks", "host") if ctx.get_parameter_source(p) is not ParameterSource.DEFAULT]
    if targets_file is not None and given:
        raise click.UsageError(f"--targets lists the hosts and ports itself; drop {', '.join(given)}")

    def targets() -> list[Target]:
        if targets_file is None:
            return [Target(f"{host}:{(port or DEFAULT_PORT) + i}", {"rank": str(i)}) for i in range(ranks)]
        try:
            return read_targets(targets_file)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--targets") from None

    if once:
        scrapes = fetch_all(targets())
        click.echo(render_text(build_view(scrapes, {}, top_n)), nl=False)
        ctx.exit(0 if not scrapes or any(s.series is not None for s in scrapes) else 1)
    with contextlib.suppress(KeyboardInterrupt):
        _watch(targets, interval, top_n)
