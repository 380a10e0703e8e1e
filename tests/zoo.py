"""Small models that exercise the hard cases of hook-based profiling, and a seeded trainer."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


class InplaceReLUNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class InplaceResidualNet(nn.Module):
    """``h = block(x); h += x``: an in-place add on a module's output."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.block = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16))
        self.out = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        h = self.block(x)
        h += x
        return self.out(h)


class TiedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.mid = nn.Linear(8, 8)
        self.head = nn.Linear(8, 10, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mid(self.embed(x)))).mean(dim=-1, keepdim=True)


class TwiceNet(nn.Module):
    """One block called twice per forward."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Linear(8, 8), nn.Tanh())
        self.out = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.block(self.block(x)))


class DictNet(nn.Module):
    """A submodule that returns a dict."""

    class Heads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(8, 1)
            self.b = nn.Linear(8, 1)

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"a": self.a(x), "b": self.b(x)}

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Linear(8, 8)
        self.heads = DictNet.Heads()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.heads(torch.relu(self.trunk(x)))
        return out["a"] + out["b"]


class FrozenNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.frozen = nn.Linear(8, 8)
        self.frozen.requires_grad_(False)
        self.train_me = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.train_me(torch.relu(self.frozen(x)))


class CheckpointNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 8)
        self.block = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8))
        self.out = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        h = checkpoint(self.block, h, use_reentrant=False)
        return self.out(h)


class Sleep(nn.Module):
    """Sleeps ``forward_s`` in forward and ``backward_s`` in backward (a custom autograd Function)."""

    class _Fn(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: torch.Tensor, seconds: float) -> torch.Tensor:
            ctx.seconds = seconds
            return x.clone()

        @staticmethod
        def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
            time.sleep(ctx.seconds)
            return grad, None

    def __init__(self, forward_s: float, backward_s: float) -> None:
        super().__init__()
        self.forward_s = forward_s
        self.backward_s = backward_s
        self.scale = nn.Parameter(torch.ones(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.forward_s)
        return Sleep._Fn.apply(x * self.scale, self.backward_s)


class SleepyNet(nn.Module):
    def __init__(self, forward_s: float = 0.02, backward_s: float = 0.03) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 8)
        self.slow = nn.Sequential(nn.Linear(8, 8), Sleep(forward_s, backward_s))
        self.out = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.slow(self.inp(x)))


def make_batch(step: int, model: nn.Module) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 + step)
    if isinstance(model, TiedNet):
        return torch.randint(0, 10, (4, 3), generator=gen)
    return torch.randn(4, 8, generator=gen)


def train(
    factory: Callable[[], nn.Module],
    steps: int = 6,
    *,
    attach: Callable[[nn.Module], Any] | None = None,
    accumulate: int = 1,
    two_optimizers: bool = False,
) -> tuple[list[float], Any]:
    """Seeded SGD training; returns the losses (as Python floats) and whatever ``attach`` returned."""
    torch.manual_seed(0)
    model = factory()
    handle = attach(model) if attach is not None else None
    params = [p for p in model.parameters() if p.requires_grad]
    if two_optimizers:
        half = len(params) // 2
        optimizers = [torch.optim.SGD(params[:half], lr=0.05), torch.optim.Adam(params[half:], lr=0.01)]
    else:
        optimizers = [torch.optim.SGD(params, lr=0.05, momentum=0.9)]
    losses: list[float] = []
    for step in range(steps):
        for opt in optimizers:
            opt.zero_grad()
        for micro in range(accumulate):
            x = make_batch(step * accumulate + micro, model)
            loss = model(x).pow(2).mean() / accumulate
            loss.backward()
            losses.append(loss.item())
        for opt in optimizers:
            opt.step()
    return losses, handle


class NaNAt(nn.Module):
    """Produces NaN in forward from a batch with a huge value (``where="forward"``: data-dependent,
    like a log of a negative, so a replay of that batch reproduces it), or only in backward at a
    given call (``where="backward"``)."""

    class _BackwardNaN(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
            return x.clone()

        @staticmethod
        def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
            return grad * float("nan")

    def __init__(self, at: int, where: str) -> None:
        super().__init__()
        self.at, self.where, self.calls = at, where, 0
        self.lin = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        y = self.lin(x)
        if self.where == "forward" and bool(x.abs().amax() > 1e3):
            y = y * float("nan")
        elif self.where == "backward" and self.calls == self.at:
            y = NaNAt._BackwardNaN.apply(y)
        return y


def nan_batch(step: int, nan_at: int) -> torch.Tensor:
    """A batch; the one of step ``nan_at`` holds a huge value (NaNAt's forward trigger)."""
    return torch.randn(4, 8) * (1e6 if step == nan_at else 1.0)
