"""TraceML (PyPI ``traceml-ai``) as a peer in ``bench_overhead``: its default per-step tracing.

What a user of a plain PyTorch loop does, per TraceML's README: ``traceml.init(mode="auto")``
once, then ``with traceml.trace_step(model):`` around each step, with TraceML's aggregator
running. Headless: ``ui_mode="summary"`` (the default: no live display, no dashboard; the
aggregator prints its summary at the end, here into a log file), logs in a temporary directory.
The training process talks to the aggregator over TCP on 127.0.0.1 only.

Why its own process (one per workload), apart from hooktrace and torch.profiler: TraceML's state
is process-wide and has no off switch. ``init`` replaces ``nn.Module.__call__``,
``Tensor.backward``, ``torch.autograd.backward``, ``Tensor.to`` and ``DataLoader.__iter__``, the
first ``trace_step`` registers global optimizer-step hooks (they fire for every optimizer in the
process), and a sampler thread runs until exit. In the main process all of that would land in
the bare blocks and in every other tool's blocks.

How it is timed (:func:`child_main`), on one copy of the workload, bare and traced in turn:

- bare blocks run with the five replaced functions put back to torch's own and TraceML's global
  optimizer hooks taken out (:class:`TorchPatches`; swapped between blocks, untimed), so a bare
  block is training without TraceML; traced blocks see exactly what ``init`` installed;
- TraceML's sampler thread wakes every ``interval`` (2 s by default) and processes every step
  traced since its last tick. A traced block spans exactly one tick period: from a little after
  one tick ends to the same point after the next (:func:`_to_boundary`), so each block holds
  one tick with its own steps' processing, as every period of a run does. Bare blocks run
  between ticks. A round therefore takes two tick periods (the untimed traced lead-in fills the
  rest of the second one), so TraceML gets fewer rounds than the main process's modes.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROUNDS = 10
"""Rounds per workload (about two tick periods, 4 s, each)."""
WARMUP_STEPS = 20
BOUNDARY_S = 0.1
"""A block boundary is the first step end this long after a tick ended: the tick's TCP send and
its wake-ups are over by then."""
BARE_MARGIN_S = 0.5
"""Bare blocks last ``interval - BOUNDARY_S - BARE_MARGIN_S``: they end before the next tick."""
SERVE_START_S = 60.0
FINALIZE_S = 60.0
"""Time the aggregator gets to write its final summary after SIGINT (its Ctrl+C)."""


def version() -> str | None:
    """traceml-ai's version, or None when it is not importable (importing it starts nothing)."""
    try:
        import traceml_ai
    except ImportError:
        return None
    return str(getattr(traceml_ai, "__version__", "unknown"))


@dataclass
class PeerResult:
    """One workload under TraceML, from its own process."""

    ratios: list[float]
    bare_ms: float
    block_s: float
    traced_steps: int
    seen_steps: int | None
    """Steps in the aggregator's final summary (None: no summary written)."""


def measure(name: str, rounds: int, timeout_s: float = 600.0) -> PeerResult:
    """Start a TraceML aggregator (``traceml serve``) and a child process that trains ``name``
    bare and traced in turn; stop both (nothing outlives this call) and return the child's ratios."""
    with tempfile.TemporaryDirectory(prefix="hooktrace-bench-traceml-") as tmp:
        logs = Path(tmp) / "logs"
        port = _free_port()
        with open(Path(tmp) / "serve.log", "wb") as serve_log:
            serve = subprocess.Popen(
                [
                    *_traceml_command(),
                    "serve",
                    *("--mode", "summary", "--logs-dir", str(logs)),
                    *("--run-name", "bench", "--aggregator-port", str(port)),
                ],
                stdout=serve_log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=tmp,
            )
            try:
                child = subprocess.run(
                    [sys.executable, __file__, name, str(rounds), str(port), str(logs)],
                    capture_output=True,
                    text=True,
                    timeout=timeout_s,
                    cwd=tmp,  # TraceML looks for a traceml.yaml from here up
                    stdin=subprocess.DEVNULL,
                )
            finally:
                _stop(serve)
        if child.returncode != 0:
            serve_out = (Path(tmp) / "serve.log").read_text(errors="replace")
            raise RuntimeError(
                f"the TraceML run of {name} failed ({child.returncode}):\n{child.stderr[-3000:]}\n"
                f"aggregator:\n{serve_out[-2000:]}"
            )
        out = json.loads(child.stdout.strip().splitlines()[-1])
        return PeerResult(
            ratios=out["ratios"],
            bare_ms=out["bare_ms"],
            block_s=out["block_s"],
            traced_steps=out["traced_steps"],
            seen_steps=_summary_steps(logs / "bench" / "final_summary.json"),
        )


def _traceml_command() -> list[str]:
    script = Path(sys.executable).with_name("traceml")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from traceml_ai.launcher.cli import main; sys.exit(main())"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGINT (what TraceML documents: Ctrl+C finalizes the summary), then terminate, then kill."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(FINALIZE_S)
            return
        except subprocess.TimeoutExpired:
            process.terminate()
        try:
            process.wait(5.0)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _summary_steps(path: Path) -> int | None:
    try:
        summary = json.loads(path.read_text())
        return int(summary["analysis_window"]["sections"]["step_time"]["samples"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


# -- the child process ------------------------------------------------------------------------------


class TorchPatches:
    """Swaps TraceML's process-wide changes to torch in and out (between blocks, untimed)."""

    def __init__(self) -> None:
        import torch
        from torch.optim import optimizer as optimizer_module
        from torch.utils.data import DataLoader

        self.places: list[tuple[Any, str]] = [
            (torch.nn.Module, "__call__"),
            (torch.Tensor, "backward"),
            (torch.Tensor, "to"),
            (torch.autograd, "backward"),
            (DataLoader, "__iter__"),
        ]
        self.hook_dicts = [optimizer_module._global_optimizer_pre_hooks, optimizer_module._global_optimizer_post_hooks]
        self.bare = self._snapshot()
        self.traced = self.bare

    def _snapshot(self) -> tuple[list[tuple[bool, Any]], list[dict[Any, Any]]]:
        values = [(name in vars(owner), vars(owner).get(name)) for owner, name in self.places]
        return values, [dict(hooks) for hooks in self.hook_dicts]

    def capture_traced(self) -> None:
        """After ``init`` and a first ``trace_step``: everything TraceML installed."""
        self.traced = self._snapshot()
        unchanged = [
            f"{getattr(owner, '__name__', owner)}.{name}"
            for (owner, name), before, after in zip(self.places, self.bare[0], self.traced[0], strict=True)
            if before == after
        ]
        new_hooks = [len(after) - len(before) for before, after in zip(self.bare[1], self.traced[1], strict=True)]
        if unchanged or new_hooks != [1, 1]:
            raise RuntimeError(
                f"traceml-ai {version()} instruments torch differently than this benchmark expects "
                f"(not replaced: {unchanged or 'none'}; new global optimizer hooks: {new_hooks}): "
                "update benchmarks/_traceml_peer.py"
            )

    def apply(self, traced: bool) -> None:
        values, hooks = self.traced if traced else self.bare
        for (owner, name), (present, value) in zip(self.places, values, strict=True):
            if present:
                setattr(owner, name, value)
            elif name in vars(owner):
                delattr(owner, name)
        for target, saved in zip(self.hook_dicts, hooks, strict=True):
            target.clear()
            target.update(saved)


class Ticks:
    """Counts the ends of TraceML's sampler ticks (a wrapper around its ``_tick``; observes only)."""

    def __init__(self, runtime: Any) -> None:
        self.count = 0
        self.last_end = 0.0
        tick = runtime._tick

        def counted(*args: Any, **kwargs: Any) -> Any:
            try:
                return tick(*args, **kwargs)
            finally:
                self.last_end = time.perf_counter()
                self.count += 1

        runtime._tick = counted


def _to_boundary(step: Callable[[], None], ticks: Ticks) -> int:
    """Run steps until a tick has ended and ``BOUNDARY_S`` more have passed; return how many."""
    seen, steps = ticks.count, 0
    while ticks.count == seen:
        step()
        steps += 1
    while time.perf_counter() < ticks.last_end + BOUNDARY_S:
        step()
        steps += 1
    return steps


def _bare_block(step: Callable[[], None], seconds: float) -> tuple[float, int]:
    """Seconds per step of bare steps for about ``seconds`` (the same per-step clock read as a
    traced block's)."""
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step()
        steps += 1
    return (time.perf_counter() - start) / steps, steps


def child_main(name: str, rounds: int, port: int, logs: str) -> None:
    import torch
    from _models import workload

    torch.set_num_threads(1)  # as the main process
    patches = TorchPatches()  # before TraceML touches anything
    import traceml_ai as traceml
    from traceml_ai.runtime import lifecycle

    model, step = workload(name)
    for _ in range(WARMUP_STEPS):
        step()
    traceml.init(
        mode="auto",
        ui_mode="summary",
        logs_dir=logs,
        session_id="bench",
        aggregator_host="127.0.0.1",
        aggregator_port=port,
        connect_timeout_sec=SERVE_START_S,
        on_missing_aggregator="raise",  # its default, "warn", would go on untraced
    )
    handle = lifecycle.get_active_runtime_handle()
    runtime = getattr(handle, "runtime", None)
    if runtime is None or not hasattr(runtime, "_tick"):
        raise RuntimeError(f"TraceML's runtime did not start (handle: {handle!r})")

    def traced() -> None:
        with traceml.trace_step(model):
            step()

    for _ in range(WARMUP_STEPS):
        traced()
    traced_steps = WARMUP_STEPS
    patches.capture_traced()
    ticks = Ticks(runtime)
    bare_s = float(runtime._settings.sampler_interval_sec) - BOUNDARY_S - BARE_MARGIN_S
    if bare_s <= 0:
        raise RuntimeError(f"TraceML's sampler interval {runtime._settings.sampler_interval_sec} s is too short")

    traced_steps += _to_boundary(traced, ticks)  # the first boundary, then a bare block right after it
    patches.apply(traced=False)
    bare_times = [_bare_block(step, bare_s)[0]]
    ratios, block_seconds = [], []
    for _ in range(rounds):
        patches.apply(traced=True)
        traced_steps += _to_boundary(traced, ticks)  # untimed lead-in up to a boundary
        start = time.perf_counter()
        steps = _to_boundary(traced, ticks)
        elapsed = time.perf_counter() - start
        traced_steps += steps
        block_seconds.append(elapsed)
        patches.apply(traced=False)
        bare_times.append(_bare_block(step, bare_s)[0])
        ratios.append(elapsed / steps / ((bare_times[-2] + bare_times[-1]) / 2))
    print(
        json.dumps(
            {
                "ratios": ratios,
                "bare_ms": sorted(bare_times)[len(bare_times) // 2] * 1e3,
                "block_s": sum(block_seconds) / len(block_seconds),
                "traced_steps": traced_steps,
            }
        ),
        flush=True,
    )
    # the runtime stops at exit (TraceML's atexit hook): a last batch and "rank finished" go out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="child process of bench_overhead's TraceML mode")
    parser.add_argument("workload")
    parser.add_argument("rounds", type=int)
    parser.add_argument("port", type=int)
    parser.add_argument("logs")
    args = parser.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    child_main(args.workload, args.rounds, args.port, args.logs)
