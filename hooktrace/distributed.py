"""Where this process sits in a job: rank, local rank, world size, node, restart count.

Read from the variables torchrun sets, falling back to an initialised ``torch.distributed``
process group, else a single process.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass


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
