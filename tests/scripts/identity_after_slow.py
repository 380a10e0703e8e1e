"""`nn.Dropout(0.0)` and `nn.Identity()` right after a deliberately slow layer (a big Linear).

Both return their input tensor itself; their backward time is none of their own. Plain PyTorch,
no hooktrace import. Prints each step's loss (repr of floats).
"""

from __future__ import annotations

import argparse

import torch
from torch import nn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--width", type=int, default=1024, help="the slow layer is Linear(width, width)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    w = args.width
    model = nn.Sequential(
        nn.Linear(16, w),  # "0": so that the slow layer's input needs a gradient too
        nn.Linear(w, w),  # "1": the slow layer
        nn.Dropout(0.0),  # "2"
        nn.Identity(),  # "3"
        nn.Linear(w, 1),  # "4"
    )
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    for step in range(1, args.steps + 1):
        x = torch.randn(64, 16)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        print(f"step {step} loss {loss.item()!r}", flush=True)


if __name__ == "__main__":
    main()
