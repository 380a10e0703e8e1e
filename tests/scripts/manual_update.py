"""A training loop without torch.optim: `p.data.add_(p.grad, alpha=-lr)`, then `p.grad.zero_()`.

Plain PyTorch, no hooktrace import. Prints `step N loss L norm G` (repr of floats), the norm being
the total gradient norm after backward, before the update.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 1))
    for step in range(1, args.steps + 1):
        x = torch.randn(32, 32)
        loss = nn.functional.mse_loss(model(x), x.sum(dim=1, keepdim=True))
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads).item()
        for p in model.parameters():
            if p.grad is not None:
                p.data.add_(p.grad, alpha=-args.lr)
                p.grad.zero_()
        print(f"step {step} loss {loss.item()!r} norm {norm!r}", flush=True)


if __name__ == "__main__":
    main()
