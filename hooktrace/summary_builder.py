"""Build a rank's :class:`RunSummary` from the agent's state, and write ``summary.json``."""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

from hooktrace._record.module_table import clean_name
from hooktrace.export.files import write_json_atomic
from hooktrace.summary import RunSummary, busy_time, merge_summaries

if TYPE_CHECKING:
    from collections.abc import Callable

    from torch import nn

    from hooktrace._record.module_table import ModuleTable
    from hooktrace.agent import Agent


_CONTAINERS = {"ModuleList", "ModuleDict", "ParameterList", "ParameterDict"}
"""Modules that hold others but are never called themselves."""

REPORT_CONFIG = ("sample_every", "flow_every", "depth", "max_modules", "backward", "explode_factor", "on_explosion")
"""Config fields written into the summary: a report made elsewhere needs them (spike threshold, sampling)."""

_EXTRA_REPR_CHARS = 200


def model_structure(
    table: ModuleTable, modules: list[nn.Module], root_label: Callable[[int], str]
) -> list[dict[str, Any]]:
    """What ``print(model)`` shows, per module, plus parameter counts and weight ties.

    Run at attach on the training thread (once per root, never in a hook), so that ``hooktrace
    report --tree`` can print the model from the run's files alone, on another machine. Own
    parameters only (``recurse=False``); a parameter shared with an earlier module is counted
    there and named here under ``tied``.
    """
    owner: dict[int, str] = {}
    for index in table.roots:
        label = root_label(index)
        for pname, param in modules[index].named_parameters(remove_duplicate=False):
            owner.setdefault(id(param), clean_name(".".join(p for p in (label, pname) if p)))
    entries: list[dict[str, Any]] = []
    for info in table.infos[: len(modules)]:
        module = modules[info.index]
        label = root_label(info.root)
        compiled = type(module).__name__ == "OptimizedModule"  # indexed alone: its parameters are all its own
        trainable = frozen = 0
        tied: dict[str, str] = {}
        for pname, param in module.named_parameters(recurse=compiled, remove_duplicate=False):
            full = clean_name(".".join(p for p in (label, info.name, pname) if p))
            first = owner.get(id(param), full)
            if first != full:
                tied[pname] = first
                continue
            if param.requires_grad:
                trainable += param.numel()
            else:
                frozen += param.numel()
        try:
            extra = module.extra_repr()
        except Exception:  # a user's extra_repr that fails must not fail the run
            extra = ""
        if len(extra) > _EXTRA_REPR_CHARS:
            extra = extra[: _EXTRA_REPR_CHARS - 3] + "..."
        entry: dict[str, Any] = {
            "module": info.display,
            "type": info.type_name,
            "parent": table.infos[info.parent].display if info.parent >= 0 else None,
            # a child whose name is all wrapper (DDP's inner model) is shown as print(ddp) shows it
            "key": info.name.rsplit(".", 1)[-1] if info.name else ("module" if info.parent >= 0 else ""),
            "extra_repr": extra,
            "trainable": trainable,
            "frozen": frozen,
        }
        if tied:
            entry["tied"] = tied
        entries.append(entry)
    return entries


def build_summary(agent: Agent) -> RunSummary:
    """This rank's summary so far. Reads the worker's aggregates (call after the worker drained)."""
    stats = agent.stats
    agent.worker.sync_drops()
    rank = stats.rank_summary()
    table = agent.recorder.table
    called = {row["module"] for row in stats.module_rows()}
    never = (
        [i.display for i in table.infos if i.display not in called and i.type_name not in _CONTAINERS]
        if stats.sampled_steps
        else []
    )
    skipped = [
        {"module": table.infos[i].display, "reason": reason}
        for i, reason in sorted(agent.recorder.full_skipped.items())
    ]
    notes = [*agent.notes, *agent.reporter.summary_lines()]
    if agent.recorder.first_error:
        notes.append(f"{agent.recorder.hook_errors} hook errors; first: {agent.recorder.first_error}")
    return RunSummary(
        run_id=agent.info.run_id,
        world_size=agent.info.world_size,
        steps=stats.steps,
        ranks=[rank],
        modules=stats.module_rows(),
        events=list(stats.events),
        overhead_ratio=rank["overhead_ratio"],
        never_called=never,
        backward_skipped=skipped,
        notes=notes,
        out_dir=agent.out_dir if agent.config.write_files else None,
        device=agent.info.device,
        step_source=rank["step_source"],
        model=agent.model_structure,
        config={name: getattr(agent.config, name) for name in REPORT_CONFIG},
    )


def slowest_rank(out_dir: str) -> int | None:
    """The rank with the largest busy time among the rank summaries in ``out_dir``.

    Ranks learn it without communicating: each rewrites ``rank<r>.summary.json`` every 10 s, and
    ranks that share an output directory (a node, or a shared filesystem) read each other's.
    """
    busiest: tuple[float, int] | None = None
    for part in rank_summaries(out_dir):
        for row in part.get("ranks", []):
            busy = busy_time(row)
            if busy is not None and (busiest is None or busy > busiest[0]):
                busiest = (busy, row["rank"])
    return busiest[1] if busiest else None


def rank_summaries(out_dir: str) -> list[dict[str, Any]]:
    """Every readable ``rank<r>.summary.json`` in ``out_dir`` (one being rewritten is skipped)."""
    parts = []
    for name in sorted(os.listdir(out_dir)) if os.path.isdir(out_dir) else []:
        if name.startswith("rank") and name.endswith(".summary.json"):
            try:
                with open(os.path.join(out_dir, name), encoding="utf-8") as handle:
                    parts.append(json.load(handle))
            except (OSError, ValueError):
                continue
    return parts


def rank_summary_path(out_dir: str, rank: int) -> str:
    return os.path.join(out_dir, f"rank{rank}.summary.json")


def write_summary(out_dir: str, summary: RunSummary, merge: bool = True) -> None:
    """Write this rank's part, then (``merge``) ``summary.json`` merged over every rank part."""
    rank = summary.ranks[0]["rank"] if summary.ranks else 0
    write_json_atomic(rank_summary_path(out_dir, rank), summary.as_dict())
    if merge:
        write_json_atomic(os.path.join(out_dir, "summary.json"), merge_dir(out_dir))


def gradient_consistency(out_dir: str, tolerance: float = 1e-5, keep: int = 20) -> dict[str, Any]:
    """After all-reduce every rank holds the same gradients, so per step the total norms agree.

    Reads every ``rank<r>.steps.jsonl`` and compares the ranks' ``grad_norm`` step by step.
    """
    norms: dict[int, dict[int, float | None]] = {}
    for name in sorted(os.listdir(out_dir)):
        if name.startswith("rank") and name.endswith(".steps.jsonl"):
            rank = int(name[4:].split(".")[0])
            with open(os.path.join(out_dir, name), encoding="utf-8") as handle:
                for line in handle:
                    try:
                        row = json.loads(line)
                    except ValueError:
                        continue  # a line cut short by a kill
                    norms.setdefault(row["step"], {})[rank] = row.get("grad_norm")
    checked, mismatches = 0, []
    for step in sorted(norms):
        values = norms[step]
        if len(values) < 2:
            continue
        checked += 1
        finite = [v for v in values.values() if v is not None]
        if len(finite) != len(values) and finite:
            bad = True
        elif finite:
            low, high = min(finite), max(finite)
            bad = high - low > tolerance * max(abs(high), 1e-12)
        else:
            bad = False
        if bad:
            mismatches.append({"step": step, "grad_norms": {str(r): v for r, v in sorted(values.items())}})
    return {"checked_steps": checked, "mismatched_steps": len(mismatches), "mismatches": mismatches[:keep]}


def merge_dir(out_dir: str, check_gradients: bool = False) -> dict[str, Any]:
    """Merge every ``rank<r>.summary.json`` in ``out_dir`` (and compare ranks' gradient norms)."""
    parts = rank_summaries(out_dir)
    if not parts:
        return {}
    merged = merge_summaries(parts)
    if check_gradients and merged.get("world_size", 1) > 1:
        consistency = gradient_consistency(out_dir)
        merged["grad_consistency"] = consistency
        for item in consistency["mismatches"]:
            merged["events"].append(
                {
                    "step": item["step"],
                    "rank": -1,
                    "kind": "grad_mismatch",
                    "module": "__total__",
                    "phase": "allreduce",
                    "value": None,
                    "grad_norms": item["grad_norms"],
                }
            )
    return merged
