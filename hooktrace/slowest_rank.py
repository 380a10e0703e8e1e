"""The job's slowest rank, for ``--trace-ranks auto`` and ``--module-metrics-ranks auto`` beyond 8 ranks.

Ranks learn it on the worker thread, at each checkpoint (every 10 s), through the key-value store of
the process group the job already has (the ``TCPStore`` that ``init_process_group`` rendezvoused
through, so it works across nodes without a shared filesystem):

- every rank adds the change of its busy time (integer microseconds) to its own key;
- rank 0 reads every rank's key with one ``multi_get`` and, once every rank has reported, writes
  the slowest rank to one key;
- every rank reads that key.

No collective is issued (collectives from a second thread would interleave with training's) and the
store is used through a private clone with a 5 s timeout, so the training thread's own store calls
never wait behind ours. That is three small requests per rank every 10 s, and one read of all ranks'
keys on rank 0. Without an initialised process group, or if the store fails, the ranks that share
the output directory learn it from each other's ``rank<r>.summary.json`` instead (a node, or the
whole job on a shared filesystem).
"""

from __future__ import annotations

import datetime
from typing import Any

from hooktrace.summary import busy_time
from hooktrace.summary_builder import slowest_rank

__all__ = ["SlowestRank"]

STORE_TIMEOUT = datetime.timedelta(seconds=5)


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

    def learn(self, rank_row: dict[str, Any] | None, out_dir: str) -> int | None:
        """The slowest rank, through the store when there is one, else from ``out_dir``'s summaries."""
        if not self._broken:
            if self._store is None:
                self._store = default_store()
            if self._store is not None:
                try:
                    return self._exchange(rank_row)
                except Exception:
                    self._broken = True  # e.g. rank 0's store went away at the end of the job
        return slowest_rank(out_dir)

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
                store.set(slowest_key, str(max(range(len(values)), key=values.__getitem__)))
        if store.check([slowest_key]):
            return int(store.get(slowest_key))
        return None
