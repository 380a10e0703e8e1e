"""Per-step cost of gradient health for a 100M-parameter-shaped model (many tensors).

Measures, side by side in one process: the training-thread cost of the norm capture at the
optimizer pre-hook (one ``_foreach_norm`` + one stack), the worker-thread cost of turning the
norms into per-module verdicts, and a plain optimizer step for scale.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import hooktrace


def model_100m(width: int = 512, depth: int = 24, vocab: int = 50_000) -> nn.Module:
    """24 transformer-shaped blocks of width 512 and a 50k embedding: ~100M parameters, ~300 tensors."""
    blocks = []
    for _ in range(depth):
        blocks.append(
            nn.ModuleDict(
                {
                    "norm1": nn.LayerNorm(width),
                    "qkv": nn.Linear(width, 3 * width),
                    "proj": nn.Linear(width, width),
                    "norm2": nn.LayerNorm(width),
                    "fc1": nn.Linear(width, 4 * width),
                    "fc2": nn.Linear(4 * width, width),
                }
            )
        )
    return nn.Sequential(nn.Embedding(vocab, width), *blocks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="a tiny model of the same shape (the smoke test)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    model = model_100m(width=16, depth=2, vocab=100) if args.small else model_100m()
    params = [p for p in model.parameters()]
    n = sum(p.numel() for p in params)
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    agent = hooktrace.attach(model, metrics_port=0, write_files=False)
    capture, health = agent.capture, agent.health
    capture_s, verdict_s = [], []
    for _ in range(7):
        start = time.perf_counter()
        reading = capture.capture()
        capture_s.append(time.perf_counter() - start)
        assert reading is not None
        present, values = reading.positions(), reading.values()
        start = time.perf_counter()
        health.evaluate(capture.params(), present, values, detail=False, per_param=False)
        verdict_s.append(time.perf_counter() - start)
    opt = torch.optim.SGD(params, lr=1e-3)
    opt_s = []
    for _ in range(3):
        start = time.perf_counter()
        opt.step()
        opt_s.append(time.perf_counter() - start)
    agent.close()
    cap, ver, step = (statistics.median(v) * 1e3 for v in (capture_s, verdict_s, opt_s))
    print(
        f"grad norms, {n / 1e6:.0f}M params in {len(params)} tensors: capture {cap:.1f} ms on the training "
        f"thread, verdict {ver:.2f} ms on the worker; SGD step {step:.1f} ms "
        f"(capture = {cap / step:.2f}x an SGD step)",
        flush=True,
    )


if __name__ == "__main__":
    main()
