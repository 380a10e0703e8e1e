"""Checkpointing habits after the agent attached: `torch.save` of the whole model, `pickle.dumps`,
and an EMA copy made with `copy.deepcopy`, called under no_grad every step.

Plain PyTorch, no hooktrace import. Prints each step's loss and EMA output (repr of floats).
"""

from __future__ import annotations

import argparse
import copy
import pickle

import torch
from torch import nn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--save", required=True, help="torch.save(model) here, half-way through training")
    parser.add_argument("--pickle", required=True, help="pickle.dumps(model) into this file, at the end")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    ema: nn.Module | None = None
    for step in range(1, args.steps + 1):
        x = torch.randn(8, 16)
        loss = nn.functional.mse_loss(model(x), x.sum(dim=1, keepdim=True))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if ema is None:  # the first forward has run: the agent is attached to `model` by now
            ema = copy.deepcopy(model)
            ema.requires_grad_(False)
        with torch.no_grad():
            for shadow, param in zip(ema.parameters(), model.parameters(), strict=True):
                shadow.mul_(0.9).add_(param, alpha=0.1)
            ema_out = ema(x).sum().item()
        if step == args.steps // 2:
            torch.save(model, args.save)
        print(f"step {step} loss {loss.item()!r} ema {ema_out!r}", flush=True)
    with open(args.pickle, "wb") as handle:
        handle.write(pickle.dumps(model))


if __name__ == "__main__":
    main()
