"""The job's slowest rank, for ``--trace-ranks auto`` and ``--module-metrics-ranks auto`` beyond 8 ranks.

Ranks learn it on the worker thread, at each checkpoint (every 10 s), through the key-value store of
the process group the job already has (the ``TCPStore`` that ``init_process_group`` rendezvoused
through, so it works across nodes without a shared filesystem):

- every rank adds the change of its busy time (integer microseconds) to its own key;
- rank 0 reads every rank's key with one ``multi_get`` and, once every rank has reported, writes
  the slowest rank to one key;
- every rank reads that key.

A rank is named only when it stands out: its busy time is at least ``STRAGGLER_RATIO`` (1.1) times the
median rank's, as for the straggler of the summary. The named rank stays named until it falls below
that, or another rank is ``SWITCH_MARGIN`` busier than it. On a job of near-equal ranks, the busiest
rank changes from one exchange to the next; every change would start a few hundred per-module series on
another rank (``--module-metrics-ranks auto``) and leave the old ones stale in Prometheus.

No collective is issued (collectives from a second thread would interleave with training's) and the
store is used through a private clone with a 5 s timeout, so the training thread's own store calls
never wait behind ours. That is three small requests per rank every 10 s, and one read of all ranks'
keys on rank 0. Without an initialised process group, or if the store fails, the ranks that share
the output directory learn it from each other's ``rank<r>.summary.json`` instead (a node, or the
whole job on a shared filesystem).
"""

from __future__ import annotations

import datetime
import statistics
from collections.abc import Mapping
from typing import Any

from hooktrace.summary import STRAGGLER_RATIO, busy_time
from hooktrace.summary_builder import rank_summaries

__all__ = ["SWITCH_MARGIN", "SlowestRank", "choose_slowest"]

STORE_TIMEOUT = datetime.timedelta(seconds=5)

SWITCH_MARGIN = 1.05
"""Another rank replaces the named slowest rank only when its busy time is this many times the named one's."""

_NONE = "-1"
"""The store's slowest key when no rank stands out (any more)."""


def choose_slowest(busy: Mapping[int, float], named: int | None) -> int | None:
    """The rank to name slowest from each rank's busy time, given the rank named so far; ``None``
    when no rank stands out.

    A rank stands out when its busy time is at least ``STRAGGLER_RATIO`` times the median rank's. The
    named rank is kept while it stands out, unless another rank is ``SWITCH_MARGIN`` times busier.
    """
    times = {rank: value for rank, value in busy.items() if value and value > 0}
    if len(times) < 2:
        return None  # one rank is not slower than anyone
    threshold = STRAGGLER_RATIO * statistics.median(times.values())
    busiest = max(times, key=times.__getitem__)
    if named in times and times[named] >= threshold and times[busiest] < SWITCH_MARGIN * times[named]:
        return named
    return busiest if times[busiest] >= threshold else None


def default_store() -> Any | None:
    """A private clone of the default process group's store, or ``None`` without one."""
    try:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return None
        store = dist.distributed_c10d._get_default_store().clone()  # type: ignore[attr-defined]
        store.set_timeout(STORE_TIMEOUT)
        return store
    except Exception:
        return None


class SlowestRank:
    """Learns the slowest rank of the job; ``learn`` is called on the worker thread only."""

    def __init__(self, run_id: str, restart_count: int, rank: int, world_size: int, store: Any | None = None) -> None:
        self.rank = rank
        self.world_size = world_size
        self.prefix = f"hooktrace/{run_id}/{restart_count}/"
        self._store = store
        self._broken = False
        self._reported_us = 0
        self._keys_made = False
        self._written: str | None = None
        """Rank 0: what it last wrote to the slowest key (written again only when it changes)."""
        self.named: int | None = None
        """The last answer: rank 0's choice is made against it, and so is the one from the summaries."""

    def learn(self, rank_row: dict[str, Any] | None, out_dir: str | None) -> int | None:
        """The slowest rank, through the store when there is one, else from ``out_dir``'s summaries
        (``None``: the rank writes no files, so the directory may hold another run's; keep the last answer)."""
        if not self._broken:
            if self._store is None:
                self._store = default_store()
            if self._store is not None:
                try:
                    self.named = self._exchange(rank_row)
                    return self.named
                except Exception:
                    self._broken = True  # e.g. rank 0's store went away at the end of the job
        if out_dir is not None:
            busy = {row["rank"]: busy_time(row) for part in rank_summaries(out_dir) for row in part.get("ranks", [])}
            self.named = choose_slowest(busy, self.named)
        return self.named

    def _key(self, rank: int) -> str:
        return f"{self.prefix}busy_us/{rank}"

    def _exchange(self, rank_row: dict[str, Any] | None) -> int | None:
        store = self._store
        assert store is not None
        busy = busy_time(rank_row) if rank_row else None
        if busy:
            busy_us = int(busy * 1e6)
            store.add(self._key(self.rank), busy_us - self._reported_us)  # the key holds the latest busy time
            self._reported_us = busy_us
        slowest_key = self.prefix + "slowest"
        if self.rank == 0:
            keys = [self._key(rank) for rank in range(self.world_size)]
            if not self._keys_made:  # add(0) makes a missing key without touching a present one
                for key in keys:
                    store.add(key, 0)
                self._keys_made = True
            values = [int(value) for value in store.multi_get(keys)]
            if min(values) > 0:  # every rank has reported: an early rank alone is not the slowest
                choice = choose_slowest(dict(enumerate(values)), self.named)
                value = _NONE if choice is None else str(choice)
                if value != self._written:
                    store.set(slowest_key, value)
                    self._written = value
                return choice
        if store.check([slowest_key]):
            named = int(store.get(slowest_key))
            return named if named >= 0 else None
        return None
