"""``<out>/rank<r>.steps.jsonl``: one JSON object per optimizer step (DESIGN §7).

Each line is written whole and flushed every couple of seconds, so a killed run leaves every
line but possibly the last few steps; no line is ever half-written by a flush.
"""

from __future__ import annotations

import json
import math
import os
from typing import IO, Any

from hooktrace._aggregate.snapshot import MetricsSnapshot
from hooktrace._aggregate.step_record import StepRecord

_encode = json.JSONEncoder(allow_nan=False).encode
"""One strict encoder for every line (``json.dumps`` with an option builds one per call)."""


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


class StepsJsonlExporter:
    """Appends each step's record as a line of JSON."""

    name = "jsonl"

    def __init__(self, path: str) -> None:
        self.path = path
        self._file: IO[str] | None = None

    def start(self) -> None:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        self._file = open(self.path, "w", encoding="utf-8")  # noqa: SIM115 - lives as long as the run

    def export_step(self, step: StepRecord) -> None:
        if self._file is None:
            return
        record = step.as_json()
        try:
            line = _encode(record)
        except ValueError:  # a NaN/Inf somewhere: JSON has no such number, write null
            line = _encode(_finite(record))
        self._file.write(line + "\n")

    def refresh(self, snapshot: MetricsSnapshot) -> None:
        return None

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None
