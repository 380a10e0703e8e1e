"""StepBuffer -> StepRecord, on the worker thread."""

from __future__ import annotations

import math
from collections.abc import Callable

from hooktrace._aggregate.memory import StepMemory, annotate_spans, step_memory
from hooktrace._aggregate.step_record import ModuleSpan, StepEvent, StepRecord
from hooktrace._aggregate.timeline import module_intervals, phase_durations, phase_intervals
from hooktrace._record.buffer import M_AR_END, M_BWD, M_BWD_END, StepBuffer
from hooktrace._record.memory import SavedTensors
from hooktrace._record.module_table import ModuleTable
from hooktrace.health.monitor import GradHealth, Verdict, nonfinite_source, resolve_pairs, total_series
from hooktrace.health.norms import GradNormCapture, merge_captures, resolve_norms


class StepProcessor:
    """Resolves a step's stamps and norms and builds its record. Worker thread only."""

    def __init__(
        self,
        *,
        table: ModuleTable,
        capture: GradNormCapture,
        health: GradHealth,
        rank: int,
        wall_offset_ns: int,
        trace_id: Callable[[int], str] | None = None,
        saved: SavedTensors | None = None,
    ) -> None:
        self.table = table
        self.capture = capture
        self.health = health
        self.rank = rank
        self.wall_offset_ns = wall_offset_ns
        self.trace_id = trace_id
        self.saved = saved
        """The recorder's saved-tensor counting (``--memory on``), else None."""

    def process(self, buf: StepBuffer) -> StepRecord:
        if buf.comm_stamps and buf.clock is not None and buf.anchor is not None:
            # device-side all-reduce completions -> host-clock marks
            done = buf.clock.resolve(buf.comm_stamps, buf.anchor)
            buf.clock.release(buf.comm_stamps)
            buf.marks.extend((M_AR_END, t) for t in done)
        start = buf.start_ns or (buf.marks[0][1] if buf.marks else buf.end_ns)
        end = max(buf.end_ns, start)
        memory = step_memory(buf, self.table.infos) if self.saved is not None and buf.memory else None
        spans = self._spans(buf, memory) if buf.events else []
        if buf.number == 1 and spans:
            spans = [span for span in spans if span.start_ns >= start]  # eval calls before training began
        marks = buf.marks
        if spans and (buf.clock is None or buf.clock.kind == "cpu"):
            marks = _align_backward_marks(marks, spans)
        intervals = phase_intervals(start, end, marks)
        record = StepRecord(
            step=buf.number,
            rank=self.rank,
            sampled=buf.sampled,
            start_ns=start,
            end_ns=end,
            wall_start_ns=start + self.wall_offset_ns,
            phases=phase_durations(intervals),
            phase_spans=intervals,
            micro_batches=buf.micro_batches,
            optimizer_steps=buf.optimizer_steps,
            skipped=buf.skipped,
            partial=buf.partial,
            compiled=buf.compiled,
            closure=buf.closure,
            overhead_s=buf.overhead_ns / 1e9,
            spans=spans,
            cuda_memory=buf.cuda_memory,
        )
        if memory is not None:
            # the saved-tensor hooks run outside every timed hook body: counted per save here
            saves = sum(len(call[5]) for call in buf.saved_calls)
            if saves and self.saved is not None:
                record.overhead_s += saves * self.saved.save_ns() / 1e9
            record.activation_bytes = memory.total
            record.module_bytes = memory.modules
            record.label_bytes = memory.labels
            record.unmeasured_saves = memory.unmeasured
        self._gradients(buf, record)
        if buf.skipped:
            record.events.append(StepEvent("amp_skip", "__total__", "optimizer"))
        if not buf.events and buf.anchor is not None and buf.clock is not None and buf.clock.kind == "cuda":
            buf.clock.release([buf.anchor[0]])  # back to the event pool (with events, _spans did it)
        if buf.hook_errors:
            record.events.append(StepEvent("hook_error", "__total__", "unknown", float(buf.hook_errors)))
        if (buf.sampled or record.events) and self.trace_id is not None:  # event steps get traces too
            record.trace_id = self.trace_id(buf.number)
        return record

    def _spans(self, buf: StepBuffer, memory: StepMemory | None = None) -> list[ModuleSpan]:
        clock = buf.clock
        stamps = [event[3] for event in buf.events]
        if clock is None or buf.anchor is None:
            resolved = stamps
        else:
            resolved = clock.resolve(stamps, buf.anchor)
            clock.release([*stamps, buf.anchor[0]] if clock.kind == "cuda" else stamps)
        events = [(k, i, c, t) for (k, i, c, _), t in zip(buf.events, resolved, strict=True)]
        backward_ends = sorted(t for m, t in buf.marks if m == M_BWD_END)
        infos = self.table.infos
        parents = [info.parent for info in infos]
        spans: list[ModuleSpan] = []
        for iv in module_intervals(events, backward_ends, parents):
            info = infos[iv.index]
            spans.append(
                ModuleSpan(
                    index=iv.index,
                    module=info.display,
                    label=info.label,
                    module_type=info.type_name,
                    phase=iv.phase,
                    start_ns=iv.start,
                    end_ns=iv.end,
                    self_ns=iv.self_ns,
                    depth=iv.depth,
                    parent=info.parent,
                )
            )
        if memory is not None and self.saved is not None:
            annotate_spans(spans, events, memory, self.saved.skip_modules)
        return spans

    def _gradients(self, buf: StepBuffer, record: StepRecord) -> None:
        if buf.buffer_norms is not None and buf.buffer_norms[0] is not None:
            values = resolve_norms(*buf.buffer_norms[0])
            record.buffer_norms = {
                name: v for name, v in zip(buf.buffer_norms[1], values, strict=True) if math.isfinite(v)
            }
        params = self.capture.params()
        record.optimizer = ",".join(buf.optimizers) or None
        record.clipped_by_script = buf.clipped_by_script
        if buf.skipped or buf.partial or not buf.captures:
            return  # no update happened (or none can be told): no gradient verdict
        verdict: Verdict | None = buf.health
        if verdict is None:
            merged = merge_captures(list(buf.captures.values()))
            if merged is None or not merged[0]:
                return
            buf.grad_present, values = merged
            verdict = self.health.evaluate(
                params,
                buf.grad_present,
                values,
                detail=buf.sampled,
                per_param=False,
                total_series=total_series(buf.optimizers),
            )
        record.grads_captured = True
        record.grad_norm = verdict.total
        record.grad_norm_ratio = verdict.ratio
        record.module_grad_norms = verdict.module_norms
        record.param_grad_norms = verdict.param_norms
        infos = self.table.infos
        flow: dict[str, float] = {}
        for index, value in resolve_pairs(buf.output_grad_norms):
            if math.isfinite(value):
                label = infos[index].label
                flow[label] = max(flow.get(label, 0.0), value)
        record.output_grad_norms = flow
        for label, (norm, ratio) in verdict.spike_modules.items():
            record.events.append(StepEvent("grad_spike", label, "backward", norm, {"ratio": round(ratio, 3)}))
        for pos, (before, after) in verdict.clipped.items():
            ref = params[pos]
            record.events.append(
                StepEvent(
                    "grad_clip", infos[ref.module].label, "optimizer", before, {"param": ref.name, "clipped_to": after}
                )
            )
        if verdict.nonfinite:
            module, label, phase = nonfinite_source(buf, verdict, params, self.table)
            record.events.append(StepEvent("nonfinite", label, phase, None, {"first_module": module}))


def _align_backward_marks(marks: list[tuple[int, int]], spans: list[ModuleSpan]) -> list[tuple[int, int]]:
    """Start each backward phase at its first module stamp when a module hook fired just before
    the tracker's own hook on the same tensor (same clock on CPU), so phases contain modules."""
    starts = sorted(span.start_ns for span in spans if span.phase == "backward")
    if not starts:
        return marks
    out: list[tuple[int, int]] = []
    previous = 0
    for mark, t in sorted(marks, key=lambda m: m[1]):
        if mark == M_BWD:
            earlier = [s for s in starts if previous < s < t]
            if earlier:
                t = earlier[0]
        out.append((mark, t))
        previous = t
    return out
