"""A tiny model trained under `torch.compile` (CPU inductor).

Plain PyTorch, no hooktrace import. Prints each step's loss (repr of floats).
"""

from __future__ import annotations

import argparse

import torch
from torch import nn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 1))
    compiled = torch.compile(model)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    for step in range(1, args.steps + 1):
        x = torch.randn(8, 16)
        loss = nn.functional.mse_loss(compiled(x), x.sum(dim=1, keepdim=True))
        opt.zero_grad()
        loss.backward()
        opt.step()
        print(f"step {step} loss {loss.item()!r}", flush=True)


if __name__ == "__main__":
    main()
