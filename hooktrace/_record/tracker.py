"""Step boundaries: root-module hooks, global optimizer hooks and the end-of-backward callback.

A step is one optimizer step. Marks (perf_counter_ns) are recorded every step:
root forward start, backward start/end, optimizer start/end, eval forwards. A step is closed
lazily at the next training forward after an optimizer step, or after a backward whose
gradients were reset without an optimizer step (a GradScaler skip), or by ``agent.step()``.
"""

from __future__ import annotations

import contextlib
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.utils.hooks import RemovableHandle

from hooktrace._record.buffer import (
    M_BWD,
    M_BWD_END,
    M_EVAL,
    M_EVAL_END,
    M_FWD,
    M_OPT,
    M_OPT_END,
    StepBuffer,
)
from hooktrace._record.cadence import Cadence
from hooktrace._record.hooks import iter_tensors
from hooktrace._record.optimizers import OptimizerBook
from hooktrace._record.recorder import Recorder, always
from hooktrace._record.torch_state import autocast_dtype, compiled_graphs, has_closure
from hooktrace.errors import GradientExplosionError, NonFiniteGradientError

MAX_REPLAY_CALLS = 16
"""Root calls (micro-batches) of one step kept for a forward replay (health/replay.py)."""

MAX_MICRO_BATCHES = 10_000
"""A step that never sees an optimizer step nor a gradient reset is closed after this many
forwards, so buffers stay bounded whatever the loop does."""

_now = time.perf_counter_ns
_grad_enabled = torch.is_grad_enabled
_graph_task_id = torch._C._current_graph_task_id
_queue_callback = torch.autograd.Variable._execution_engine.queue_callback


class StepTracker:
    """Finds step boundaries and hands each finished :class:`StepBuffer` to ``on_step``."""

    def __init__(
        self,
        recorder: Recorder,
        *,
        sample_every: int,
        flow_every: int = 0,
        memory_every: int = 100,
        on_step: Callable[[StepBuffer], None],
        on_optimizer: Callable[[StepBuffer, torch.optim.Optimizer, str], None],
        on_backward_end: Callable[[StepBuffer, torch.optim.Optimizer | None, str], None] | None = None,
        on_sampling: Callable[[bool], None] | None = None,
    ) -> None:
        self.rec = recorder
        self.sample_every = sample_every
        self.cadence = Cadence(flow_every, memory_every)
        recorder.buf.flow = self.cadence.flow(1, recorder.buf.sampled, recorder.hunt > 0)
        recorder.buf.memory = self.cadence.memory(1, recorder.buf.sampled)
        self._on_step = on_step
        self._on_optimizer = on_optimizer
        self._on_backward_end_cb = on_backward_end or (lambda buf, optimizer, name: None)
        self._on_sampling = on_sampling or (lambda sampled: None)
        self._root_pre: dict[int, Callable[..., None]] = {}
        self.before_forward: list[Callable[[], None]] = []
        """One-shot set-up to run at the next training forward (e.g. the DDP comm hook)."""
        self._handles: list[RemovableHandle] = []
        self._root_handles: dict[int, list[RemovableHandle]] = {}
        self._depth = 0
        self._eval_depth = 0
        self._in_backward = False
        self._pending_close = False
        self._backward_since_optimizer = False
        self._grad_probe: nn.Parameter | None = None
        self._probe_grad: tuple[Any, int] | None = None
        """(weakref to the probe's gradient, its version) at the end of the last backward: a
        loop without torch.optim that zeroes gradients in place is seen by the version."""
        self._stepping: torch.optim.Optimizer | None = None
        """The optimizer whose step() is running (a closure's backward belongs to it)."""
        self._compiled_graphs = 0
        self.late_gradients = False
        """A distributed wrapper (DDP) writes the final gradients in its own end-of-backward
        callback: read them in a callback queued after it."""
        self.optimizer_seen = False
        self.closed_steps = 0
        self._active = False
        self._errors_seen = 0
        self.optimizers = OptimizerBook(recorder.table, self._orphan_gradients)
        self.name_of = self.optimizers.name_of

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self) -> None:
        if not self._handles:
            self._handles = [
                register_optimizer_step_pre_hook(self._optimizer_pre),
                register_optimizer_step_post_hook(self._optimizer_post),
            ]

    def add_root(self, index: int, root: nn.Module) -> None:
        """Persistent hooks on a root: they run every step (module hooks only on sampled ones)."""
        if index in self._root_handles:
            return
        self._root_pre[index] = self._make_root_pre(index)
        self._root_handles[index] = [
            root.register_forward_pre_hook(self._root_pre[index], prepend=True, with_kwargs=True),
            root.register_forward_hook(self._make_root_post(index), with_kwargs=True, always_call=True),
        ]
        if self.rec.buf.sampled and self._active:
            self.rec.activate(exclude=set(self._root_handles))

    def stop(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for handles in self._root_handles.values():
            for handle in handles:
                handle.remove()
        self._root_handles.clear()
        self.rec.remove_all()

    @contextlib.contextmanager
    def silenced(self) -> Iterator[None]:
        """Run the model without recording it (the forward replay of a bad step): every hook
        returns at its first line, and root discovery sees a root forward in progress."""
        rec = self.rec
        skip, rec.skip = rec.skip, always
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            rec.skip = skip

    def roots(self) -> set[int]:
        return set(self._root_handles)

    def busy(self) -> bool:
        """True while a known root's forward runs (a module called now is not a new root)."""
        return self._depth > 0 or self._eval_depth > 0

    def root_pre_now(self, index: int, module: nn.Module, args: tuple[Any, ...]) -> None:
        """Run a root's pre-hook by hand for the call during which the root was found (its
        keyword arguments are not known there)."""
        hook = self._root_pre.get(index)
        if hook is not None:
            hook(module, args, None)

    # -- step boundaries ------------------------------------------------------------------------------
    def close_step(self, now: int | None = None, final: bool = False) -> StepBuffer | None:
        """Finish the current step (if it did anything) and start the next one. ``final``: the
        run ends here; a step that no optimizer step (nor, without torch.optim, a backward)
        closed is marked partial."""
        buf = self.rec.buf
        if not buf.marks and not buf.events:
            return None
        t0 = _now()
        if final and not buf.optimizer_steps and not buf.skipped:
            buf.partial = self.optimizer_seen or not any(m == M_BWD_END for m, _ in buf.marks)
        graphs = compiled_graphs()
        if graphs != self._compiled_graphs:
            buf.compiled = True
            self._compiled_graphs = graphs
        end = now if now is not None else t0
        marks = buf.marks
        if marks and marks[-1][0] == M_OPT_END:  # the usual step: nothing after its update
            end = marks[-1][1]
            carry: list[tuple[int, int]] = []
        else:
            if buf.optimizer_steps:
                end = max(t for m, t in marks if m == M_OPT_END)
            elif any(m == M_BWD_END for m, _ in marks):
                end = max(t for m, t in marks if m == M_BWD_END)
            carry = [mark for mark in marks if mark[1] > end]
            if carry:
                buf.marks = [mark for mark in marks if mark[1] <= end]
        buf.end_ns = end
        buf.forward_inputs = []  # needed only until the optimizer step
        buf.overhead_ns += buf.hook_ns + len(buf.events) * self.rec.dispatch_ns  # bodies + PyTorch calling them
        buf.hook_errors = self.rec.hook_errors - self._errors_seen
        self._errors_seen = self.rec.hook_errors
        if buf.pending_outputs:
            self.rec.check_pending_outputs()  # modules called outside a root's forward
        number = buf.number + 1
        sampled = (number - 1) % self.sample_every == 0 or self.rec.hunt > 0
        if self._active and (not sampled or self.rec.preflight_finished):
            # consecutive sampled steps keep their hooks, unless --backward full may now start
            buf.overhead_ns += self.rec.deactivate()
            self._active = False
            self.rec.preflight_finished = False
        self.rec.check_outputs = False
        flow = self.cadence.flow(number, sampled, self.rec.hunt > 0)
        nxt = StepBuffer(number=number, sampled=sampled, start_ns=end, marks=carry, flow=flow)
        if sampled and self.rec.memory is not None:
            nxt.memory = self.cadence.memory(number, sampled)
        self._pending_close = False
        self._backward_since_optimizer = False
        self.closed_steps += 1
        self.rec.buf = nxt
        self._open(nxt)
        if sampled != buf.sampled:
            self._on_sampling(sampled)
        buf.overhead_ns += _now() - t0
        self._on_step(buf)
        return buf

    def _open(self, buf: StepBuffer) -> None:
        """A step begins: its clock, an anchor that maps its device stamps to host time (sampled
        and pinned steps), and on sampled steps the module hooks."""
        buf.clock = self.rec.clock
        if buf.sampled or self.rec.pinned:
            buf.anchor = self.rec.clock.anchor()
        if buf.sampled:
            self._begin_sampled(buf)

    def _begin_sampled(self, buf: StepBuffer) -> None:
        start = _now()
        # module output sums, unless a bad step can replay its forward instead
        self.rec.check_outputs = not self.rec.replay_all or self.rec.hunt > 0
        if self.rec.hunt > 0:
            self.rec.hunt -= 1
        self.rec.refresh_roots()  # modules added since the last sampled step
        buf.overhead_ns += _now() - start
        buf.overhead_ns += self.rec.activate(exclude=self.roots())  # registers what is missing
        self._active = True

    # -- root hooks -------------------------------------------------------------------------------------
    def _make_root_pre(self, index: int) -> Callable[..., None]:
        forward_pre = self.rec.forward_hooks(index)[0]

        def root_pre(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any] | None) -> None:
            rec = self.rec
            if rec.skip():
                return None
            try:
                now = _now()
                if not _grad_enabled():
                    if self._eval_depth == 0 and self._depth == 0 and rec.buf.start_ns:  # not before step 1
                        rec.buf.marks.append((M_EVAL, now))
                    self._eval_depth += 1
                elif _graph_task_id() == -1:
                    depth = self._depth
                    self._depth += 1
                    if depth == 0:
                        self._start_forward(now)
                        inputs = rec.buf.forward_inputs
                        if index in rec.replay_roots and len(inputs) < MAX_REPLAY_CALLS:
                            # references (see health/replay.py), and the autocast dtype the call ran
                            # under, so a replay reproduces a reduced-precision overflow
                            inputs.append((index, args, kwargs, autocast_dtype(rec.clock.kind)))
            except Exception as exc:
                rec.hook_error(exc)
            if rec.buf.sampled:
                forward_pre(module, args)
            return None

        return root_pre

    def _make_root_post(self, index: int) -> Callable[..., None]:
        forward_post = self.rec.forward_hooks(index)[1]

        def root_post(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            rec = self.rec
            if rec.skip():
                return None
            try:
                if not _grad_enabled():
                    if self._eval_depth > 0:
                        self._eval_depth -= 1
                        if self._eval_depth == 0 and self._depth == 0 and rec.buf.start_ns:
                            rec.buf.marks.append((M_EVAL_END, _now()))
                elif _graph_task_id() == -1 and self._depth > 0:
                    self._depth -= 1
                    if self._depth == 0 and output is not None:
                        for tensor in (output,) if isinstance(output, torch.Tensor) else iter_tensors(output):
                            if tensor.requires_grad:
                                node = tensor.grad_fn  # a node pre-hook: 10x cheaper than a tensor hook
                                if node is not None:
                                    node.register_prehook(self._on_root_grad)
                                else:
                                    tensor.register_hook(self._on_root_grad)
            except Exception as exc:
                rec.hook_error(exc)
            if rec.buf.sampled:
                forward_post(module, args, kwargs, output)  # after: the phase mark precedes module stamps
                if self._depth == 0:
                    rec.check_pending_outputs()
            return None

        return root_post

    def check_reset_without_step(self) -> None:
        """A backward ran and the gradients were reset, but no optimizer stepped: a step ends.

        With an optimizer seen before, that is a skipped step (GradScaler found inf); without
        one, a loop that updates parameters by hand. Gradients kept (accumulation) are no step.
        """
        buf = self.rec.buf
        if self._backward_since_optimizer and not self._pending_close and self._stepping is None:
            probe = self._grad_probe
            reset = probe is not None and (
                probe.grad is None or (not self.optimizer_seen and self._grad_changed(probe.grad))
            )
            if reset or buf.micro_batches >= MAX_MICRO_BATCHES:
                buf.skipped = reset and self.optimizer_seen
                self._pending_close = True

    def _grad_changed(self, grad: torch.Tensor) -> bool:
        """The probe's gradient was replaced or modified in place (``zero_()``) since the end of
        the last backward. Accumulation adds only during the next backward, after this check."""
        seen = self._probe_grad
        return seen is not None and (seen[0]() is not grad or grad._version != seen[1])

    def _start_forward(self, now: int) -> None:
        while self.before_forward:
            setup = self.before_forward.pop()
            try:
                setup()
            except Exception as exc:
                self.rec.hook_error(exc)
        buf = self.rec.buf
        if self._backward_since_optimizer:
            self.check_reset_without_step()
        if self._pending_close:
            self.close_step()
            buf = self.rec.buf
        if buf.start_ns == 0:  # the first step: its buffer was made before any clock was chosen
            buf.start_ns = now
            self._open(buf)
        buf.marks.append((M_FWD, now))
        buf.micro_batches += 1

    # -- backward -----------------------------------------------------------------------------------------
    def _on_root_grad(self, grad: Any) -> None:
        if self.rec.skip():
            return None
        try:
            if not self._in_backward:
                self._in_backward = True
                self.rec.buf.marks.append((M_BWD, _now()))
                if self.rec.preflight is not None and not self.rec.preflight.done:
                    self.rec.full_skipped.update(self.rec.preflight.finish())
                    self.rec.preflight_finished = True
                _queue_callback(self._on_backward_end)
        except Exception as exc:
            self.rec.hook_error(exc)
        return None

    def _on_backward_end(self) -> None:
        try:
            buf = self.rec.buf
            buf.marks.append((M_BWD_END, _now()))
            self._in_backward = False
            self._backward_since_optimizer = True
            if self._grad_probe is None or self._grad_probe.grad is None:
                self._grad_probe = next(
                    (p for info in self.rec.table.infos for _, p in info.params if p.grad is not None), None
                )
            if self.late_gradients:
                # after the callbacks queued during backward (DDP's reducer writes the averaged
                # gradients into .grad in one of them): ours, queued now, runs after them
                _queue_callback(self._on_gradients_final)
                return
            if not self.optimizer_seen:
                self._note_probe()
            stepping = self._stepping
            self._on_backward_end_cb(buf, stepping, self.name_of(stepping) if stepping is not None else "")
        except (GradientExplosionError, NonFiniteGradientError):
            raise  # the user chose "raise": out of loss.backward() inside the optimizer's closure
        except Exception as exc:
            self.rec.hook_error(exc)

    def _on_gradients_final(self) -> None:
        """The last end-of-backward callback: the gradients are those the optimizer will see."""
        try:
            buf = self.rec.buf
            if not self.optimizer_seen:
                self._note_probe()
            stepping = self._stepping
            self._on_backward_end_cb(buf, stepping, self.name_of(stepping) if stepping is not None else "")
        except (GradientExplosionError, NonFiniteGradientError):
            raise  # the user chose "raise": out of loss.backward() inside the optimizer's closure
        except Exception as exc:
            self.rec.hook_error(exc)

    def _note_probe(self) -> None:
        """A loop without torch.optim: its gradient reset is seen by the probe's version."""
        grad = self._grad_probe.grad if self._grad_probe is not None else None
        self._probe_grad = (weakref.ref(grad), grad._version) if grad is not None else None

    # -- optimizer --------------------------------------------------------------------------------------------
    def is_ours(self, optimizer: torch.optim.Optimizer) -> bool:
        try:
            return self.optimizers.is_ours(optimizer)
        except Exception as exc:  # an unhashable optimizer subclass, odd param_groups: count it
            self.rec.hook_error(exc)
            return True

    def _orphan_gradients(self) -> bool:
        """No optimizer of the watched parameters stepped yet, and they hold gradients."""
        probe = self._grad_probe
        return not self.optimizer_seen and probe is not None and probe.grad is not None

    def _optimizer_pre(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self.rec.skip() or not self.is_ours(optimizer):
            return None  # compiled step, CUDA graph capture, or another model's optimizer
        if self._pending_close and has_closure(args, kwargs):
            # forward and backward run inside this step() (Lightning, LBFGS): the step starts here
            self.close_step()
        buf = self.rec.buf
        buf.marks.append((M_OPT, _now()))
        self._stepping = optimizer
        name = self.name_of(optimizer)
        if name not in buf.optimizers:
            buf.optimizers.append(name)
        self._on_optimizer(buf, optimizer, name)  # gradient health; may raise when the user chose "raise"
        return None

    def _optimizer_post(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self.rec.skip() or not self.is_ours(optimizer):
            return None
        try:
            self._stepping = None
            buf = self.rec.buf
            name = self.name_of(optimizer)
            if name not in buf.optimizers:
                # its pre-hook ran before the model was known: the model was found inside this
                # step's closure (Lightning's first step). Take the closure's gradients now, after
                # the update (too late for a guard to act)
                buf.closure = buf.closure or has_closure(args, kwargs)
                buf.optimizers.append(name)
                self._on_optimizer(buf, optimizer, name)
            buf.marks.append((M_OPT_END, _now()))
            buf.optimizer_steps += 1
            if buf.closure and not buf.clipped_by_script:  # a closure's gradients: clipped after it
                capture = buf.captures.get(name)
                buf.clipped_by_script = capture is not None and capture.changed()
            self.optimizer_seen = True
            self._pending_close = True
            self._backward_since_optimizer = False
        except (GradientExplosionError, NonFiniteGradientError):
            raise  # the user chose "raise" (a closure's gradients, read after the model was found)
        except Exception as exc:
            self.rec.hook_error(exc)
        return None
