"""Gradient clipping by the script, with a loss spike injected at a known step.

Every step clips with `clip_grad_norm_(max_norm=1.0)` and prints the total norm it returns (the
norm before clipping). Plain PyTorch, no hooktrace import. Prints `step N loss L norm G` (repr).
"""

from __future__ import annotations

import argparse

import torch
from torch import nn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=35)
    parser.add_argument("--spike-at", type=int, default=30, help="multiply the loss by 1e4 at this step")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    for step in range(1, args.steps + 1):
        x = torch.randn(32, 32)
        loss = nn.functional.mse_loss(model(x), x.sum(dim=1, keepdim=True))
        if step == args.spike_at:
            loss = loss * 1e4
        opt.zero_grad()
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
        opt.step()
        print(f"step {step} loss {loss.item()!r} norm {norm.item()!r}", flush=True)


if __name__ == "__main__":
    main()
