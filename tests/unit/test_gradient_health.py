"""Gradient health: norms against a float64 reference, spikes, clipping, raising, NaN sources."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import hooktrace
from tests import zoo
from tests.conftest import nonfinite_source, read_steps


def _reference(model: nn.Module) -> tuple[float, dict[str, float]]:
    """Total and per-module (own parameters, tied ones at their first owner) norms in float64."""
    seen: set[int] = set()
    per_module: dict[str, float] = {}
    total = 0.0
    for name, module in model.named_modules():
        sq = 0.0
        for param in module.parameters(recurse=False):
            if id(param) in seen or param.grad is None:
                continue
            seen.add(id(param))
            sq += float(param.grad.double().pow(2).sum())
        if any(True for _ in module.parameters(recurse=False)):
            per_module[name or type(model).__name__] = math.sqrt(sq)
        total += sq
    return math.sqrt(total), per_module


def _train_to_nan(model: nn.Module, at: int, **kwargs: Any) -> None:
    """SGD steps 1..at on ``zoo.nan_batch``; ``kwargs`` go to every call of ``model``."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for step in range(1, at + 1):
        opt.zero_grad()
        model(zoo.nan_batch(step, at), **kwargs).mean().backward()
        opt.step()


@pytest.mark.parametrize("factory", [zoo.TiedNet, zoo.FrozenNet, zoo.TwiceNet])
def test_norms_equal_an_independent_float64_reference(factory: Any, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = factory()
    agent = hooktrace.attach(model, out=str(tmp_path), metrics_port=0, sample_every=1, depth=9)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    refs = []
    for step in range(3):
        opt.zero_grad()
        model(zoo.make_batch(step, model)).pow(2).mean().backward()
        opt.step()  # lr 0: gradients stay as they were at the optimizer step
        per_param = {n: float(p.grad.double().norm()) for n, p in model.named_parameters() if p.grad is not None}
        refs.append((*_reference(model), per_param))
    agent.close()
    for record, (total, per_module, per_param) in zip(read_steps(tmp_path), refs, strict=True):
        assert record["grad_norm"] == pytest.approx(total, rel=1e-5)
        expected = {k: v for k, v in per_module.items() if v > 0}
        assert record["module_grad_norms"] == pytest.approx(expected, rel=1e-5)
        assert record["param_grad_norms"] == pytest.approx(per_param, rel=1e-5)


def test_gradient_flow_is_the_norm_of_each_modules_output_gradient(tmp_path: Path) -> None:
    """On sampled steps, ``output_grad_norms[module]`` = ||dL/d output|| of that module, checked
    against gradients kept with ``retain_grad`` in float64 (a transposed one among them)."""

    class Transposed(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.t()  # its output gradient arrives non-contiguous

    def build() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), Transposed(), nn.Flatten(0), nn.Linear(64, 1))

    batch = torch.randn(4, 8)
    reference, outputs = build(), {}

    def keep(name: str) -> Any:
        def hook(module: nn.Module, args: Any, out: torch.Tensor) -> None:
            out.retain_grad()
            outputs[name] = out

        return hook

    for name, module in reference.named_children():
        module.register_forward_hook(keep(name))
    reference(batch).pow(2).sum().backward()
    expected = {name: float(out.grad.double().norm()) for name, out in outputs.items()}

    model = build()
    agent = hooktrace.attach(model, out=str(tmp_path), metrics_port=0, sample_every=1, flow_every=1)
    model(batch).pow(2).sum().backward()
    torch.optim.SGD(model.parameters(), lr=0.0).step()
    agent.close()
    flow = read_steps(tmp_path)[0]["output_grad_norms"]
    expected["Sequential"] = expected["4"]  # the root's output is its last child's
    assert flow == pytest.approx(expected, rel=1e-5)


def _explode_run(
    tmp_path: Path, *, module_only: bool = False, attach: bool = True, steps: int = 40, **options: Any
) -> tuple[list[float], list[torch.Tensor], Any]:
    """40 steps of noisy but healthy SGD on an MLP; at step 30 the gradient explodes: of the whole
    model (the loss x 1e4), or of ``model[2].weight`` only (a tensor hook x 1e4)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1))
    agent = hooktrace.attach(model, out=str(tmp_path), metrics_port=0, **options) if attach else None
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    losses, snapshots = [], []
    current = {"step": 0}

    def blow_up(grad: torch.Tensor) -> torch.Tensor | None:
        return grad * 1e4 if current["step"] == 30 else None

    if module_only:
        model[2].weight.register_hook(blow_up)
    for step in range(1, steps + 1):
        current["step"] = step
        gen = torch.Generator().manual_seed(step)
        x = torch.randn(8, 16, generator=gen) * (1 + (step % 3))  # noisy scale
        loss = model(x).pow(2).mean()
        if step == 30 and not module_only:
            loss = loss * 1e4
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        snapshots.append(torch.cat([p.detach().flatten().clone() for p in model.parameters()]))
    return losses, snapshots, agent


def test_a_spike_is_detected_on_exactly_its_step_and_nowhere_before(tmp_path: Path, capsys: Any) -> None:
    _, _, agent = _explode_run(tmp_path, steps=30)  # after the spike the weights are wrecked: stop there
    agent.close()
    spikes = [r["step"] for r in read_steps(tmp_path) if any(e["kind"] == "grad_spike" for e in r["events"])]
    assert spikes == [30]
    record = read_steps(tmp_path)[29]
    total = next(e for e in record["events"] if e["module"] == "__total__")
    assert total["ratio"] > 10 and total["value"] == pytest.approx(record["grad_norm"])
    err = capsys.readouterr().err
    assert "gradient spike at step 30 (rank 0): __total__" in err


def test_clip_scales_only_the_offending_tensor_before_the_optimizer_step(tmp_path: Path) -> None:
    bare_losses, bare, _ = _explode_run(tmp_path, module_only=True, attach=False)
    losses, clipped, agent = _explode_run(tmp_path, module_only=True, on_explosion="clip")
    agent.close()
    assert losses[:30] == bare_losses[:30]
    sizes = [32 * 16, 32, 32 * 32, 32, 32, 1]
    offsets = [sum(sizes[:i]) for i in range(len(sizes) + 1)]

    def part(flat: torch.Tensor, i: int) -> torch.Tensor:
        return flat[offsets[i] : offsets[i + 1]]

    # At step 30 only model[2].weight (part 2) differs from the unclipped run.
    for i in range(len(sizes)):
        same = torch.equal(part(bare[29], i), part(clipped[29], i))
        assert same == (i != 2), i
    events = [e for r in read_steps(tmp_path) for e in r["events"] if e["kind"] == "grad_clip"]
    assert [(e["param"], e["module"]) for e in events] == [("2.weight", "2")]
    assert events[0]["clipped_to"] < events[0]["value"] / 100


def test_raise_stops_training_at_the_spike_step_naming_modules(tmp_path: Path) -> None:
    with pytest.raises(hooktrace.GradientExplosionError) as info:
        _explode_run(tmp_path, on_explosion="raise")
    assert info.value.step == 30
    assert "__total__" in info.value.norms
    assert "gradient explosion at step 30" in str(info.value)


@pytest.mark.parametrize(
    ("where", "at", "sample_every", "replay", "named"),
    [
        ("forward", 4, 1, True, {"2"}),  # sampled step, CPU: the step's forward replayed
        ("forward", 4, 10, True, {"2"}),  # unsampled step, CPU: the same
        ("forward", 4, 1, False, {"2"}),  # sampled step, no replay (CUDA in warn mode): output sums
        ("backward", 1, 1, True, {"2"}),  # deep step: input vs output gradient norms
        ("backward", 4, 10, True, {"2", "2.lin"}),  # unsampled step: parameter gradients, innermost owner
    ],
)
def test_the_first_non_finite_module_is_named_in_the_right_phase(
    where: str, at: int, sample_every: int, replay: bool, named: set[str], tmp_path: Path
) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), zoo.NaNAt(at=at, where=where), nn.Tanh(), nn.Linear(8, 1))
    # flow on every sampled step: a deep step places a backward NaN exactly (input vs output gradient)
    agent = hooktrace.attach(model, out=str(tmp_path), metrics_port=0, sample_every=sample_every, flow_every=1)
    if not replay:  # what attach chooses on CUDA in warn mode (attach chose replay on this CPU)
        agent.recorder.replay_roots.clear()
        agent.recorder.replay_all = False
    _train_to_nan(model, at)
    summary = agent.close()
    records = read_steps(tmp_path)
    assert [r["grad_norm"] is None for r in records] == [False] * (at - 1) + [True]
    event = next(e for e in records[-1]["events"] if e["kind"] == "nonfinite")
    assert event["first_module"] in named and event["phase"] == where
    assert summary.ranks[0]["event_counts"]["nonfinite"] == 1


@pytest.mark.parametrize(("where", "named"), [("backward", {"1", "1.lin"}), ("forward", {"1"})])
def test_on_nonfinite_raise_stops_at_that_step(where: str, named: set[str], tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(8, 8), zoo.NaNAt(at=2, where=where), nn.Linear(8, 1))
    agent = hooktrace.attach(model, out=str(tmp_path), metrics_port=0, on_nonfinite="raise")
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(hooktrace.NonFiniteGradientError) as info:
        for step in range(1, 4):
            opt.zero_grad()
            model(zoo.nan_batch(step, 2)).mean().backward()
            if step == 2:
                before = [p.detach().clone() for p in model.parameters()]
            opt.step()
    assert (info.value.step, info.value.phase) == (2, where)
    assert info.value.module in named
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))  # no NaN step taken
    agent.close()


def test_buffer_norms_are_reported_on_sampled_steps(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 1))
    agent = hooktrace.attach(model, out=str(tmp_path), metrics_port=0, sample_every=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(16, 4)).mean().backward()
        opt.step()
    agent.close()
    records = read_steps(tmp_path)
    assert set(records[0]["buffer_norms"]) == {"1.running_mean", "1.running_var"}
    assert records[0]["buffer_norms"]["1.running_var"] == pytest.approx(float(model[1].running_var.norm()), rel=0.2)
    assert "buffer_norms" not in records[1]


class _NormThenNaN(nn.Module):
    """BatchNorm and Dropout, then a module that makes a NaN when the batch (via a skip
    connection) holds a huge value."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.bn, self.drop = nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Dropout(0.5)
        self.bad, self.out = zoo.NaNAt(3, "forward"), nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.bad(self.drop(self.bn(self.lin(x))) + x))


def test_the_forward_replay_leaves_rng_and_buffers_as_without_the_agent(tmp_path: Path) -> None:
    """BatchNorm and Dropout run before the NaN is made, so their state stays finite: a replay
    that did not restore the running statistics or the RNG would show here."""
    seen: dict[str, Any] = {}

    def run(with_agent: bool) -> _NormThenNaN:
        torch.manual_seed(0)
        model = _NormThenNaN()
        agent = hooktrace.attach(model, out=str(tmp_path), metrics_port=0) if with_agent else None
        _train_to_nan(model, 3)
        seen["rng" if with_agent else "bare_rng"] = torch.get_rng_state()
        if agent is not None:
            agent.close()
            assert nonfinite_source(tmp_path) == ("bad", "forward")  # a replay ran
        return model

    bare, watched = run(False), run(True)
    assert torch.equal(seen["bare_rng"], seen["rng"])
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        before, after = getattr(bare.bn, name), getattr(watched.bn, name)
        assert torch.isfinite(before.float()).all() and torch.equal(before, after), name
    for (name, a), b in zip(bare.state_dict().items(), watched.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=name)


def test_a_batch_that_already_holds_a_nan_is_named_as_the_input(tmp_path: Path, capsys: Any) -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))
    agent = hooktrace.attach(model, out=str(tmp_path), metrics_port=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for step in range(1, 4):
        x = torch.randn(4, 8)
        if step == 3:
            x[1, 2] = float("nan")
        opt.zero_grad()
        model(x).mean().backward()
        opt.step()
    agent.close()
    assert nonfinite_source(tmp_path) == ("Sequential", "input")
    assert (
        "non-finite gradient at step 3 (rank 0): the input of Sequential already held a NaN" in capsys.readouterr().err
    )


def test_norms_reach_the_host_in_one_transfer_without_any_item_call(tmp_path: Path, monkeypatch: Any) -> None:
    calls: list[int] = []
    item = torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "item", lambda self: calls.append(1) or item(self))
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))
    agent = hooktrace.attach(model, out=str(tmp_path), metrics_port=0, sample_every=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(4):
        opt.zero_grad()
        model(torch.randn(4, 8)).pow(2).mean().backward()
        opt.step()
    agent.close()
    assert calls == []
    assert all(record["grad_norm"] > 0 for record in read_steps(tmp_path))


def test_spike_detector_matches_a_plain_rolling_median() -> None:
    import random
    import statistics

    from hooktrace.health.spikes import SpikeDetector

    rng = random.Random(7)
    values = [
        rng.uniform(0.5, 1.5) * (10.0 if i in (30, 31, 90) else 1.0) * (4.0 if i > 120 else 1.0) for i in range(200)
    ]
    values[50] = float("nan")  # never enters the history
    detector, history = SpikeDetector(3.0, window=20, warmup=5), []
    for value in values:
        spike, ratio = detector.check("m", value)
        if not math.isfinite(value):
            assert (spike, ratio) == (False, None)
            continue
        median = statistics.median(history[-20:]) if history else None
        assert ratio == (pytest.approx(value / median) if median else None)
        assert spike == (len(history[-20:]) >= 5 and median is not None and value > 3.0 * median)
        history.append(value)
    assert detector.threshold("m") == pytest.approx(3.0 * statistics.median(history[-20:]))


def test_the_replay_runs_under_the_autocast_of_the_step_so_a_half_precision_overflow_is_found(
    tmp_path: Path,
) -> None:
    class Square(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * x  # overflows float16 (max 65504) where float32 does not

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), Square(), nn.Linear(8, 1))
    agent = hooktrace.attach(model, out=str(tmp_path), metrics_port=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    for step in range(1, 4):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = model(torch.randn(4, 8) * (1e4 if step == 3 else 1.0)).float().mean()
        loss.backward()
        opt.step()
    agent.close()
    assert nonfinite_source(tmp_path) == ("1", "forward")


class _Masked(nn.Module):
    """Takes an additive ``-inf`` mask (as attention does) and makes one of its own; the NaN comes
    from ``bad`` (zoo.NaNAt) on the step whose batch holds a huge value."""

    class MaskMaker(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            mask = torch.zeros_like(x)
            mask[:, 0] = float("-inf")
            return mask

    def __init__(self, at: int) -> None:
        super().__init__()
        self.lin, self.masker, self.bad, self.out = (
            nn.Linear(8, 8),
            self.MaskMaker(),
            zoo.NaNAt(at, "forward"),
            nn.Linear(8, 1),
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.lin(x) * torch.softmax(mask + self.masker(x), dim=-1)  # finite: -inf only where masked
        return self.out(self.bad(h))


def test_masks_with_minus_inf_are_neither_the_input_nor_the_source_of_a_nan(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _Masked(at=3)
    agent = hooktrace.attach(model, out=str(tmp_path), metrics_port=0)
    mask = torch.zeros(4, 8)
    mask[:, -1] = float("-inf")
    _train_to_nan(model, 3, mask=mask)
    agent.close()
    assert nonfinite_source(tmp_path) == ("bad", "forward")


def test_a_model_that_cannot_replay_keeps_output_sums_on_sampled_steps(tmp_path: Path) -> None:
    class WithSyncBN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Linear(8, 8), zoo.NaNAt(3, "forward"), nn.Linear(8, 1))
            self.norm = nn.SyncBatchNorm(8)  # its collectives forbid a replay on one rank alone

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.body(x)  # (not called here: SyncBatchNorm needs a process group)

    model = WithSyncBN()
    agent = hooktrace.attach(model, out=str(tmp_path), metrics_port=0, sample_every=1)
    assert not agent.recorder.replay_roots
    _train_to_nan(model, 3)
    agent.close()
    assert nonfinite_source(tmp_path) == ("body.1", "forward")


def test_raise_still_raises_when_the_replay_cannot_run(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(8, 8), zoo.NaNAt(2, "forward"), nn.Linear(8, 1))
    agent = hooktrace.attach(model, out=str(tmp_path), metrics_port=0, on_nonfinite="raise")

    def broken(buf: Any) -> bool:
        raise RuntimeError("replay failed")

    agent.replay.run = broken  # type: ignore[method-assign]
    with pytest.raises(hooktrace.NonFiniteGradientError) as info:
        _train_to_nan(model, 2)
    assert info.value.step == 2
    assert not any(torch.isnan(p).any() for p in model.parameters())  # the NaN step was not taken
    agent.close()


def test_gradient_flow_is_recorded_by_full_backward_hooks_too(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))
    batch = torch.randn(4, 8, requires_grad=True)  # so every module gets a full backward hook
    outputs: dict[str, torch.Tensor] = {}
    for name, module in model.named_children():
        module.register_forward_hook(lambda m, a, out, name=name: outputs.__setitem__(name, out))
    agent = hooktrace.attach(model, out=str(tmp_path), metrics_port=0, sample_every=1, flow_every=1, backward="full")
    full_hooks = []
    for _ in range(2):  # step 1 runs the preflight, step 2 the full hooks
        loss = model(batch).pow(2).sum()
        full_hooks.append([len(m._backward_hooks) for m in model])
        for out in outputs.values():
            out.retain_grad()
        loss.backward()
        torch.optim.SGD(model.parameters(), lr=0.0).step()
    agent.close()
    assert full_hooks[1] == [1, 1, 1]
    flow = read_steps(tmp_path)[1]["output_grad_norms"]
    assert {k: flow[k] for k in ("0", "1", "2")} == pytest.approx(
        {name: float(out.grad.double().norm()) for name, out in outputs.items()}, rel=1e-5
    )


def test_device_scalars_reach_the_host_keyed_by_module() -> None:
    from hooktrace.health.monitor import resolve_pairs
    from hooktrace.health.norms import HostCopy

    pairs = [(3, torch.tensor(1.5)), (1, torch.tensor(float("nan"))), (3, torch.tensor(2.0, dtype=torch.float16))]
    copied = HostCopy(pairs)  # what a CUDA step starts on the training thread at close
    assert resolve_pairs(copied)[0] == (3, 1.5) and resolve_pairs(copied)[2] == (3, 2.0)
    assert math.isnan(resolve_pairs(pairs)[1][1]) and resolve_pairs([]) == []


class _Judge:
    """A ``GradHealth`` over four one-tensor modules labelled 0-3, fed per-module norms directly."""

    def __init__(self) -> None:
        from hooktrace._record.module_table import ModuleTable
        from hooktrace.health.monitor import GradHealth
        from hooktrace.health.norms import ParamRef

        model = nn.Sequential(*(nn.Linear(2, 2, bias=False) for _ in range(4)))
        table = ModuleTable(depth=3, max_modules=256)
        table.add_root(model, "")
        self.params = [
            ParamRef(f"{i}.weight", model[i].weight, table.index_of(model[i]))  # type: ignore[arg-type]
            for i in range(4)
        ]
        self.health = GradHealth(table, explode_factor=10.0)

    def step(self, norms: dict[int, float], **kwargs: Any) -> dict[str, tuple[float, float]]:
        """The spikes of one step whose module ``i`` has gradient norm ``norms[i]``."""
        present = sorted(norms)
        verdict = self.health.evaluate(
            self.params, present, [norms[i] for i in present], detail=False, per_param=False, **kwargs
        )
        return verdict.spike_modules


def _noise(step: int) -> float:
    return 1.0 + 0.1 * ((step * 7) % 5 - 2) / 2  # 0.9 .. 1.1, no spike on its own


def test_a_small_module_that_jumps_tenfold_far_below_the_floor_is_not_a_spike() -> None:
    """The false alarm of issue 12: a last layer at 0.0045 of a total of ~1 jumping 10x."""
    judge = _Judge()
    for step in range(30):
        assert judge.step({0: _noise(step), 1: 0.00045 * _noise(step + 1)}) == {}
    assert judge.step({0: 1.0, 1: 0.00465}) == {}  # 10.4x its median, 0.005 of the total


def test_a_module_jump_above_the_floor_is_a_spike_and_the_total_is_judged_alone() -> None:
    from hooktrace.health.monitor import MODULE_FLOOR

    judge = _Judge()
    for step in range(30):
        assert judge.step({0: _noise(step), 1: 0.004 * _noise(step + 2)}) == {}
    # just under the floor (5% of the total's median of 1.0) then just over it: 12.4x its median either way
    assert judge.step({0: 1.0, 1: MODULE_FLOOR * 0.99}) == {}
    spikes = judge.step({0: 1.0, 1: MODULE_FLOOR * 1.2})
    assert set(spikes) == {"1"} and spikes["1"][1] > 10  # the total moved by 0.3%: no total spike
    spikes = judge.step({0: 30.0, 1: 0.004})  # the whole model: the total alone, no floor
    assert set(spikes) == {"__total__", "0"}


def test_module_spikes_wait_for_ten_steps_of_history() -> None:
    judge = _Judge()
    for step in range(9):
        assert judge.step({0: _noise(step), 1: 0.3}) == {}
    assert judge.step({0: 1.0, 1: 3.5}) == {}  # the 10th step: not enough history yet
    assert set(judge.step({0: 1.0, 1: 3.5})) == {"1"}  # 11.7x its median; the total 3.5x its own


def test_each_total_series_keeps_its_own_baseline_and_gives_its_own_floor_to_its_modules() -> None:
    """A GAN: the generator (modules 0, 1) has a total norm near 1, the discriminator (2, 3) near
    100, each optimizer with its own series; the verdict still names the total ``__total__``."""
    judge = _Judge()
    gen, disc = "__total__/Adam#0", "__total__/Adam#1"
    for step in range(30):
        assert judge.step({0: _noise(step), 1: 0.01}, total_series=gen) == {}
        assert judge.step({2: 100 * _noise(step), 3: 0.02}, total_series=disc) == {}
    # 0.12 is above the generator's floor (0.05 x 1), 0.25 far below the discriminator's (0.05 x 100);
    # one shared series would have a median of ~45 (a floor of 2.25) and judge both wrong
    assert set(judge.step({0: 1.0, 1: 0.12}, total_series=gen)) == {"1"}
    assert judge.step({2: 100.0, 3: 0.25}, total_series=disc) == {}
    assert set(judge.step({2: 2000.0, 3: 0.02}, total_series=disc)) == {"__total__", "2"}
    assert judge.step({0: 1.0, 1: 0.01}, total_series=gen) == {}  # the discriminator's spike is not its baseline


def test_the_spike_detector_floor_only_gates_the_verdict_and_the_value_still_enters_the_history() -> None:
    from hooktrace.health.spikes import SpikeDetector

    detector = SpikeDetector(10.0, window=5, warmup=3)
    for _ in range(3):
        detector.check("m", 1.0)
    assert detector.baseline("m") == 1.0
    assert detector.check("m", 20.0, floor=50.0) == (False, 20.0)
    assert detector.check("m", 20.0, floor=20.0) == (True, 20.0)
    assert detector.baseline("m") == 1.0 and detector.baseline("unknown") is None
    for _ in range(3):
        detector.check("m", 20.0)
    assert detector.baseline("m") == 20.0  # a lasting level is the new baseline


def test_a_training_run_whose_tiny_last_layer_jumps_tenfold_reports_no_spike(tmp_path: Path) -> None:
    """Issue 12 end to end: the last layer's gradient is ~1/1000 of the model's and jumps 15x at
    step 30; steps.jsonl keeps its norms, but no step has a grad_spike event."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1))
    current = {"step": 0}
    for param in model[4].parameters():
        param.register_hook(lambda grad: grad * (1.5e-2 if current["step"] == 30 else 1e-3))
    agent = hooktrace.attach(model, out=str(tmp_path), metrics_port=0, sample_every=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for step in range(1, 41):
        current["step"] = step
        x = torch.randn(8, 16, generator=torch.Generator().manual_seed(step))
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    agent.close()
    steps = read_steps(tmp_path)
    norms = [s["module_grad_norms"]["4"] for s in steps]
    assert norms[29] > 10 * sorted(norms[:29])[14]  # the head did jump, relative to itself
    assert [e for s in steps for e in s["events"]] == []


def test_the_every_step_verdict_equals_the_general_one_on_random_runs() -> None:
    """The worker's usual-step verdict (every gradient finite, hypot per label, one spike loop)
    must say what the general path says: totals, module norms, ratios, spikes, step by step, with
    two modules sharing a label and a per-optimizer total series."""
    import random

    from hooktrace._record.module_table import ModuleTable
    from hooktrace.health.monitor import GradHealth
    from hooktrace.health.norms import ParamRef

    model = nn.Sequential(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), nn.Linear(2, 2), nn.Linear(2, 2))
    table = ModuleTable(depth=1, max_modules=256)  # model.0.0 and model.0.1 share the label "0"
    table.add_root(model, "")
    params = [
        ParamRef(name, param, table.index_of(module))  # type: ignore[arg-type]
        for module in model.modules()
        for name, param in module.named_parameters(recurse=False)
    ]
    fast, general = GradHealth(table, explode_factor=5.0), GradHealth(table, explode_factor=5.0)
    rng = random.Random(3)
    spikes = 0
    for step in range(400):
        values = [rng.uniform(0.5, 1.5) * (40.0 if rng.random() < 0.02 else 1.0) for _ in params]
        present = list(range(len(params)))
        series = "__total__/SGD#0" if step % 2 else "__total__"
        a = fast.evaluate(params, present, values, detail=step % 10 == 0, per_param=False, total_series=series)
        b = _general_verdict(general, params, present, values, step % 10 == 0, series)
        assert a.total == pytest.approx(b.total, rel=1e-12)
        assert a.ratio == (pytest.approx(b.ratio, rel=1e-9) if b.ratio is not None else None)
        assert a.module_norms == pytest.approx(b.module_norms, rel=1e-12)
        assert a.param_norms == b.param_norms
        assert a.spike_modules.keys() == b.spike_modules.keys()
        spikes += bool(a.spike_modules)
    assert spikes > 5  # the random spikes were seen, by both


def _general_verdict(
    health: Any, params: Any, present: list[int], values: list[float], detail: bool, series: str
) -> Any:
    """``GradHealth.evaluate`` down its general loop (the one that also handles non-finite values
    and per-tensor rules), reached by asking for the per-tensor rule with a detector that never
    fires for tensors."""
    health.param_detector.warmup = 10**9  # per-tensor spikes never fire: only the path changes
    return health.evaluate(params, present, values, detail=detail, per_param=True, total_series=series)
