"""Every environment variable hooktrace reads, declared once.

Each ``HOOKTRACE_*`` variable is the environment form of one ``--flag`` of ``hooktrace run`` and one
field of :class:`hooktrace.Config` (explicit value > environment > default). This is the only
module that reads ``os.environ`` for configuration; ``OTEL_*`` variables stay with the
OpenTelemetry SDK, and the torchrun variables are read by :mod:`hooktrace.distributed`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

HOOKTRACE_OUT = "HOOKTRACE_OUT"
"""Directory for the run's files. Default: ``hooktrace-runs/<run_id>``."""

HOOKTRACE_RUN_ID = "HOOKTRACE_RUN_ID"
"""Joins ranks, traces and series. Default: ``TORCHELASTIC_RUN_ID`` or a generated id."""

HOOKTRACE_METRICS_PORT = "HOOKTRACE_METRICS_PORT"
"""Base port of ``/metrics``; a rank serves port + LOCAL_RANK. 0 turns it off. Default: 9750."""

HOOKTRACE_METRICS_ADDR = "HOOKTRACE_METRICS_ADDR"
"""Bind address of ``/metrics``. Default: 127.0.0.1 (use 0.0.0.0 in clusters)."""

HOOKTRACE_OTLP_ENDPOINT = "HOOKTRACE_OTLP_ENDPOINT"
"""OTLP/HTTP traces endpoint. Default: ``OTEL_EXPORTER_OTLP_ENDPOINT`` or off."""

HOOKTRACE_SAMPLE_EVERY = "HOOKTRACE_SAMPLE_EVERY"
"""Per-module timing and spans on every Nth step. Default: 10."""

HOOKTRACE_FLOW_EVERY = "HOOKTRACE_FLOW_EVERY"
"""Gradient-flow norms on the sampled step at or after every Nth step; 0 = off. Default: 100."""

HOOKTRACE_DEPTH = "HOOKTRACE_DEPTH"
"""Module-name depth of metric labels. Default: 3."""

HOOKTRACE_MAX_MODULES = "HOOKTRACE_MAX_MODULES"
"""Cap on module label values; the rest is ``__other__``. Default: 256."""

HOOKTRACE_BACKWARD = "HOOKTRACE_BACKWARD"
"""Backward timing: auto (tensor hooks), full (full backward hooks), off. Default: auto."""

HOOKTRACE_EXPLODE_FACTOR = "HOOKTRACE_EXPLODE_FACTOR"
"""A spike is a norm above this factor times its rolling median (a module's also >= 5 % of the
total norm). Default: 10."""

HOOKTRACE_ON_EXPLOSION = "HOOKTRACE_ON_EXPLOSION"
"""warn, clip (per-tensor) or raise. Default: warn."""

HOOKTRACE_ON_NONFINITE = "HOOKTRACE_ON_NONFINITE"
"""warn or raise. Default: warn."""

HOOKTRACE_MEMORY = "HOOKTRACE_MEMORY"
"""Activation memory per module on sampled steps, and memory totals: on or off. Default: on."""

HOOKTRACE_MEMORY_EVERY = "HOOKTRACE_MEMORY_EVERY"
"""Activation bytes on step 1, the next sampled step, then the sampled step at or after every
Nth step. Default: 100 (1 = every sampled step)."""

HOOKTRACE_WATCH = "HOOKTRACE_WATCH"
"""Comma-separated module/parameter names always kept in full detail. Default: none."""

HOOKTRACE_TRACE_RANKS = "HOOKTRACE_TRACE_RANKS"
"""Ranks that emit span detail: comma-separated ranks (``0,3``), ``all`` or ``auto`` (every rank up to
8 ranks, else rank 0, one rank per node and the slowest). Rank 0 always emits the root ``step {n}``
span. Default: auto."""

HOOKTRACE_MODULE_METRICS_RANKS = "HOOKTRACE_MODULE_METRICS_RANKS"
"""Ranks whose ``/metrics`` carry per-module series; same values as ``HOOKTRACE_TRACE_RANKS``. The
other ranks export step-level series only. Default: auto."""

HOOKTRACE_QUIET_SUMMARY = "HOOKTRACE_QUIET_SUMMARY"
"""Set to 1 by ``hooktrace run --nproc-per-node``: workers stay quiet, the launcher prints the
merged summary. Not a config field."""


def quiet_summary(environ: Mapping[str, str] | None = None) -> bool:
    env = os.environ if environ is None else environ
    return env.get(HOOKTRACE_QUIET_SUMMARY) == "1"


CONFIG_ENV: dict[str, str] = {
    "out": HOOKTRACE_OUT,
    "run_id": HOOKTRACE_RUN_ID,
    "metrics_port": HOOKTRACE_METRICS_PORT,
    "metrics_addr": HOOKTRACE_METRICS_ADDR,
    "otlp_endpoint": HOOKTRACE_OTLP_ENDPOINT,
    "sample_every": HOOKTRACE_SAMPLE_EVERY,
    "flow_every": HOOKTRACE_FLOW_EVERY,
    "depth": HOOKTRACE_DEPTH,
    "max_modules": HOOKTRACE_MAX_MODULES,
    "backward": HOOKTRACE_BACKWARD,
    "explode_factor": HOOKTRACE_EXPLODE_FACTOR,
    "on_explosion": HOOKTRACE_ON_EXPLOSION,
    "on_nonfinite": HOOKTRACE_ON_NONFINITE,
    "memory": HOOKTRACE_MEMORY,
    "memory_every": HOOKTRACE_MEMORY_EVERY,
    "watch": HOOKTRACE_WATCH,
    "trace_ranks": HOOKTRACE_TRACE_RANKS,
    "module_metrics_ranks": HOOKTRACE_MODULE_METRICS_RANKS,
}
"""Config field -> the environment variable that sets it."""

OTEL_EXPORTER_OTLP_ENDPOINT = "OTEL_EXPORTER_OTLP_ENDPOINT"
"""The OpenTelemetry SDK's endpoint, used when ``HOOKTRACE_OTLP_ENDPOINT`` is unset."""

TORCHELASTIC_RUN_ID = "TORCHELASTIC_RUN_ID"
"""Set by torchrun; the default run id so that all ranks of a job agree."""


def config_from_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Return ``{field: raw string}`` for every HOOKTRACE_* variable that is set and non-empty."""
    env = os.environ if environ is None else environ
    return {field: env[name] for field, name in CONFIG_ENV.items() if env.get(name, "") != ""}


def default_run_id(environ: Mapping[str, str] | None = None) -> str | None:
    """The run id torchrun gave all ranks, if any."""
    env = os.environ if environ is None else environ
    value = env.get(TORCHELASTIC_RUN_ID, "")
    return value if value and value != "none" else None


def default_otlp_endpoint(environ: Mapping[str, str] | None = None) -> str | None:
    """The standard OpenTelemetry endpoint, if the user set one."""
    env = os.environ if environ is None else environ
    return env.get(OTEL_EXPORTER_OTLP_ENDPOINT) or None
