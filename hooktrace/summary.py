"""The run summary: ``summary.json`` and what ``hooktrace run`` prints at the end.

One rank builds its own summary; :func:`merge_summaries` joins the ranks of a node (or job)
and names the straggler: the rank whose median step time is furthest above the median of ranks.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

from hooktrace._aggregate.module_stats import row_order

STRAGGLER_RATIO = 1.1
"""A rank is called a straggler when its median step time exceeds the ranks' median by this."""


@dataclass(slots=True)
class RunSummary:
    """What a run did, per DESIGN §7. ``as_dict`` is ``summary.json``."""

    run_id: str
    world_size: int
    steps: int
    ranks: list[dict[str, Any]]
    modules: list[dict[str, Any]]
    events: list[dict[str, Any]]
    overhead_ratio: float
    straggler: dict[str, Any] | None = None
    never_called: list[str] = field(default_factory=list)
    backward_skipped: list[dict[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    grad_consistency: dict[str, Any] | None = None
    out_dir: str | None = None
    device: str = "cpu"
    step_source: str | None = None
    """``optimizer`` (torch.optim step hooks) or ``backward`` (no optimizer: a backward followed
    by a gradient reset is a step); None before any step."""
    model: list[dict[str, Any]] = field(default_factory=list)
    """The model's structure at attach, one entry per module in ``named_modules()`` order (see
    :func:`hooktrace.summary_builder.model_structure`): what ``hooktrace report --tree`` prints."""
    config: dict[str, Any] = field(default_factory=dict)
    """The settings the run used that a report needs (sampling, explode factor, backward mode)."""

    def as_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "world_size": self.world_size,
            "steps": self.steps,
            "step_source": self.step_source,
            "device": self.device,
            "ranks": self.ranks,
            "straggler": self.straggler,
            "modules": self.modules,
            "events": self.events,
            "overhead_ratio": self.overhead_ratio,
            "never_called": self.never_called,
            "backward_skipped": self.backward_skipped,
            "notes": self.notes,
            "grad_consistency": self.grad_consistency,
            "out_dir": self.out_dir,
            "config": self.config,
            "model": self.model,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunSummary:
        return cls(
            run_id=data["run_id"],
            world_size=data.get("world_size", 1),
            steps=data.get("steps", 0),
            ranks=data.get("ranks", []),
            modules=data.get("modules", []),
            events=data.get("events", []),
            overhead_ratio=data.get("overhead_ratio", 0.0),
            straggler=data.get("straggler"),
            never_called=data.get("never_called", []),
            backward_skipped=data.get("backward_skipped", []),
            notes=data.get("notes", []),
            grad_consistency=data.get("grad_consistency"),
            out_dir=data.get("out_dir"),
            device=data.get("device", "cpu"),
            step_source=data.get("step_source"),
            model=data.get("model", []),
            config=data.get("config", {}),
        )

    def render(self, top: int = 10) -> str:
        """The terminal summary."""
        return render_summary(self, top)


def busy_time(rank: dict[str, Any]) -> Any:
    """A rank's busy time (step time minus exposed all-reduce wait), its step time if unknown."""
    return rank.get("busy_time_s") or rank.get("step_time_s")


def find_straggler(ranks: list[dict[str, Any]], modules: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The slowest rank when it is clearly slower than the median rank, with where it loses time.

    Ranks are compared by busy time (step time minus exposed all-reduce wait): in synchronous
    data parallelism all step times are equal, the fast ranks wait for the slow one."""
    times = [(r["rank"], busy_time(r)) for r in ranks if r.get("step_time_s")]
    if len(times) < 2:
        return None
    median = statistics.median(t for _, t in times)
    rank, slowest = max(times, key=lambda item: item[1])
    ratio = slowest / median if median > 0 else 0.0
    if ratio < STRAGGLER_RATIO:
        return None
    # Where it loses time: per (module, phase), its per-step time minus the other ranks' median.
    others: dict[tuple[str, str], list[float]] = {}
    mine: dict[tuple[str, str], float] = {}
    for row in modules:
        key, value = (row["module"], row["phase"]), row.get("self_s")
        if value is None:
            continue  # no steady-state step: nothing to compare
        if row["rank"] == rank:
            mine[key] = value
        else:
            others.setdefault(key, []).append(value)
    losses = sorted(
        ((value - statistics.median(others[key]), key) for key, value in mine.items() if key in others),
        reverse=True,
    )
    return {
        "rank": rank,
        "ratio": round(ratio, 3),
        "busy_time_s": slowest,
        "median_busy_time_s": median,
        "modules": [
            {"module": module, "phase": phase, "extra_s_per_step": round(loss, 6)}
            for loss, (module, phase) in losses[:5]
            if loss > 0
        ],
    }


def merge_summaries(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Join per-rank summaries of one run into one (ranks, modules and events of all)."""
    parts = sorted(parts, key=lambda p: p["ranks"][0]["rank"] if p.get("ranks") else 0)
    first = parts[0]
    ranks = [r for p in parts for r in p.get("ranks", [])]
    modules = sorted((m for p in parts for m in p.get("modules", [])), key=row_order)
    events = sorted((e for p in parts for e in p.get("events", [])), key=lambda e: (e.get("step", 0), e.get("rank", 0)))
    overheads = [r.get("overhead_ratio", 0.0) for r in ranks]
    merged = dict(first)
    merged.update(
        {
            "world_size": max(p.get("world_size", 1) for p in parts),
            "steps": max(p.get("steps", 0) for p in parts),
            "ranks": ranks,
            "modules": modules,
            "events": events,
            "overhead_ratio": max(overheads) if overheads else 0.0,
            "straggler": find_straggler(ranks, modules),
            "notes": sorted({n for p in parts for n in p.get("notes", [])}),
            "never_called": sorted(set.intersection(*(set(p.get("never_called", [])) for p in parts))),
        }
    )
    return merged


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.0f} us"


def _aligned(rows: list[tuple[str, ...]], left: set[int]) -> list[str]:
    """Rows of cells as aligned columns: the columns in ``left`` flush left, the others right."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = (c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
        lines.append(("  " + "  ".join(cells)).rstrip())
    return lines


def module_lines(modules: list[dict[str, Any]], top: int = 10) -> list[str]:
    """The slowest-modules table: steady-state medians, with step 1 and compile steps beside them.

    Without a steady-state sampled step (a run shorter than ``--sample-every``), the step-1 figures
    are shown alone and the title says so: they are never passed off as medians."""
    timed = [m for m in modules if m["phase"] in ("forward", "backward")]
    steady = sorted((m for m in timed if m.get("total_s") is not None), key=row_order)[:top]
    if steady:
        cells: list[tuple[str, ...]] = [
            ("module", "median", "p90", "self", "calls", "steps", "step 1", "compile steps", "type", "rank")
        ]
        for m in steady:
            compiling = m.get("compile_steps") or 0
            cells.append((
                f"{m['phase']} {m['module']}", _ms(m["total_s"]), _ms(m.get("total_p90_s")), _ms(m.get("self_s")),
                f"x{m.get('calls_per_step') or 0:g}", str(m.get("steps", 0)), _ms(m.get("warmup_total_s")),
                f"{_ms(m.get('compile_total_s'))} in {compiling}" if compiling else "-",
                str(m.get("module_type", "")), str(m["rank"]),
            ))  # fmt: skip
        title = (
            f"Slowest modules (top {len(steady)}; median per steady-state sampled step, children included; "
            "step 1 and compile steps apart):"
        )
        return [title, *_aligned(cells, {0, 8})]
    first = sorted((m for m in timed if m.get("warmup_total_s") is not None), key=lambda m: -m["warmup_total_s"])
    if not first:
        return []
    cells = [("module", "step 1", "self", "calls", "type", "rank")]
    for m in first[:top]:
        cells.append((
            f"{m['phase']} {m['module']}", _ms(m["warmup_total_s"]), _ms(m.get("warmup_self_s")),
            f"x{m.get('calls', 0):g}", str(m.get("module_type", "")), str(m["rank"]),
        ))  # fmt: skip
    title = (
        f"Slowest modules (top {len(cells) - 1}; step 1 alone, a warm-up step: no steady-state sampled step "
        "followed it, so no medians; a lower --sample-every samples more):"
    )
    return [title, *_aligned(cells, {0, 4})]


def fmt_bytes(n: float | None) -> str:
    """``1.2 MiB``: bytes for people (binary units); ``-`` for None."""
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def memory_lines(summary: RunSummary, top: int = 5) -> list[str]:
    """Where memory goes (``--memory on``): parameters, gradients, optimizer state, activations per
    rank, the CUDA allocator's peaks, and the modules that save the most for backward."""
    lines = []
    for r in summary.ranks[:4]:
        m = r.get("memory") or {}
        if "parameters" not in m:
            continue
        line = (
            f"Memory (rank {r['rank']}): parameters {fmt_bytes(m['parameters'])}, "
            f"gradients {fmt_bytes(m['gradients'])}, "
            f"optimizer state {fmt_bytes(m['optimizer_state'])}, activations {fmt_bytes(m.get('activations'))} "
            f"per measured step (largest {fmt_bytes(m.get('activations_max'))})"
        )
        cuda = m.get("cuda")
        if cuda:
            phases = cuda.get("phases", {})
            peaks = ", ".join(f"{phase} {fmt_bytes(v['allocated_peak'])}" for phase, v in phases.items())
            reserved = max((v["reserved_peak"] for v in phases.values()), default=None)
            total = fmt_bytes(cuda.get("device_total"))
            line += f"; CUDA peak allocated: {peaks}; reserved {fmt_bytes(reserved)} of {total}"
        elif r.get("device", summary.device) == "cpu":
            line += "; on CPU only activation bytes are measured (no allocator counters)"
        lines.append(line)
    rows = [m for m in summary.modules if m["phase"] in ("forward", "recompute") and m.get("activation_bytes")]
    rows.sort(key=lambda m: -m["activation_bytes"])
    if rows:
        cells: list[tuple[str, ...]] = [("module", "saved", "self", "max", "type", "rank")]
        for m in rows[:top]:
            cells.append((
                f"{m['phase']} {m['module']}", fmt_bytes(m["activation_bytes"]),
                fmt_bytes(m.get("self_activation_bytes")), fmt_bytes(m.get("activation_bytes_max")),
                str(m.get("module_type", "")), str(m["rank"]),
            ))  # fmt: skip
        lines.append(
            f"Largest activations (top {len(cells) - 1}; bytes saved for backward per measured step, children "
            "included; self: saved by the module's own operations):"
        )
        lines += _aligned(cells, {0, 4})
    return lines


def step_source_lines(summary: RunSummary) -> list[str]:
    """Where steps and gradient norms came from: which optimizers, or backward alone; clipping."""
    rank = summary.ranks[0] if summary.ranks else {}
    lines = []
    optimizers = rank.get("optimizers") or {}
    if summary.step_source == "backward":
        lines.append(
            "Steps: one per backward followed by a gradient reset (no torch.optim optimizer stepped); "
            "norms from the end of each backward"
        )
    elif len(optimizers) > 1:
        lines.append(
            "Steps: optimizer steps of "
            + ", ".join(f"{name} ({n})" for name, n in sorted(optimizers.items()))
            + "; each step's norms cover the parameters its optimizer updates"
        )
    clipped = rank.get("clipped_steps", 0)
    if clipped:
        lines.append(
            f"The script clipped (changed) gradients after backward on {clipped} steps; "
            "gradient norms are from before its clipping"
        )
    return lines


def render_summary(summary: RunSummary, top: int = 10) -> str:
    lines = [
        f"hooktrace: run {summary.run_id}: {summary.steps} steps on {summary.world_size} "
        f"rank{'s' if summary.world_size != 1 else ''} ({summary.device})"
    ]
    lines += step_source_lines(summary)
    lines.append("Step breakdown (median per step):")
    for r in summary.ranks:
        phases = "  ".join(
            f"{phase} {_ms(r['phases'].get(phase))}"
            for phase in ("data", "forward", "backward", "optimizer", "allreduce", "eval")
            if phase in r.get("phases", {})
        )
        lines.append(f"  rank {r['rank']}: step {_ms(r.get('step_time_s'))}  {phases}")
    lines += module_lines(summary.modules, top)
    lines += memory_lines(summary)
    counts: dict[str, int] = {}
    for r in summary.ranks:
        for kind, n in r.get("event_counts", {}).items():
            counts[kind] = counts.get(kind, 0) + n
    norms = [r.get("grad_norm") for r in summary.ranks if r.get("grad_norm") is not None]
    lines.append(
        "Gradient health: "
        + (f"last total norm {norms[0]:.4g}; " if norms else "no gradient norm; ")
        + f"spikes {counts.get('grad_spike', 0)}, non-finite {counts.get('nonfinite', 0)}, "
        f"clipped {counts.get('grad_clip', 0)}, AMP-skipped steps {counts.get('amp_skip', 0)}"
    )
    shown = [e for e in summary.events if e["kind"] != "grad_clip"][:5]
    if shown:
        lines.append("Events (first few):")
        for e in shown:
            value = f" {e['value']:.4g}" if isinstance(e.get("value"), float) else ""
            extra = f" ratio {e['ratio']}" if "ratio" in e else ""
            where = e.get("first_module", e["module"])
            lines.append(f"  step {e['step']} rank {e['rank']}: {e['kind']} {where} ({e['phase']}){value}{extra}")
    if summary.world_size > 1 or len(summary.ranks) > 1:
        s = summary.straggler
        if s:
            where = ", ".join(f"{m['phase']} {m['module']} +{_ms(m['extra_s_per_step'])}" for m in s["modules"][:3])
            lines.append(
                f"Straggler: rank {s['rank']}, busy {s['ratio']:.2f}x the median rank"
                + (f" ({where})" if where else "")
            )
        else:
            lines.append("Stragglers: none")
        consistency = summary.grad_consistency
        if consistency:
            lines.append(
                f"Gradient consistency across ranks: {consistency['checked_steps']} steps checked, "
                f"{consistency['mismatched_steps']} mismatched"
            )
    if summary.never_called:
        names = ", ".join(summary.never_called[:8]) + (" ..." if len(summary.never_called) > 8 else "")
        lines.append(f"Never called: {names}")
    for item in summary.backward_skipped[:8]:
        lines.append(f"Full backward hooks skipped: {item['module']} ({item['reason']}); timed with tensor hooks")
    errors = sum(r.get("hook_errors", 0) for r in summary.ranks)
    dropped = sum(sum(r.get("dropped", {}).values()) for r in summary.ranks)
    lines.append(f"Overhead: {summary.overhead_ratio * 100:.2f}% of step time; hook errors {errors}; dropped {dropped}")
    for note in summary.notes:
        lines.append(f"Note: {note}")
    if summary.out_dir:
        lines.append(f"Files: {summary.out_dir}/ (summary.json, rank*.steps.jsonl, rank*.trace.json)")
    return "\n".join(lines)
