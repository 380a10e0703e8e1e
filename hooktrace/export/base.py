"""The exporter interface: what the worker thread calls, and the threading contract.

All methods are called from the single worker thread (``start`` and ``close`` may also be called
from the thread that closes the agent, never concurrently with the others). They must not raise:
the worker catches, counts (``hooktrace_export_errors_total{exporter}``) and goes on, but an
exporter should handle its own I/O errors and count them as drops.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from hooktrace._aggregate.snapshot import MetricsSnapshot
    from hooktrace._aggregate.step_record import StepRecord


class Exporter(Protocol):
    """One destination of a rank's data (a file, an endpoint, a collector)."""

    name: str

    def start(self) -> None:
        """Open files or sockets. Raises ``HooktraceError`` with a fix-it message on setup errors."""

    def export_step(self, step: StepRecord) -> None:
        """Consume one aggregated optimizer step."""

    def refresh(self, snapshot: MetricsSnapshot) -> None:
        """A fresh snapshot was built (throttled, and at every flush and close)."""

    def flush(self) -> None:
        """Make everything received so far durable or sent (bounded time)."""

    def close(self) -> None:
        """Flush and release resources; idempotent."""
