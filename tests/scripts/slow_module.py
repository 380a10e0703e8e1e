"""A small model whose `slow` module sleeps `--slow-ms` in its forward: an injected slowdown.

For `hooktrace diff` (a run with `--slow-ms 0` against one with a delay) and for the killed-run
report (`--steps` large, killed mid-way). Plain PyTorch, no hooktrace import.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn


class Slow(nn.Module):
    def __init__(self, dim: int, delay_s: float) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, dim)
        self.delay_s = delay_s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.delay_s:
            time.sleep(self.delay_s)
        return self.proj(x)


class Net(nn.Module):
    def __init__(self, dim: int, delay_s: float) -> None:
        super().__init__()
        self.inp = nn.Linear(16, dim)
        self.slow = Slow(dim, delay_s)
        self.mid = nn.Sequential(nn.Linear(dim, dim), nn.ReLU())
        self.out = nn.Linear(dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.mid(self.slow(self.inp(x))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--slow-ms", type=float, default=0.0)
    parser.add_argument("--step-sleep-ms", type=float, default=0.0, help="outside any module (killed-run test)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = Net(64, args.slow_ms / 1e3)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x, y = torch.randn(32, 16), torch.randn(32, 1)
    for step in range(1, args.steps + 1):
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if args.step_sleep_ms:
            time.sleep(args.step_sleep_ms / 1e3)
        if step % 10 == 0:
            print(f"step {step} loss {loss.item():.4f}", flush=True)


if __name__ == "__main__":
    main()
