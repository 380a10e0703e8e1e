"""``--on-explosion clip|raise`` and ``--on-nonfinite raise``: decide before the optimizer steps.

These modes need the verdict on the training thread at the optimizer pre-hook, so they read the
norms on the host there (a device sync on CUDA: the documented price of acting, not just
watching). Clipping scales only the offending tensors' ``.grad`` down to their threshold; after
DDP's all-reduce every rank holds the same gradients, so every rank clips the same tensors.
"""

from __future__ import annotations

import torch

from hooktrace._record.buffer import StepBuffer
from hooktrace.config import Config
from hooktrace.errors import GradientExplosionError, NonFiniteGradientError
from hooktrace.health.monitor import GradHealth, nonfinite_source, total_series
from hooktrace.health.norms import GradNormCapture


class SyncGuard:
    """Evaluates gradient health at the optimizer pre-hook and acts on it."""

    def __init__(
        self,
        config: Config,
        capture: GradNormCapture,
        health: GradHealth,
    ) -> None:
        self.config = config
        self.capture = capture
        self.health = health

    def check(self, buf: StepBuffer, values: list[float]) -> None:
        """Set ``buf.health`` from the step's host norms; clip in place or raise as configured.
        A forward replay, when one was needed, has already run (``buf.forward_source``)."""
        params = self.capture.params()
        verdict = self.health.evaluate(
            params,
            buf.grad_present,
            values,
            detail=buf.sampled,
            per_param=self.config.on_explosion == "clip",
            total_series=total_series(buf.optimizers),
        )
        buf.health = verdict
        if verdict.nonfinite and self.config.on_nonfinite == "raise":
            module, _, phase = nonfinite_source(buf, verdict, params, self.capture.table)
            raise NonFiniteGradientError(buf.number, module, phase)
        if not verdict.spike and not verdict.spike_params:
            return
        if self.config.on_explosion == "raise" and verdict.spike:
            ratio = max(r for _, r in verdict.spike_modules.values())
            raise GradientExplosionError(buf.number, {k: v for k, (v, _) in verdict.spike_modules.items()}, ratio)
        if self.config.on_explosion == "clip":
            by_pos = dict(zip(buf.grad_present, values, strict=True))
            with torch.no_grad():
                for pos, threshold in verdict.spike_params.items():
                    grad = params[pos].param.grad
                    norm = by_pos.get(pos)
                    if grad is None or norm is None or norm <= threshold:
                        continue
                    grad.mul_(threshold / norm)
                    verdict.clipped[pos] = (norm, threshold)
