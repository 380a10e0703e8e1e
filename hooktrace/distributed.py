"""Where this process sits in a job: rank, local rank, world size, node, restart count.

Read from the variables torchrun sets, falling back to an initialised ``torch.distributed``
process group, else a single process.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass

from hooktrace.config import ALL_RANKS, rank_list


@dataclass(frozen=True, slots=True)
class Placement:
    rank: int
    local_rank: int
    world_size: int
    node: str
    restart_count: int


def _int(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name, "")
    try:
        return int(value)
    except ValueError:
        return None


def placement(environ: Mapping[str, str] | None = None) -> Placement:
    """This process's placement in the job."""
    env = os.environ if environ is None else environ
    rank = _int(env, "RANK")
    world = _int(env, "WORLD_SIZE")
    if rank is None or world is None:
        try:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                rank, world = dist.get_rank(), dist.get_world_size()
        except Exception:
            pass
    rank = rank if rank is not None else 0
    world = world if world is not None else 1
    local = _int(env, "LOCAL_RANK")
    return Placement(
        rank=rank,
        local_rank=local if local is not None else rank,
        world_size=world,
        node=socket.gethostname(),
        restart_count=_int(env, "TORCHELASTIC_RESTART_COUNT") or 0,
    )


AUTO_ALL_RANKS = 8
"""A rank choice of ``auto`` covers every rank up to this world size."""


@dataclass(slots=True)
class RankChoice:
    """Whether this rank is one of the ranks a ``--trace-ranks`` / ``--module-metrics-ranks`` value
    chooses: a list names them; ``all`` is every rank; ``auto`` is every rank up to 8 ranks, beyond
    that rank 0, one rank per node (its local rank 0) and the slowest rank when one stands out
    (``hooktrace.slowest_rank``: busy at least ``STRAGGLER_RATIO`` times the median rank, and kept
    while it stays so, so that per-module series do not move between near-equal ranks).

    ``slowest_rank`` is set by whoever learns it (the worker thread; ``None`` when no rank stands out);
    readers see the old or the new value, both valid answers, so no lock is taken.
    """

    value: str
    """A normalised choice (``config.normal_ranks``): ``auto``, ``all`` or ``0,3``."""
    rank: int
    local_rank: int
    world_size: int
    slowest_rank: int | None = None

    def includes_this_rank(self) -> bool:
        listed = rank_list(self.value)
        if listed is not None:
            return self.rank in listed
        if self.value == ALL_RANKS or self.world_size <= AUTO_ALL_RANKS:
            return True
        return self.rank == 0 or self.local_rank == 0 or self.rank == self.slowest_rank
