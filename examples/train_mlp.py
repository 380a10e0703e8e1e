"""A small MLP regression: the quickest example (tests, dashboards, alerts).

Options let it explode its gradient or produce NaN at a known step, and stay alive afterwards so
a Prometheus server can scrape the final values. Plain PyTorch, no hooktrace import.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from torch import nn


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--step-sleep", type=float, default=0.0, help="seconds to sleep per step")
    parser.add_argument("--explode-at", type=int, default=0, help="scale the loss by 1e4 at this step")
    parser.add_argument("--explode-when", default="", help="explode once, at the first step after this file exists")
    parser.add_argument("--nan-at", type=int, default=0, help="feed a NaN input at this step")
    parser.add_argument("--sleep-after", type=float, default=0.0, help="keep the process alive (for scrapes)")
    parser.add_argument("--exit-code", type=int, default=0)
    parser.add_argument("--print-argv", action="store_true")
    args = parser.parse_args()
    if args.print_argv:
        print("argv:", sys.argv, "name:", __name__, "path0:", sys.path[0], flush=True)
    torch.manual_seed(args.seed)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    exploded = False
    for step in range(1, args.steps + 1):
        x = torch.randn(32, 32)
        if step == args.nan_at:
            x[0, 0] = float("nan")
        y = x.sum(dim=1, keepdim=True)
        loss = nn.functional.mse_loss(model(x), y)
        if step == args.explode_at or (args.explode_when and not exploded and os.path.exists(args.explode_when)):
            loss = loss * 1e4
            exploded = True
        opt.zero_grad()
        loss.backward()
        opt.step()
        if args.step_sleep:
            time.sleep(args.step_sleep)
        if step % 50 == 0 or step == args.steps:
            print(f"step {step} loss {loss.item():.4f}", flush=True)
    time.sleep(args.sleep_after)
    return args.exit_code


if __name__ == "__main__":
    sys.exit(main())
