"""One typed configuration: explicit value > ``HOOKTRACE_*`` environment > default.

Every field is also a ``hooktrace run`` flag (``out`` <-> ``--out``, ``sample_every`` <->
``--sample-every``). Values are checked here, at start-up, so that a bad value fails before training
begins with one line naming the flag, the environment variable and the fix.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from hooktrace import envvars
from hooktrace.errors import ConfigError

BackwardMode = Literal["auto", "full", "off"]
ExplosionAction = Literal["warn", "clip", "raise"]
NonFiniteAction = Literal["warn", "raise"]
MemoryMode = Literal["on", "off"]

_CHOICES: dict[str, tuple[str, ...]] = {
    "backward": ("auto", "full", "off"),
    "on_explosion": ("warn", "clip", "raise"),
    "on_nonfinite": ("warn", "raise"),
    "memory": ("on", "off"),
}


def flag_name(field_name: str) -> str:
    """``sample_every`` -> ``--sample-every``."""
    return "--" + field_name.replace("_", "-")


def _where(name: str) -> str:
    env = envvars.CONFIG_ENV.get(name)
    return f"{flag_name(name)}" + (f" / {env}" if env else "")


def new_run_id() -> str:
    """A readable, sortable id; uses the OS entropy source, never the training's RNG."""
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)


@dataclass(kw_only=True, slots=True)
class Config:
    """What the agent does; see DESIGN §3 for the flag and env var of every field."""

    out: str | None = None
    """Directory of the run's files; ``None`` means ``hooktrace-runs/<run_id>``."""
    run_id: str | None = None
    """Joins ranks, traces and series; ``None`` means ``TORCHELASTIC_RUN_ID`` or a new id."""
    metrics_port: int = 9750
    """Base port of ``/metrics`` (this rank serves port + LOCAL_RANK); 0 turns it off."""
    metrics_addr: str = "127.0.0.1"
    """Bind address of ``/metrics``."""
    otlp_endpoint: str | None = None
    """OTLP/HTTP endpoint for traces; ``None`` means ``OTEL_EXPORTER_OTLP_ENDPOINT`` or off."""
    sample_every: int = 10
    """Per-module timing and spans on every Nth optimizer step (step 1 is always sampled)."""
    flow_every: int = 100
    """Gradient flow (‖grad_output‖ and ‖grad_input‖ per module) on the sampled step at or after
    every Nth step; 0 turns it off. It reads every activation gradient, so it has its own cadence."""
    depth: int = 3
    """Module names in metric labels are cut to this many dotted parts."""
    max_modules: int = 256
    """At most this many module label values; the rest are reported as ``__other__``."""
    backward: BackwardMode = "auto"
    """auto: tensor hooks; full: full backward hooks where safe; off: no per-module backward timing."""
    explode_factor: float = 10.0
    """A gradient spike is a norm above this factor times its rolling median (a module's must
    also be at least 5 % of the model's total norm: health/monitor.py)."""
    on_explosion: ExplosionAction = "warn"
    """What to do on a spike: warn, clip the offending tensors, or raise."""
    on_nonfinite: NonFiniteAction = "warn"
    """What to do on a NaN/Inf gradient: warn or raise."""
    memory: MemoryMode = "on"
    memory_every: int = 100
    """Activation bytes on step 1, the next sampled step, then the sampled step at or after every
    Nth step (``--memory on``); 1 = every sampled step. Activation sizes change with shapes, not
    from step to step, and reading them costs a sampled step several percent: 100, like the
    gradient flow."""
    """Activation memory: bytes saved for backward per module on sampled steps (``saved_tensors_hooks``),
    parameter, gradient and optimizer-state bytes, and on CUDA the allocator's peaks per phase."""
    watch: tuple[str, ...] = ()
    """Module or parameter names (``get_submodule``/``get_parameter``) kept in full detail always."""
    trace_ranks: str = "auto"
    """Ranks whose spans carry phase and module detail: ``auto`` (every rank up to 8 ranks, else rank
    0, one rank per node and the slowest), ``all``, or a comma list like ``0,3``. A string, so that
    it travels as one env value."""
    module_metrics_ranks: str = "auto"
    """Ranks whose ``/metrics`` carry per-module series (same values as ``trace_ranks``); the others
    export step-level series only (at most ``export.prometheus.STEP_LEVEL_BUDGET``)."""
    write_files: bool = True
    """Write ``rank<r>.trace.json``, ``rank<r>.steps.jsonl`` and ``summary.json`` under ``out``."""
    print_summary: bool = False
    """Print the run summary on ``close()`` (the CLI prints it itself)."""
    queue_size: int = 1024
    """Steps buffered between the training thread and the worker; beyond it steps are dropped."""
    max_trace_events: int = 2_000_000
    """Cap on events written to the trace file; the rest are counted as dropped."""

    def __post_init__(self) -> None:
        self.watch = tuple(self.watch)
        if isinstance(self.memory, bool):
            self.memory = "on" if self.memory else "off"
        for name in ("sample_every", "memory_every", "depth", "max_modules", "queue_size", "max_trace_events"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{_where(name)} must be a positive integer, got {value!r}")
        flow = self.flow_every
        if isinstance(flow, bool) or not isinstance(flow, int) or flow < 0:
            raise ConfigError(f"{_where('flow_every')} must be a whole number of steps (0 = off), got {flow!r}")
        port = self.metrics_port
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise ConfigError(f"{_where('metrics_port')} must be a port number 0-65535 (0 = off), got {port!r}")
        if isinstance(self.explode_factor, bool) or not isinstance(self.explode_factor, (int, float)):
            raise ConfigError(f"{_where('explode_factor')} must be a number > 1, got {self.explode_factor!r}")
        if not self.explode_factor > 1:
            raise ConfigError(f"{_where('explode_factor')} must be > 1, got {self.explode_factor!r}")
        self.explode_factor = float(self.explode_factor)
        for name, choices in _CHOICES.items():
            if getattr(self, name) not in choices:
                raise ConfigError(f"{_where(name)} must be one of {', '.join(choices)}, got {getattr(self, name)!r}")
        self.trace_ranks = normal_ranks("trace_ranks", self.trace_ranks)
        self.module_metrics_ranks = normal_ranks("module_metrics_ranks", self.module_metrics_ranks)
        if self.run_id is not None and (not self.run_id or "/" in self.run_id):
            raise ConfigError(f"{_where('run_id')} must be a non-empty name without '/', got {self.run_id!r}")

    @classmethod
    def resolve(cls, explicit: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None) -> Config:
        """Build a config from explicit values over ``HOOKTRACE_*`` variables over defaults."""
        explicit = dict(explicit or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(explicit) - known)
        if unknown:
            raise ConfigError(f"unknown config field {unknown[0]!r}; known fields: {', '.join(sorted(known))}")
        values: dict[str, Any] = {}
        for name, raw in envvars.config_from_env(environ).items():
            if name not in explicit:
                values[name] = _parse(name, raw)
        values.update({k: v for k, v in explicit.items() if v is not None})
        if values.get("run_id") is None:
            values["run_id"] = envvars.default_run_id(environ) or new_run_id()
        if values.get("otlp_endpoint") is None:
            values["otlp_endpoint"] = envvars.default_otlp_endpoint(environ)
        return cls(**values)

    def out_dir(self) -> str:
        """The directory the run's files go to."""
        return self.out or os.path.join("hooktrace-runs", self.run_id or "run")


AUTO_RANKS = "auto"
ALL_RANKS = "all"


def normal_ranks(name: str, value: object) -> str:
    """A rank choice (``--trace-ranks``, ``--module-metrics-ranks``): ``"auto"``, ``"all"`` or a
    canonical ``"0,3"``; a sequence of ints from Python is accepted too. ``name`` is the field."""
    if isinstance(value, str) and value.strip().lower() in (AUTO_RANKS, ALL_RANKS):
        return value.strip().lower()
    parts: list[object]
    if isinstance(value, str):
        parts = [part.strip() for part in value.split(",")]
    elif isinstance(value, (list, tuple)):
        parts = list(value)
    else:
        parts = [value]
    ranks: set[int] = set()
    for part in parts:
        if isinstance(part, bool) or not (
            (isinstance(part, int) and part >= 0) or (isinstance(part, str) and part.isdigit())
        ):
            # raise, not skip: a typo here would silently leave out the intended ranks
            raise ConfigError(f"{_where(name)} must be auto, all or a comma list of ranks like 0,3, got {value!r}")
        ranks.add(int(part))
    return ",".join(str(rank) for rank in sorted(ranks))


def rank_list(value: str) -> tuple[int, ...] | None:
    """The ranks of a normalised rank choice; ``None`` for ``auto`` and ``all``."""
    if value in (AUTO_RANKS, ALL_RANKS):
        return None
    return tuple(int(part) for part in value.split(","))


def _parse(name: str, raw: str) -> Any:
    """Turn an environment string into the field's type, naming the variable on failure."""
    kind = {f.name: f.type for f in dataclasses.fields(Config)}[name]
    try:
        if name == "watch":
            return tuple(part.strip() for part in raw.split(",") if part.strip())
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
    except ValueError:
        raise ConfigError(
            f"{envvars.CONFIG_ENV[name]}={raw!r} is not valid for {flag_name(name)}: expected a number"
        ) from None
    return raw


__all__ = ["BackwardMode", "Config", "ExplosionAction", "MemoryMode", "NonFiniteAction"]
