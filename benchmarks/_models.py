"""Benchmark workloads: a narrow MLP, two small transformers and a small CNN, with a training step each."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

from train_transformer import TinyLM


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class NarrowMLP(nn.Module):
    """12 narrow layers: a ~1.7 ms CPU step (one thread) of 27 modules, the worst case for any
    fixed per-step or per-module cost."""

    def __init__(self, width: int = 64, layers: int = 12, classes: int = 10) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        for _ in range(layers):
            blocks += [nn.Linear(width, width), nn.GELU()]
        self.body = nn.Sequential(*blocks)
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def workload(name: str) -> tuple[nn.Module, Callable[[], None]]:
    """``(model, step)``: one optimizer step of the named workload per call."""
    torch.manual_seed(0)
    if name in ("tiny-transformer", "transformer"):
        tiny = name == "tiny-transformer"
        seq = 32 if tiny else 64
        model: nn.Module = TinyLM(dim=64 if tiny else 128, layers=2 if tiny else 4, seq=seq)
        data = torch.randint(0, 64, (16, seq + 1))
        opt: torch.optim.Optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)

        def step() -> None:
            logits = model(data[:, :-1])
            loss = nn.functional.cross_entropy(logits.reshape(-1, 64), data[:, 1:].reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return model, step
    if name == "mlp":
        mlp = NarrowMLP()
        # Fresh batches labelled by a fixed random teacher, from a generator of this copy's own: every
        # copy sees the same stream and none memorizes it (on one fixed batch AdamW drives the
        # gradients towards zero and after ~10k steps they spike). GELU, not ReLU: dead ReLU units
        # have zero gradients, their AdamW moments decay into denormal floats, and the copy that
        # trained most (the bare one) ran 4 % slower than a fresh one. 1e-5: 3e-5 grows spikes.
        generator = torch.Generator().manual_seed(0)
        teacher = torch.randn(64, 10, generator=generator)
        adamw = torch.optim.AdamW(mlp.parameters(), lr=1e-5)

        def mlp_step() -> None:
            inputs = torch.randn(32, 64, generator=generator)
            loss = nn.functional.cross_entropy(mlp(inputs), (inputs @ teacher).argmax(1))
            adamw.zero_grad(set_to_none=True)
            loss.backward()
            adamw.step()

        return mlp, mlp_step
    model = SmallCNN()
    images, labels = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def cnn_step() -> None:
        loss = nn.functional.cross_entropy(model(images), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return model, cnn_step
