"""`make gpu-check`: the checks that need a GPU, in one script for a lent machine.

1. The CUDA tests (`pytest tests/cuda`).
2. A training loop with the agent attached under ``torch.cuda.set_sync_debug_mode("error")``:
   sampled, flow and unsampled steps, gradient clipping and a GradScaler-free bf16 autocast; any
   host sync the agent makes on the training thread raises, so the loop must finish silently.
3. The overhead on CUDA of a GPT-2-small-size model (12 layers, 768 wide, bf16 autocast): bare,
   the default config, ``--sample-every 1 --flow-every 0`` (each also with ``--memory off``: what
   activation memory per module costs) and ``torch.profiler`` with CUDA
   activities, in interleaved blocks timed with a synchronize at block edges (the benchmark's
   own sync, outside the agent), median ratio to the bare blocks around each. Then what memory
   tracking adds on the device: each mode with memory on minus the same with ``--memory off``, in
   % of step time and, with every step sampled, in ms per sampled step.

``--device cpu --tiny`` runs the same code on a small model on the CPU (the smoke test).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator

import torch
from torch import nn

import hooktrace


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim), nn.Dropout(0.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, vocab: int, dim: int, layers: int, heads: int, seq: int) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, dim), nn.Embedding(seq, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.ln, self.head = nn.LayerNorm(dim), nn.Linear(dim, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def workload(device: str, tiny: bool) -> tuple[nn.Module, Callable[[], None]]:
    """A GPT-2-small-size model (or a tiny one) and one bf16-autocast training step of it."""
    torch.manual_seed(0)
    vocab, dim, layers, heads, seq, batch = (128, 32, 2, 2, 16, 4) if tiny else (50257, 768, 12, 12, 512, 8)
    model = GPT(vocab, dim, layers, heads, seq).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    data = torch.randint(0, vocab, (batch, seq + 1), device=device)

    def step() -> None:
        with torch.autocast(device, dtype=torch.bfloat16):
            logits = model(data[:, :-1])
            loss = nn.functional.cross_entropy(logits.float().reshape(-1, vocab), data[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return model, step


@contextlib.contextmanager
def sync_debug_error(device: str) -> Iterator[None]:
    if device != "cuda":
        yield
        return
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def check_no_sync(device: str, tiny: bool, steps: int) -> str:
    model, step = workload(device, tiny)
    with tempfile.TemporaryDirectory(prefix="hooktrace-gpu-") as out:
        agent = hooktrace.attach(model, out=out, metrics_port=0, sample_every=3, flow_every=6)
        with sync_debug_error(device):
            for _ in range(steps):
                step()
        summary = agent.close()
    errors = sum(r.get("hook_errors", 0) for r in summary.ranks)
    if summary.steps < steps - 1 or errors:
        raise SystemExit(f"gpu-check: sync-debug loop recorded {summary.steps} steps, {errors} hook errors")
    memory = summary.ranks[0].get("memory", {})
    peaks = ", ".join(
        f"{p} {v['allocated_peak'] / 2**20:.1f}" for p, v in memory.get("cuda", {}).get("phases", {}).items()
    )
    return (
        f"sync-debug loop: {summary.steps} steps with the agent attached, no host sync, no hook error; "
        f"activations {(memory.get('activations') or 0) / 2**20:.1f} MiB per sampled step; "
        f"allocated peaks (MiB): {peaks or 'none (CPU)'}"
    )


def timed(step: Callable[[], None], steps: int, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def overhead(device: str, tiny: bool, rounds: int, steps: int) -> list[str]:
    modes: dict[str, Callable[[], None]] = {}
    agents = []
    _, bare = workload(device, tiny)
    for name, options in (
        ("default", {}),
        ("--memory off", {"memory": "off"}),
        ("--sample-every 1 --flow-every 0", {"sample_every": 1, "flow_every": 0}),
        ("--sample-every 1 --flow-every 0 --memory-every 1", {"sample_every": 1, "flow_every": 0, "memory_every": 1}),
        ("--sample-every 1 --flow-every 0 --memory off", {"sample_every": 1, "flow_every": 0, "memory": "off"}),
    ):
        model, step = workload(device, tiny)
        out = tempfile.mkdtemp(prefix="hooktrace-gpu-")
        agents.append(hooktrace.attach(model, out=out, metrics_port=0, **options))
        modes[f"hooktrace {name}"] = step
    _, profiled = workload(device, tiny)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)

    def under_profiler() -> None:
        with torch.profiler.profile(activities=activities):
            for _ in range(steps):
                profiled()

    for step in (bare, *modes.values(), profiled):
        timed(step, 3, device)  # warm-up
    ratios: dict[str, list[float]] = {name: [] for name in (*modes, "torch.profiler")}
    seconds: dict[str, list[float]] = {name: [] for name in ratios}
    for _ in range(rounds):
        for name in ratios:
            before = timed(bare, steps, device)
            if name == "torch.profiler":
                if device == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                under_profiler()
                if device == "cuda":
                    torch.cuda.synchronize()
                took = (time.perf_counter() - start) / steps
            else:
                took = timed(modes[name], steps, device)
            after = timed(bare, steps, device)
            ratios[name].append(took / ((before + after) / 2))
            seconds[name].append(took)
    for agent in agents:
        agent.close()
    lines = [f"overhead {name}: {statistics.median(values) * 100 - 100:+.1f} %" for name, values in ratios.items()]
    return [*lines, memory_cost(device, ratios, seconds)]


def memory_cost(device: str, ratios: dict[str, list[float]], seconds: dict[str, list[float]]) -> str:
    """What memory tracking (``--memory on``, the default) adds: each mode minus its ``--memory off``
    twin, medians over the rounds."""

    def added(on: str, off: str, values: dict[str, list[float]]) -> float:
        return statistics.median(values[f"hooktrace {on}"]) - statistics.median(values[f"hooktrace {off}"])

    every = "--sample-every 1 --flow-every 0"
    measured, off = f"{every} --memory-every 1", f"{every} --memory off"
    return (
        f"memory tracking on {device} (hooktrace minus hooktrace --memory off): "
        f"{added('default', '--memory off', ratios) * 100:+.1f} % of step time at the defaults; "
        f"{added(measured, off, ratios) * 100:+.1f} % of step time, {added(measured, off, seconds) * 1e3:+.2f} ms "
        f"per measured step, with every step sampled and measured ({measured})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a tiny model (the CPU smoke test)")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--no-tests", action="store_true", help="skip pytest tests/cuda")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu-check: no CUDA device here; run it on a machine with a GPU")
    if not args.no_tests:
        code = subprocess.call([sys.executable, "-m", "pytest", "-q", "tests/cuda"])
        if code:
            raise SystemExit(code)
    print(check_no_sync(args.device, args.tiny, steps=20))
    for line in overhead(args.device, args.tiny, args.rounds, args.steps):
        print(line)


if __name__ == "__main__":
    main()
