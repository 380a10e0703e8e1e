"""Two models, two optimizers: a tiny GAN trained DCGAN-style.

D steps on real and detached fake samples; then G steps on D's verdict of the fakes, a backward that
also fills D's gradients (G's optimizer must not count them). Before each step the script prints
the total gradient norm of exactly the parameters that optimizer updates. Plain PyTorch, no
hooktrace import. Prints `D|G step N loss L norm G` (repr of floats).
"""

from __future__ import annotations

import argparse

import torch
from torch import nn


def total_norm(module: nn.Module) -> float:
    return torch.nn.utils.get_total_norm([p.grad for p in module.parameters() if p.grad is not None]).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=20, help="iterations; each steps D, then G")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    generator = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
    discriminator = nn.Sequential(nn.Linear(4, 32), nn.LeakyReLU(0.2), nn.Linear(32, 1))
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=2e-4, betas=(0.5, 0.999))
    opt_g = torch.optim.Adam(generator.parameters(), lr=2e-4, betas=(0.5, 0.999))
    bce = nn.BCEWithLogitsLoss()
    ones, zeros = torch.ones(16, 1), torch.zeros(16, 1)
    for step in range(1, args.steps + 1):
        real = torch.randn(16, 4) + 2.0
        fake = generator(torch.randn(16, 8))

        opt_d.zero_grad()
        loss_d = bce(discriminator(real), ones) + bce(discriminator(fake.detach()), zeros)
        loss_d.backward()
        print(f"D step {step} loss {loss_d.item()!r} norm {total_norm(discriminator)!r}", flush=True)
        opt_d.step()

        opt_g.zero_grad()
        loss_g = bce(discriminator(fake), ones)
        loss_g.backward()  # fills D's gradients too
        print(f"G step {step} loss {loss_g.item()!r} norm {total_norm(generator)!r}", flush=True)
        opt_g.step()


if __name__ == "__main__":
    main()
