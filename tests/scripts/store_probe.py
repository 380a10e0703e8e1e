"""Two DDP ranks for 800 steps (~25 s), rank 1 slower; then each prints what the process group's store holds
under hooktrace's keys (the slowest rank the agents agreed on, and each rank's busy time)."""

from __future__ import annotations

import json
import os
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

dist.init_process_group("gloo")
rank = dist.get_rank()
model = DistributedDataParallel(nn.Linear(8, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.01)
for _ in range(800):  # ~25 s: past two of the agents' 10 s checkpoints (same step count on both ranks)
    loss = model(torch.randn(4, 8)).sum()
    opt.zero_grad()
    loss.backward()
    opt.step()
    time.sleep(0.04 if rank == 1 else 0.02)
store = dist.distributed_c10d._get_default_store()
prefix = f"hooktrace/{os.environ['HOOKTRACE_RUN_ID']}/0/"
keys = ("slowest", "busy_us/0", "busy_us/1")
found = {key: store.get(prefix + key).decode() for key in keys if store.check([prefix + key])}
print(f"rank {rank} store {json.dumps(found)}", flush=True)
dist.barrier()
dist.destroy_process_group()
