"""A step's gradient readings, assigned to the optimizer that steps, checked before it updates.

The step tracker calls these on the training thread: at the end of each backward, at each
optimizer step (pre-hook), and after ``GradScaler.unscale_``. The readings come from
``GradientTaps``; a guard (``--on-explosion clip|raise``, ``--on-nonfinite raise``) acts on them
before the optimizer uses the gradients, and a non-finite step that the parameter gradients
cannot place replays its forward first (health/replay.py).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from hooktrace._record.buffer import StepBuffer
from hooktrace.errors import GradientExplosionError, NonFiniteGradientError
from hooktrace.health.guard import SyncGuard
from hooktrace.health.norms import NormCapture, capture_buffer_norms, merge_captures
from hooktrace.health.replay import ForwardReplay, needs_replay
from hooktrace.health.taps import GradientTaps

if TYPE_CHECKING:
    from hooktrace._record.recorder import Recorder
    from hooktrace._record.tracker import StepTracker


class StepGradients:
    """Glue between the step tracker's callbacks and the gradient readings of a step."""

    def __init__(
        self,
        recorder: Recorder,
        taps: GradientTaps,
        guard: SyncGuard | None,
        replay: ForwardReplay,
        tracker: Callable[[], StepTracker],
    ) -> None:
        self.rec = recorder
        self.taps = taps
        self.guard = guard
        self.replay = replay
        self._tracker = tracker

    def on_backward_end(self, buf: StepBuffer, stepping: torch.optim.Optimizer | None, name: str) -> None:
        """End-of-backward callback: read the gradients; inside ``step(closure)`` they belong to
        the stepping optimizer, checked now (before its update and after nothing else)."""
        start = time.perf_counter_ns()
        try:
            buf.backward_capture = self.taps.after_backward()
            if stepping is not None:
                buf.closure = True
                share = self.taps.share(stepping)
                if share is not None:
                    buf.captures[name] = share
                    self._check(buf)
        finally:
            buf.overhead_ns += time.perf_counter_ns() - start

    def on_optimizer(self, buf: StepBuffer, optimizer: torch.optim.Optimizer, name: str) -> None:
        """Optimizer pre-hook: take this optimizer's reading (unless a closure will make it)."""
        start = time.perf_counter_ns()
        try:
            capture = buf.captures.get(name)  # read after GradScaler.unscale_
            if capture is None:
                capture = self.taps.share(optimizer)
                if capture is not None:
                    buf.captures[name] = capture
            if capture is not None:
                if capture.changed():
                    buf.clipped_by_script = True
                if buf.sampled and buf.buffer_norms is None:
                    buf.buffer_norms = capture_buffer_norms(self.rec.table)
                self._check(buf)
        except (GradientExplosionError, NonFiniteGradientError):
            raise
        except Exception as exc:
            self.rec.hook_error(exc)
        finally:
            buf.overhead_ns += time.perf_counter_ns() - start

    def on_unscale(self, optimizer: torch.optim.Optimizer) -> None:
        """After ``GradScaler.unscale_(optimizer)``: the unscaled reading of its parameters."""
        tracker = self._tracker()
        if self.rec.skip() or not tracker.is_ours(optimizer):
            return
        buf = self.rec.buf
        start = time.perf_counter_ns()
        try:
            capture = self.taps.after_unscale(optimizer)
            if capture is not None:
                buf.captures[tracker.name_of(optimizer)] = capture
        except Exception as exc:
            self.rec.hook_error(exc)
        finally:
            buf.overhead_ns += time.perf_counter_ns() - start

    def finish(self, buf: StepBuffer, optimizer_seen: bool) -> None:
        """Step closed: without torch.optim, the step's norms are its last backward's."""
        if not optimizer_seen and not buf.captures and buf.backward_capture is not None and not buf.partial:
            buf.captures[""] = buf.backward_capture
        buf.backward_capture = None

    def _check(self, buf: StepBuffer) -> None:
        """Replay a non-finite forward and run the guard, on host values (CPU: floats already;
        a guard reads CUDA values, its documented wait)."""
        try:
            captures: list[NormCapture] = list(buf.captures.values())
            merged = merge_captures(captures, host_only=self.guard is None)
            if merged is None:
                return
            buf.grad_present, values = merged
            if buf.forward_inputs and needs_replay(values, self.taps.capture.params(), buf.grad_present):
                with self._tracker().silenced(), contextlib.suppress(Exception):  # a bonus: never fails the step
                    self.replay.run(buf)
            if self.guard is not None:
                self.guard.check(buf, values)
        finally:
            buf.forward_inputs = []
