"""hooktrace: per-module timing and gradient health for PyTorch training, through module hooks.

agent = hooktrace.attach(model)          # or: model.apply(agent.instrument)
...train...
agent.close()                            # flush, write the summary, remove every hook
"""

from __future__ import annotations

from typing import Any

from torch import nn

from hooktrace._version import __version__
from hooktrace.agent import Agent
from hooktrace.config import Config
from hooktrace.errors import (
    AttachError,
    ConfigError,
    GradientExplosionError,
    HooktraceError,
    NonFiniteGradientError,
)
from hooktrace.summary import RunSummary


def attach(model: nn.Module, config: Config | None = None, **options: Any) -> Agent:
    """Instrument ``model`` (every submodule, via ``model.apply``) and return its agent.

    Attaching a model that a live agent already watches returns that agent (idempotent);
    asking for a different configuration then raises :class:`AttachError`.
    """
    from hooktrace.agent import check_attachable, existing_agent

    check_attachable(model)
    current = existing_agent(model)
    if current is not None:
        if options or (config is not None and config != current.config):
            raise AttachError(
                f"{type(model).__name__} is already attached to a hooktrace agent; "
                "call agent.detach() before attaching with other options"
            )
        return current
    agent = Agent(config, **options)
    return agent.attach(model)


__all__ = [
    "Agent",
    "AttachError",
    "Config",
    "ConfigError",
    "GradientExplosionError",
    "HooktraceError",
    "NonFiniteGradientError",
    "RunSummary",
    "__version__",
    "attach",
]
