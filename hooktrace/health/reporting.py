"""The gradient warnings a run prints on stderr, and their lines in the run summary.

Every event stays in ``steps.jsonl``, the counters and the traces; this only decides what a
person reads while training runs, so that a noisy module cannot bury the one line that matters:

- a spike of the total norm gets a line at every step it happens;
- a module's spike is named at most once per ``module_every`` steps per module; the other
  modules that spiked on the same step are summed up as ``and K more modules``;
- a non-finite gradient gets a line at every step (where it went non-finite first);
- after ``max_lines`` lines in all, one line says the rest is counted, not printed.

``summary_lines()`` then gives the counts per module for the run summary.
"""

from __future__ import annotations

from dataclasses import dataclass

from hooktrace._aggregate.snapshot import TOTAL
from hooktrace._aggregate.step_record import StepEvent, StepRecord

MAX_LINES = 20
"""Warning lines per run (spikes and non-finite gradients together), as the agent had."""
MODULE_EVERY = 100
"""Steps between two lines that name the same module's spike."""
PER_LINE = 3
"""Modules named on one spike line; the rest are counted."""
MAX_TRACKED = 1024
"""Modules counted one by one for the summary; beyond, together (labels are capped anyway)."""
SUMMARY_MODULES = 5
"""Modules named in the summary line, most spikes first."""
CAPPED = "further gradient warnings are counted (steps.jsonl, metrics), not printed"


@dataclass(slots=True)
class _Tally:
    spikes: int = 0
    max_ratio: float = 0.0
    printed_at: int | None = None
    """Step of the last line that named this module."""


class SpikeReporter:
    """Chooses the warning lines of each step record. Worker thread only: the agent's
    ``on_record`` and the summary (built on the worker) call it; it never blocks or raises.

    Memory: one small tally per module label, at most ``max_tracked``.
    """

    def __init__(
        self,
        *,
        warn_spikes: bool = True,
        module_every: int = MODULE_EVERY,
        max_lines: int = MAX_LINES,
        per_line: int = PER_LINE,
        max_tracked: int = MAX_TRACKED,
    ) -> None:
        self.warn_spikes = warn_spikes
        """False under ``--on-explosion clip|raise``: spikes are acted on (events, an error), not printed."""
        self.module_every = module_every
        self.max_lines = max_lines
        self.per_line = per_line
        self.max_tracked = max_tracked
        self.printed = 0
        self.held_back = 0
        """Module spikes that were not named on a line (rate limit, per-line limit or cap)."""
        self.spike_steps = 0
        self.first_spike: int | None = None
        self.last_spike: int | None = None
        self.nonfinite_steps = 0
        self.first_nonfinite: str | None = None
        self._modules: dict[str, _Tally] = {}
        self._untracked = 0
        self._rank = 0

    def lines(self, record: StepRecord) -> list[str]:
        """The lines to print for ``record``, without the ``hooktrace: `` prefix; often none."""
        self._rank = record.rank
        out: list[str] = []
        spikes = [e for e in record.events if e.kind == "grad_spike"]
        if spikes:
            shown = self._count_spikes(record.step, spikes)
            if self.warn_spikes:
                printing = bool(shown) and self.printed < self.max_lines
                if printing:
                    for event in shown:
                        tally = self._modules.get(event.module)
                        if tally is not None:
                            tally.printed_at = record.step
                    out.append(_spike_line(record, shown, len(spikes) - len(shown)))
                modules = sum(1 for e in spikes if e.module != TOTAL)
                self.held_back += modules - (sum(1 for e in shown if e.module != TOTAL) if printing else 0)
        nonfinite = [e for e in record.events if e.kind == "nonfinite"]
        if nonfinite:
            self.nonfinite_steps += 1
            if self.first_nonfinite is None:
                self.first_nonfinite = f"step {record.step}: {_nonfinite_where(nonfinite[0])}"
            out += [
                f"non-finite gradient at step {record.step} (rank {record.rank}): {_nonfinite_where(e)}"
                for e in nonfinite
            ]
        return self._capped(out)

    def summary_lines(self) -> list[str]:
        """Lines for the run summary: spikes per module (the total first, then most spikes
        first), non-finite steps. Empty when the gradients stayed healthy."""
        out: list[str] = []
        rank = self._rank
        if self.spike_steps:
            ranked = sorted(self._modules.items(), key=lambda kv: (kv[0] != TOTAL, -kv[1].spikes, kv[0]))
            ranked = [(m, t) for m, t in ranked if t.spikes]
            named = [
                f"{m} {t.spikes} step{'s' if t.spikes != 1 else ''} (max {t.max_ratio:.3g}x median)"
                for m, t in ranked[:SUMMARY_MODULES]
            ]
            rest = len(ranked) - len(named)
            when = (
                f"at step {self.first_spike}"
                if self.spike_steps == 1
                else f"at {self.spike_steps} steps from {self.first_spike} to {self.last_spike}"
            )
            out.append(
                f"gradient spikes on rank {rank} {when}: "
                + ", ".join(named)
                + (f" and {rest} more module{'s' if rest != 1 else ''}" if rest else "")
                + (f" (and modules beyond the {self.max_tracked} counted one by one)" if self._untracked else "")
                + (f"; {self.held_back} module spikes were not printed" if self.held_back else "")
            )
        if self.nonfinite_steps:
            out.append(
                f"non-finite gradients on rank {rank} at {self.nonfinite_steps} "
                f"step{'s' if self.nonfinite_steps != 1 else ''}; first at {self.first_nonfinite}"
            )
        return out

    # -- internals ------------------------------------------------------------------------------------
    def _count_spikes(self, step: int, spikes: list[StepEvent]) -> list[StepEvent]:
        """Tally the step's spikes; return those a line would name: the total, then the modules
        not named for ``module_every`` steps, largest ratio first, ``per_line`` in all."""
        self.spike_steps += 1
        self.first_spike = step if self.first_spike is None else self.first_spike
        self.last_spike = step
        for event in spikes:
            tally = self._modules.get(event.module)
            if tally is None and len(self._modules) < self.max_tracked:
                tally = self._modules[event.module] = _Tally()
            if tally is None:
                self._untracked += 1
                continue
            tally.spikes += 1
            tally.max_ratio = max(tally.max_ratio, _ratio(event))
        shown = [e for e in spikes if e.module == TOTAL]
        for event in sorted((e for e in spikes if e.module != TOTAL), key=lambda e: -_ratio(e)):
            if len(shown) >= self.per_line:
                break
            tally = self._modules.get(event.module)
            if tally is not None and (tally.printed_at is None or step - tally.printed_at >= self.module_every):
                shown.append(event)
        return shown

    def _capped(self, lines: list[str]) -> list[str]:
        out: list[str] = []
        for line in lines:
            if self.printed < self.max_lines:
                out.append(line)
                self.printed += 1
                if self.printed == self.max_lines:
                    out.append(CAPPED)
        return out


def _spike_line(record: StepRecord, shown: list[StepEvent], more: int) -> str:
    return (
        f"gradient spike at step {record.step} (rank {record.rank}): "
        + ", ".join(f"{e.module} {e.value:.4g} ({e.detail.get('ratio')}x median)" for e in shown)
        + (f" and {more} more module{'s' if more != 1 else ''}" if more else "")
    )


def _nonfinite_where(event: StepEvent) -> str:
    where = event.detail.get("first_module", event.module)
    if event.phase == "input":
        return f"the input of {where} already held a NaN"
    return f"first in {event.phase} of {where}"


def _ratio(event: StepEvent) -> float:
    ratio = event.detail.get("ratio")
    return float(ratio) if isinstance(ratio, (int, float)) else 0.0
