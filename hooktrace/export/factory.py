"""Which exporters a run gets, from its config. Optional backends are imported lazily."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from hooktrace.distributed import RankChoice
from hooktrace.export.base import Exporter

if TYPE_CHECKING:
    from hooktrace.agent import Agent


def make_exporters(agent: Agent) -> list[Exporter]:
    cfg = agent.config
    rank = agent.info.rank
    exporters: list[Exporter] = []
    if cfg.write_files:
        from hooktrace.export.jsonl import StepsJsonlExporter
        from hooktrace.export.perfetto import PerfettoExporter

        exporters.append(StepsJsonlExporter(os.path.join(agent.out_dir, f"rank{rank}.steps.jsonl")))
        exporters.append(
            PerfettoExporter(
                os.path.join(agent.out_dir, f"rank{rank}.trace.json"),
                rank=rank,
                max_events=cfg.max_trace_events,
                run_id=agent.info.run_id,
                stats=agent.stats,
            )
        )
    if cfg.metrics_port:
        from hooktrace.export.prometheus import PrometheusExporter

        exporters.append(
            PrometheusExporter(
                addr=cfg.metrics_addr,
                base_port=cfg.metrics_port,
                local_rank=agent.info.local_rank,
                out_dir=agent.out_dir if cfg.write_files else None,
                info=agent.info,
                module_ranks=RankChoice(
                    cfg.module_metrics_ranks, agent.info.rank, agent.info.local_rank, agent.info.world_size
                ),
            )
        )
    if cfg.otlp_endpoint:
        from hooktrace.export.otel import OtelExporter

        exporters.append(
            OtelExporter(
                cfg.otlp_endpoint,
                info=agent.info,
                restart_count=agent.placement.restart_count,
                depth=cfg.depth,
                trace_ranks=cfg.trace_ranks,
                watch=cfg.watch,
                stats=agent.stats,
            )
        )
    return exporters
