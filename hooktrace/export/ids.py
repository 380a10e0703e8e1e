"""The trace id of a step, the same on every rank without communication (DESIGN §5)."""

from __future__ import annotations

import hashlib


def step_trace_id(run_id: str, restart_count: int, step: int) -> str:
    """32 hex digits: hash(run id, restart count, step). ``Agent.trace_id`` gives the same."""
    return hashlib.sha256(f"{run_id}/{restart_count}/{step}".encode()).hexdigest()[:32]
