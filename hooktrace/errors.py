"""The exceptions hooktrace raises.

    HooktraceError
    ├── ConfigError               a bad flag, env var or Config field (raised at start-up)
    ├── AttachError               a model hooktrace cannot instrument (raised by attach)
    ├── GradientExplosionError    --on-explosion raise: raised at the optimizer step of the spike
    └── NonFiniteGradientError    --on-nonfinite raise: raised at the optimizer step of the NaN/Inf

Setup errors carry a one-line message that names the fix. Nothing else ever leaves a hook.
"""

from __future__ import annotations


class HooktraceError(Exception):
    """Base class of every error hooktrace raises on purpose."""


class ConfigError(HooktraceError, ValueError):
    """A configuration value is invalid; the message names the flag, env var and the fix."""


class AttachError(HooktraceError, TypeError):
    """The object passed to attach cannot be instrumented; the message says what to pass instead."""


class GradientExplosionError(HooktraceError, RuntimeError):
    """A gradient norm exceeded ``explode_factor`` x its rolling median and the user chose ``raise``."""

    def __init__(self, step: int, norms: dict[str, float], ratio: float) -> None:
        self.step = step
        self.norms = dict(norms)
        self.ratio = ratio
        where = ", ".join(f"{name}={value:.4g}" for name, value in norms.items())
        super().__init__(
            f"gradient explosion at step {step}: {where} ({ratio:.1f}x the rolling median); "
            "use --on-explosion warn or clip to keep training"
        )


class NonFiniteGradientError(HooktraceError, FloatingPointError):
    """A gradient became NaN/Inf and the user chose ``raise``."""

    def __init__(self, step: int, module: str, phase: str) -> None:
        self.step = step
        self.module = module
        self.phase = phase
        super().__init__(
            f"non-finite gradient at step {step}: first seen in {phase} of module '{module}'; "
            "use --on-nonfinite warn to keep training"
        )
