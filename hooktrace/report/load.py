"""Read a run directory into plain data, tolerating what a killed run leaves behind.

A finished run has ``rank<r>.summary.json`` (each rank's part, merged here with
:func:`~hooktrace.summary_builder.merge_dir`; the run's own merged ``summary.json`` is not read),
``rank<r>.steps.jsonl`` and ``rank<r>.trace.json``. A run killed early may have no summary part at
all (ranks write theirs every 10 s and at exit), a last steps line cut short, and a trace file
without its closing ``]``. Then
the module times are rebuilt from the trace file's module slices (one event per line), and
:attr:`RunData.missing` says what could not be known, so every report can say it too.
"""

from __future__ import annotations

import json
import os
import re
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from hooktrace.errors import HooktraceError
from hooktrace.summary_builder import merge_dir

_RANK_FILE = re.compile(r"^rank(\d+)\.(steps\.jsonl|trace\.json)$")


class ReportError(HooktraceError):
    """The directory is not a run directory, or holds nothing a report can use."""


@dataclass(slots=True)
class RunData:
    """Everything a report reads from one run directory."""

    run_dir: str
    summary: dict[str, Any]
    """The ``rank<r>.summary.json`` parts merged; ``{}`` when no rank wrote one (killed before its first
    checkpoint)."""
    steps: dict[int, list[dict[str, Any]]]
    """Rank -> its steps.jsonl objects in file order."""
    modules: list[dict[str, Any]]
    """Module rows as in the summary's ``modules`` (or rebuilt from the trace files)."""
    missing: list[str] = field(default_factory=list)
    """Sentences naming what this directory lacks and what the reports do instead."""

    @property
    def run_id(self) -> str:
        if self.summary.get("run_id"):
            return str(self.summary["run_id"])
        return os.path.basename(os.path.normpath(self.run_dir))

    @property
    def ranks(self) -> list[int]:
        known = {r["rank"] for r in self.summary.get("ranks", [])}
        return sorted(known | set(self.steps))

    @property
    def model(self) -> list[dict[str, Any]]:
        return list(self.summary.get("model") or [])

    @property
    def config(self) -> dict[str, Any]:
        return dict(self.summary.get("config") or {})

    def step_count(self) -> int:
        counted = max((len(lines) for lines in self.steps.values()), default=0)
        return max(int(self.summary.get("steps", 0)), counted)


def read_jsonl(path: str) -> list[dict[str, Any]]:
    """Every whole JSON object of a JSON-lines file; a line cut short by a kill is skipped."""
    rows = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict):
                rows.append(row)
    return rows


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def modules_from_trace(path: str, rank: int) -> tuple[list[dict[str, Any]], bool]:
    """Module rows from one trace file's ``forward X`` / ``backward X`` slices, and whether the
    file was closed. Medians over sampled steps after the first (step 1 is warm-up, kept apart)."""
    per_step: dict[tuple[str, str], dict[int, list[float]]] = defaultdict(dict)
    types: dict[str, str] = {}
    step, closed = 0, False
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            text = line.strip().rstrip(",")
            if text == "]":
                closed = True
                continue
            if not text.startswith("{"):
                continue
            try:
                event = json.loads(text)
            except ValueError:
                continue
            args = event.get("args") or {}
            if event.get("cat") == "step":
                step = int(args.get("step", step))
            elif event.get("cat") in ("forward", "backward") and "module" in args and event.get("ph") == "X":
                key = (args["module"], event["cat"])
                types[args["module"]] = args.get("module_type", "")
                cell = per_step[key].setdefault(step, [0.0, 0.0, 0])
                cell[0] += float(event.get("dur", 0.0)) / 1e6
                cell[1] += float(args.get("self_us", 0.0)) / 1e6
                cell[2] += 1
    first = min((s for cells in per_step.values() for s in cells), default=0)
    rows: list[dict[str, Any]] = []
    for (module, phase), cells in per_step.items():
        steady = [cell for s, cell in cells.items() if s != first]
        warm = cells.get(first)
        rows.append(
            {
                "module": module,
                "module_type": types.get(module, ""),
                "phase": phase,
                "rank": rank,
                "total_s": _median([c[0] for c in steady]),
                "self_s": _median([c[1] for c in steady]),
                "calls_per_step": _median([float(c[2]) for c in steady]),
                "steps": len(steady),
                "calls": sum(int(c[2]) for c in cells.values()),
                "warmup_total_s": warm[0] if warm else None,
                "warmup_self_s": warm[1] if warm else None,
            }
        )
    rows.sort(key=lambda r: -(r["total_s"] or r["warmup_total_s"] or 0.0))
    return rows, closed


def load_run(run_dir: str) -> RunData:
    """Read ``run_dir``; raise :class:`ReportError` when it holds neither a summary nor steps."""
    if not os.path.isdir(run_dir):
        raise ReportError(f"{run_dir} is not a directory; pass a run directory (hooktrace-runs/<run_id>)")
    summary = merge_dir(run_dir, check_gradients=True)
    steps: dict[int, list[dict[str, Any]]] = {}
    traces: dict[int, str] = {}
    for name in sorted(os.listdir(run_dir)):
        match = _RANK_FILE.match(name)
        if not match:
            continue
        rank, path = int(match.group(1)), os.path.join(run_dir, name)
        if match.group(2) == "steps.jsonl":
            steps[rank] = read_jsonl(path)
        else:
            traces[rank] = path
    if not summary and not any(steps.values()):
        raise ReportError(
            f"no rank*.summary.json or rank*.steps.jsonl with a step in {run_dir}; is it a hooktrace run directory?"
        )
    missing: list[str] = []
    modules = list(summary.get("modules", []))
    if not summary:
        missing.append(
            "no rank*.summary.json (the run was killed before its first 10-second checkpoint): step data comes "
            "from steps.jsonl, module times from the trace files; no model structure, never-called list, "
            "straggler or agent overhead"
        )
        for rank, path in sorted(traces.items()):
            rows, _ = modules_from_trace(path, rank)
            modules.extend(rows)
    else:
        counted = max((len(v) for v in steps.values()), default=0)
        if counted > summary.get("steps", 0):
            missing.append(
                f"rank*.summary.json cover {summary.get('steps', 0)} steps, steps.jsonl {counted}: the run did not "
                "end cleanly; module medians are from its last checkpoint"
            )
        if not summary.get("model"):
            missing.append("no model structure in rank*.summary.json (a run from an older hooktrace)")
    unclosed = [r for r, path in sorted(traces.items()) if not _closed(path)]
    if unclosed:
        ranks = ", ".join(map(str, unclosed))
        missing.append(f"trace files of rank {ranks} not closed: the run was killed or is running")
    return RunData(run_dir=run_dir, summary=summary, steps=steps, modules=modules, missing=missing)


def _closed(path: str) -> bool:
    """Whether a trace file ends with its ``]`` (written at a clean exit)."""
    with open(path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        size = handle.tell()
        handle.seek(max(0, size - 16))
        return handle.read().rstrip().endswith(b"]")
