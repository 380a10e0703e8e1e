"""How big and how slow is one /metrics scrape of a large model?

A 1000-module model at ``--max-modules 1000`` is the worst case the label cap allows by default x4;
the exposition must stay well under Prometheus' usual body limits (1 MB) and render in < 50 ms so a
scrape thread never competes with training for long.

    .venv/bin/python benchmarks/bench_scrape.py [--modules 1000] [--renders 50]
"""

from __future__ import annotations

import argparse
import functools
import random
import statistics
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from hooktrace._aggregate.snapshot import (
    MODULE_TYPE_BUCKETS,
    PHASES,
    STEP_BUCKETS,
    TOTAL,
    Histogram,
    MetricsSnapshot,
    RankInfo,
)
from hooktrace.export.prometheus import HooktraceCollector

MODULE_TYPES = (
    "Linear",
    "LayerNorm",
    "GELU",
    "Dropout",
    "Embedding",
    "MultiheadAttention",
    "Sequential",
    "ModuleList",
    "TransformerBlock",
    "MLP",
)


def build_snapshot(modules: int, seed: int = 0, cap: int | None = None) -> MetricsSnapshot:
    """A snapshot shaped like a transformer's: ``blocks.<i>.<part>`` names, two module phases;
    with ``cap``, the labels a ``--max-modules cap`` run would expose (the rest in ``__other__``)."""
    rng = random.Random(seed)
    names = [f"blocks.{i // 8}.{('attn', 'mlp', 'ln1', 'ln2')[i % 4]}.{i % 8}" for i in range(modules)]
    if cap is not None and modules > cap:
        names = [*names[:cap], "__other__"]
    trace_id = f"{rng.getrandbits(128):032x}"
    step = Histogram(STEP_BUCKETS)
    phases = {p: Histogram(STEP_BUCKETS) for p in PHASES}
    for _ in range(500):
        step.observe(rng.uniform(0.05, 0.3), trace_id)
        for hist in phases.values():
            hist.observe(rng.uniform(0.001, 0.1), trace_id)
    types: dict[tuple[str, str], Histogram] = {}
    for module_type in MODULE_TYPES:
        for phase in ("forward", "backward"):
            hist = types[module_type, phase] = Histogram(MODULE_TYPE_BUCKETS)
            for _ in range(200):
                hist.observe(rng.lognormvariate(-9, 2), trace_id)
    return MetricsSnapshot(
        info=RankInfo("bench-run-0123", 0, 0, 8, "node-a", "0.1.0", "2.13.0", "cuda:0"),
        steps_total=500,
        step_duration=step,
        phase_duration=phases,
        module_duration={(n, p): (rng.uniform(0.1, 10), 50) for n in names for p in ("forward", "backward")},
        module_type_duration=types,
        grad_norm={TOTAL: 3.2, **{n: rng.uniform(0.01, 2) for n in names}},
        grad_norm_ratio=1.1,
        dropped={"spans": 3, "trace_events": 0},
        module_labels=modules,
    )


def _render(render: Callable[[], bytes], renders: int) -> tuple[int, float]:
    """(body bytes, median render ms)."""
    size = len(render())
    times = []
    for _ in range(renders):
        start = time.perf_counter()
        render()
        times.append(time.perf_counter() - start)
    return size, statistics.median(times) * 1e3


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modules", type=int, default=1000)
    parser.add_argument("--renders", type=int, default=50)
    args = parser.parse_args(argv)

    for cap in (256, None):
        collector = HooktraceCollector()
        collector.update(build_snapshot(args.modules, cap=cap))
        registry = CollectorRegistry()
        registry.register(collector)
        what = f"--max-modules {cap} (default)" if cap else f"--max-modules {args.modules}"
        print(f"scrape of a {args.modules}-module model x 2 phases, {what}:")
        _report(registry, args)


def _report(registry: CollectorRegistry, args: argparse.Namespace) -> None:
    # Prometheus asks for OpenMetrics (2.x: underscores escaping, 3.x: allow-utf-8); curl gets text.
    formats = {
        "text": "",
        "openmetrics": "application/openmetrics-text;version=1.0.0",
        "openmetrics utf-8": "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8",
    }
    for label, accept in formats.items():
        encoder, _ = choose_encoder(accept)
        size, ms = _render(functools.partial(encoder, registry), args.renders)
        print(f"  {label}: {size / 1024:.0f} KiB, render {ms:.1f} ms (median of {args.renders})")


if __name__ == "__main__":
    main()
