"""DistributedDataParallel on CPU (gloo): run with torchrun or `hooktrace run --nproc-per-node 2`.

Plain PyTorch, no hooktrace import. Options make one rank slow in one module, register a user
DDP communication hook, crash one rank, or stay alive after training (for scrapes), for the
distributed tests.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


class Slow(nn.Module):
    """Identity that sleeps in forward on one rank."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.seconds:
            time.sleep(self.seconds)
        return x


class Net(nn.Module):
    def __init__(self, slow_s: float) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64))
        self.bottleneck = Slow(slow_s)
        self.head = nn.Linear(64, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.bottleneck(self.encoder(x)))


def counting_hook(state, bucket):  # type: ignore[no-untyped-def]  # DDP checks annotations literally
    """A user's own comm hook: averages like the default and counts its calls."""
    state["calls"] += 1
    tensor = bucket.buffer().div_(dist.get_world_size())
    fut = dist.all_reduce(tensor, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--slow-rank", type=int, default=-1)
    parser.add_argument("--slow-s", type=float, default=0.02)
    parser.add_argument("--comm-hook", action="store_true")
    parser.add_argument("--crash-rank", type=int, default=-1)
    parser.add_argument("--crash-at", type=int, default=5)
    parser.add_argument("--sleep-after", type=float, default=0.0, help="keep the process alive (for scrapes)")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = DistributedDataParallel(Net(args.slow_s if rank == args.slow_rank else 0.0))
    state: dict[str, Any] = {"calls": 0}
    if args.comm_hook:
        model.register_comm_hook(state, counting_hook)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(100 + rank)
    for step in range(1, args.steps + 1):
        if rank == args.crash_rank and step == args.crash_at:
            print(f"rank {rank} crashing at step {step}", flush=True)
            os._exit(3)
        x = torch.randn(16, 32, generator=gen)
        loss = nn.functional.mse_loss(model(x), x.sum(dim=1, keepdim=True))
        opt.zero_grad()
        loss.backward()
        opt.step()
        print(f"rank {rank} step {step} loss {loss.item():.6f}", flush=True)
    if args.comm_hook:
        print(f"rank {rank} comm hook calls {state['calls']}", flush=True)
    dist.barrier()  # every rank done with its collectives before the group goes away
    dist.destroy_process_group()
    time.sleep(args.sleep_after)
    return 0


if __name__ == "__main__":
    sys.exit(main())
