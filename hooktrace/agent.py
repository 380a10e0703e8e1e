"""The Agent: attaches hooks to a model, runs the worker, owns the exporters.

Life cycle: ``Agent(config)`` -> ``model.apply(agent.instrument)`` (or ``attach``) -> training ->
``close()`` (flush, summary, detach). Hooks and the step tracker live in ``_record``; everything
slow lives in ``_aggregate`` and ``export`` on the worker thread.
"""

from __future__ import annotations

import dataclasses
import sys
import threading
import time
import weakref
from typing import Any

import torch
from torch import nn

from hooktrace._aggregate.memory_stats import StaticMemory
from hooktrace._aggregate.process import StepProcessor
from hooktrace._aggregate.snapshot import RankInfo
from hooktrace._aggregate.stats import RankStats
from hooktrace._aggregate.step_record import StepRecord
from hooktrace._aggregate.worker import Worker
from hooktrace._record.amp import UnscaleHandle, on_unscale
from hooktrace._record.buffer import M_AR_END, StepBuffer
from hooktrace._record.clock import clock_for
from hooktrace._record.comm import AllReduceTimer, is_ddp
from hooktrace._record.discovery import Discovery
from hooktrace._record.module_table import clean_name
from hooktrace._record.recorder import Recorder
from hooktrace._record.tracker import StepTracker
from hooktrace._version import __version__
from hooktrace.config import Config
from hooktrace.distributed import placement
from hooktrace.errors import AttachError, ConfigError
from hooktrace.export.base import Exporter
from hooktrace.export.ids import step_trace_id
from hooktrace.health.guard import SyncGuard
from hooktrace.health.monitor import GradHealth
from hooktrace.health.norms import GradNormCapture, HostCopy
from hooktrace.health.replay import ForwardReplay, can_replay
from hooktrace.health.reporting import SpikeReporter
from hooktrace.health.step_health import StepGradients
from hooktrace.health.taps import GradientTaps
from hooktrace.slowest_rank import SlowestRank
from hooktrace.summary import RunSummary
from hooktrace.summary_builder import build_summary, model_structure, write_summary

_LIVE: weakref.WeakKeyDictionary[nn.Module, Agent] = weakref.WeakKeyDictionary()
"""Root module -> the live agent watching it, so attaching twice returns the same agent."""


HUNT_STEPS = 10
"""After a non-finite gradient on an unsampled step, this many steps are sampled deeply."""


def existing_agent(model: nn.Module) -> Agent | None:
    agent = _LIVE.get(model)
    return agent if agent is not None and not agent._detached else None


def _unwrapped(model: nn.Module) -> nn.Module:
    """The model a user names things in: DDP's inner module (names never carry ``module.``)."""
    inner = model.module if is_ddp(model) else model
    assert isinstance(inner, nn.Module)
    return inner


def _names_something(model: nn.Module, name: str) -> bool:
    """Whether ``name`` is a submodule or parameter of ``model`` (get_submodule/get_parameter)."""
    model = _unwrapped(model)
    for lookup in (model.get_submodule, model.get_parameter):
        try:
            lookup(name)
            return True
        except AttributeError:
            continue
    return False


def _is_compiled(module: nn.Module) -> bool:
    return hasattr(module, "_orig_mod") and type(module).__name__ == "OptimizedModule"


def check_attachable(model: object) -> None:
    """Raise :class:`AttachError` with a fix-it message for anything hooks cannot work on."""
    if not isinstance(model, nn.Module):
        raise AttachError(f"hooktrace.attach() needs a torch.nn.Module, got {type(model).__name__}; pass your model")
    if isinstance(model, torch.jit.ScriptModule):
        raise AttachError(
            "hooktrace cannot hook a TorchScript module (scripted or traced); attach the eager model "
            "before torch.jit.script/trace"
        )
    if not any(True for _ in model.parameters()):
        raise AttachError(
            f"{type(model).__name__} has no parameters, so there is nothing to train or watch; "
            "attach the model that the optimizer updates"
        )


class Agent:
    """Profiles and watches the gradients of the modules it instruments. See DESIGN §2."""

    def __init__(self, config: Config | None = None, **overrides: Any) -> None:
        self.config = config if config is not None and not overrides else Config.resolve(overrides)
        if config is not None and overrides:
            self.config = Config.resolve({**dataclasses.asdict(config), **overrides})
        cfg = self.config
        self.placement = placement()
        self.out_dir = cfg.out_dir()
        self._lock = threading.Lock()
        self._closed = False
        self._detached = False
        self._candidates: list[nn.Module] = []
        self._candidate_hook: Any = None
        self._warned: set[str] = set()
        self.notes: list[str] = []
        self._wall_offset_ns = time.time_ns() - time.perf_counter_ns()
        self.recorder = Recorder(
            depth=cfg.depth,
            max_modules=cfg.max_modules,
            backward=cfg.backward,
            on_fatal=self._fatal,
            memory=cfg.memory == "on",
        )
        self.static_memory = StaticMemory(self.recorder.table) if self.recorder.memory is not None else None
        self.capture = GradNormCapture(self.recorder.table)
        self.taps = GradientTaps(self.capture)
        watch_params = {clean_name(w) for w in cfg.watch}  # as the module table names them (no "module.")
        self.health = GradHealth(self.recorder.table, cfg.explode_factor, watch_params)
        self.replay = ForwardReplay(self.recorder.table, self.recorder.modules)
        self.guard = (
            SyncGuard(cfg, self.capture, self.health)
            if cfg.on_explosion != "warn" or cfg.on_nonfinite == "raise"
            else None
        )
        self.gradients = StepGradients(self.recorder, self.taps, self.guard, self.replay, lambda: self.tracker)
        self.tracker = StepTracker(
            self.recorder,
            sample_every=cfg.sample_every,
            flow_every=cfg.flow_every,
            memory_every=cfg.memory_every,
            on_step=self._on_step,
            on_optimizer=self.gradients.on_optimizer if self.static_memory is None else self._on_optimizer,
            on_backward_end=self.gradients.on_backward_end if self.static_memory is None else self._on_backward_end,
            on_sampling=self._on_sampling,
        )
        self._unscale_handle: UnscaleHandle | None = None
        self.discovery: Discovery | None = None
        self.info = RankInfo(
            run_id=cfg.run_id or "run",
            rank=self.placement.rank,
            local_rank=self.placement.local_rank,
            world_size=self.placement.world_size,
            node=self.placement.node,
            version=__version__,
            torch_version=torch.__version__,
            device="cpu",
        )
        self.stats = RankStats(self.info)
        self.stats.memory.static = self.static_memory
        self.reporter = SpikeReporter(warn_spikes=cfg.on_explosion == "warn")
        self.exporters: list[Exporter] = self._make_exporters()
        self.worker = Worker(
            StepProcessor(
                table=self.recorder.table,
                capture=self.capture,
                health=self.health,
                rank=self.info.rank,
                wall_offset_ns=self._wall_offset_ns,
                trace_id=self.trace_id,
                saved=self.recorder.memory,
            ),
            self.stats,
            self.exporters,
            queue_size=cfg.queue_size,
            on_record=self._on_record,
            on_checkpoint=self._checkpoint,
        )
        self._started = False
        self._slowest = SlowestRank(
            self.info.run_id, self.placement.restart_count, self.info.rank, self.info.world_size
        )
        self._allreduce_timer: AllReduceTimer | None = None
        self.model_structure: list[dict[str, Any]] = []
        """Written into the summary for ``hooktrace report --tree``; rebuilt when a root is adopted."""

    # -- public API ---------------------------------------------------------------------------------
    def instrument(self, module: nn.Module) -> None:
        """``model.apply(agent.instrument)``: remember ``module``; roots are resolved at first use."""
        if self._detached:
            raise AttachError("this agent was detached; create a new one with hooktrace.attach(model)")
        if self.recorder.table.index_of(module) is not None:
            return
        self._candidates.append(module)
        if self._candidate_hook is None:
            from torch.nn.modules.module import register_module_forward_pre_hook

            self._candidate_hook = register_module_forward_pre_hook(self._resolve_on_call)

    def attach(self, model: nn.Module) -> Agent:
        """Instrument ``model`` and all its submodules now."""
        check_attachable(model)
        missing = [name for name in self.config.watch if not _names_something(model, name)]
        if missing and not any(_names_something(m, missing[0]) for m in self._roots()):
            raise ConfigError(
                f"--watch / HOOKTRACE_WATCH {missing[0]!r} names no module or parameter of "
                f"{type(model).__name__}; use a name from model.named_modules() or named_parameters()"
            )
        model.apply(self.instrument)
        self._resolve_candidates()
        return self

    def _roots(self) -> list[nn.Module]:
        return [self.recorder.modules[i] for i in self.recorder.table.roots]

    def discover(self) -> None:
        """Zero-code mode: attach to every root module on its first forward call."""
        self._start()
        if self.discovery is None:
            rec = self.recorder
            self.discovery = Discovery(
                adopt=self._adopt_discovered,
                busy=self.tracker.busy,
                known=lambda m: rec.table.index_of(m) is not None,
                on_error=rec.hook_error,
            )
        self.discovery.enable()

    def step(self) -> None:
        """Mark a step boundary explicitly (optional: optimizer steps are found automatically)."""
        with self._lock:
            self.tracker.close_step()

    def detach(self) -> None:
        """Remove every hook; the model is exactly as before. Recorded data stays for ``close``."""
        if self._candidate_hook is not None:
            self._candidate_hook.remove()
            self._candidate_hook = None
        if self.discovery is not None:
            self.discovery.close()  # its global hooks, the registration watch included
        self.tracker.stop()
        if self._unscale_handle is not None:
            self._unscale_handle.remove()
            self._unscale_handle = None
        self.recorder.buf.forward_inputs = []  # no reference to the user's batches outlives attach
        if self._allreduce_timer is not None:
            self._allreduce_timer.enabled = False
        self._candidates.clear()
        for index in self.recorder.table.roots:
            module = self.recorder.modules[index] if index < len(self.recorder.modules) else None
            if module is not None and _LIVE.get(module) is self:
                del _LIVE[module]
        self._detached = True

    def close(self, timeout: float = 10.0) -> RunSummary:
        """Close the last step, flush every exporter, write ``summary.json``, detach."""
        with self._lock:
            if self._closed:
                return self.summary()
            self._closed = True
        self.tracker.check_reset_without_step()
        self.tracker.close_step(final=True)
        self.detach()
        self._start()
        self.worker.close(timeout)
        result = self.summary()
        if self.config.write_files:
            write_summary(self.out_dir, result)
        if self.config.print_summary:
            print(result.render(), file=sys.stderr)
        return result

    def flush_now(self, timeout: float = 3.0) -> bool:
        """Write everything recorded so far (files, summary) from any thread; for signal paths."""
        return self.worker.flush_now(timeout)

    def _checkpoint(self) -> None:
        """Worker thread, every 10 s: rewrite this rank's summary with what is aggregated so far (and
        the merged summary.json in a single-process run; ranks merge once, at close), then learn the
        job's slowest rank, whether or not the rank writes files."""
        row: dict[str, Any] | None = None
        if self.config.write_files:
            summary = build_summary(self)
            write_summary(self.out_dir, summary, merge=self.info.world_size == 1)
            row = summary.ranks[0]
        if self.info.world_size > 1:  # for --trace-ranks / --module-metrics-ranks auto beyond 8 ranks
            out_dir = self.out_dir if self.config.write_files else None  # else it may hold another run's files
            slowest = self._slowest.learn(row or self.stats.rank_summary(), out_dir)
            for exporter in self.exporters:
                if hasattr(exporter, "slowest_rank"):
                    exporter.slowest_rank = slowest

    def summary(self) -> RunSummary:
        """The run summary so far (this rank). Built on the worker thread, which owns the data."""
        return self.worker.call(lambda: build_summary(self))

    def trace_id(self, step: int) -> str:
        """Same on every rank without communication: hash(run id, restart count, step)."""
        return step_trace_id(self.info.run_id, self.placement.restart_count, step)

    def __enter__(self) -> Agent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ------------------------------------------------------------------------------------
    def _make_exporters(self) -> list[Exporter]:
        from hooktrace.export.factory import make_exporters

        return make_exporters(self)

    def _start(self) -> None:
        if self._started:
            return
        self._started = True
        for exporter in self.exporters:
            exporter.start()
        self.tracker.start()
        self._unscale_handle = on_unscale(self.gradients.on_unscale)
        self.worker.start()

    def _resolve_on_call(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if torch.compiler.is_compiling():
            return None
        try:
            roots = self._resolve_candidates()
            for root in roots:
                if root is module:
                    self.tracker.root_pre_now(self.recorder.table.by_id[id(root)], root, args)
        except Exception as exc:
            self.recorder.hook_error(exc)
        return None

    def _resolve_candidates(self) -> list[nn.Module]:
        if self._candidate_hook is not None:
            self._candidate_hook.remove()
            self._candidate_hook = None
        candidates, self._candidates = self._candidates, []
        inner: set[int] = set()
        for module in candidates:
            inner.update(id(m) for m in module.modules() if m is not module)
        roots = [m for m in candidates if id(m) not in inner and self.recorder.table.index_of(m) is None]
        for root in roots:
            self._adopt_root(root)
        return roots

    def _adopt_discovered(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        index = self._adopt_root(module)
        if index is not None:
            self.tracker.root_pre_now(index, module, args)

    def _adopt_root(self, root: nn.Module) -> int | None:
        check_attachable(root)
        self._start()
        compiled = _is_compiled(root)
        if compiled:
            self._warn_once(
                "compiled",
                f"hooktrace: {type(root._orig_mod).__name__} is torch.compile'd; timing the compiled call as "
                "one module (attach before torch.compile for per-module detail)",
            )
        if not self.recorder.table.roots:
            clock = clock_for(root)
            self.recorder.set_device_clock(clock)
            device = next(root.parameters()).device.type
            self.info = dataclasses.replace(self.info, device=device)
            self.stats.info = self.info
        roots = self.recorder.table.roots
        if len(roots) == 1 and self.tracker.closed_steps == 0 and self.recorder.root_label(roots[0]) == "":
            # a second model in the first step: the first one's names get its prefix too
            self.recorder.relabel_root(roots[0], type(_unwrapped(self.recorder.modules[roots[0]])).__name__)
            self.capture.invalidate()
        label = "" if not roots else self._root_label(root)
        self.recorder.index_root(root, label, descend=not compiled)
        index = self.recorder.table.index_of(root)
        assert index is not None
        self.model_structure = model_structure(self.recorder.table, self.recorder.modules, self.recorder.root_label)
        # a forward NaN can be replayed where the verdict is on the host at the optimizer step
        host_verdict = self.recorder.clock.kind == "cpu" or self.guard is not None
        if host_verdict and can_replay(root, self.info.world_size):
            self.recorder.replay_roots.add(index)
        self.recorder.replay_all = all(i in self.recorder.replay_roots for i in self.recorder.table.roots)
        self.tracker.add_root(index, root)
        if is_ddp(root):
            self.tracker.before_forward.append(lambda: self._time_allreduce(root))
        if is_ddp(root) or self.info.world_size > 1:
            self.tracker.late_gradients = True
        _LIVE[root] = self
        for name in self.config.watch:
            self._pin(root, name)
        return index

    def _time_allreduce(self, ddp: nn.Module) -> None:
        """At the first forward (after the user had the chance to register a comm hook of theirs)."""
        if self._allreduce_timer is None:
            rec = self.recorder
            if rec.clock.kind == "cuda":
                rec.anchor_every_step = True  # completion events are read against the step's anchor
                self._allreduce_timer = AllReduceTimer(lambda: rec.buf.comm_stamps.append(rec.clock.stamp()))
            else:
                self._allreduce_timer = AllReduceTimer(lambda: rec.buf.marks.append((M_AR_END, time.perf_counter_ns())))
        reason = self._allreduce_timer.install(ddp)
        if reason:
            self._warn_once("comm_hook", f"hooktrace: {reason}")

    def _root_label(self, root: nn.Module) -> str:
        base = type(_unwrapped(root)).__name__
        existing = {self.recorder.table.infos[i].display for i in self.recorder.table.roots}
        label, n = base, 1
        while label in existing:
            n += 1
            label = f"{base}{n}"
        return label

    def _pin(self, root: nn.Module, name: str) -> None:
        try:
            target = _unwrapped(root).get_submodule(name)
        except AttributeError:
            try:
                _unwrapped(root).get_parameter(name)
                return  # a parameter: its norm is reported every step by the health monitor
            except AttributeError:
                self._warn_once(
                    f"watch:{name}",
                    f"hooktrace: --watch {name!r} names no module or parameter of "
                    f"{type(root).__name__}; use a name from model.named_modules()",
                )
                return
        index = self.recorder.table.index_of(target)
        if index is not None:
            self.recorder.pin(index)

    def _on_sampling(self, sampled: bool) -> None:
        if self.discovery is not None:
            if sampled or self.tracker.closed_steps == 0:
                self.discovery.enable()
            else:
                self.discovery.disable()

    def _on_optimizer(self, buf: StepBuffer, optimizer: torch.optim.Optimizer, name: str) -> None:
        """``--memory on``: remember the optimizer (its state's bytes are read on the worker)."""
        if self.static_memory is not None:
            self.static_memory.saw(optimizer)
        self.gradients.on_optimizer(buf, optimizer, name)

    def _on_backward_end(self, buf: StepBuffer, optimizer: torch.optim.Optimizer | None, name: str) -> None:
        """``--memory on`` on CUDA: the allocator's peaks up to the end of backward."""
        memory = self.recorder.memory
        if memory is not None and memory.cuda is not None:
            try:
                memory.cuda.phase_end(buf.cuda_memory, "backward")
            except Exception as exc:
                self.recorder.hook_error(exc)
        self.gradients.on_backward_end(buf, optimizer, name)

    def _on_step(self, buf: StepBuffer) -> None:
        memory = self.recorder.memory
        if memory is not None and memory.cuda is not None:
            try:
                memory.cuda.phase_end(buf.cuda_memory, "optimizer")  # after backward: the update
            except Exception as exc:
                self.recorder.hook_error(exc)
        self.gradients.finish(buf, self.tracker.optimizer_seen)
        if buf.clock is not None and buf.clock.kind == "cuda":
            # the gradient-flow and output norms start their way to the host here, on the stream
            # that made them: the worker must not launch GPU work of its own
            for name in ("output_norms", "input_grad_norms", "output_grad_norms"):
                pairs = getattr(buf, name)
                if pairs:
                    setattr(buf, name, HostCopy(pairs))
        self.worker.submit(buf)

    def _on_record(self, record: StepRecord) -> None:
        self.stats.hook_errors = self.recorder.hook_errors
        self.stats.module_labels = len(self.recorder.table.labels)
        self.stats.modules_truncated = self.recorder.table.truncated
        if self.recorder.memory is not None and self.recorder.memory.cuda is not None:
            self.stats.memory.device_total = self.recorder.memory.cuda.total
        for event in record.events:
            if event.kind == "nonfinite" and event.phase == "unknown":
                self.recorder.hunt = HUNT_STEPS  # sample the next steps deeply to find the source
        for line in self.reporter.lines(record):
            print(f"hooktrace: {line}", file=sys.stderr)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            self.notes.append(message.removeprefix("hooktrace: "))
            print(message, file=sys.stderr)

    def _fatal(self) -> None:
        self.detach()
        self.notes.append("detached after repeated hook errors")
