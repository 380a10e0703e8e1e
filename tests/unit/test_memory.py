"""Activation bytes per module: what each module call saves for backward, on sampled steps."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import hooktrace
from tests.conftest import read_steps

KIB, MIB = 1024, 1024 * 1024
_top_hooks = torch._C._autograd._top_saved_tensors_default_hooks


def _run(model: nn.Module, batches: list[torch.Tensor], tmp_path: Path, **options: Any) -> hooktrace.RunSummary:
    options = {"memory_every": 1, **options}  # every sampled step measured
    agent = hooktrace.attach(model, out=str(tmp_path), metrics_port=0, sample_every=1, **options)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for x in batches:
        opt.zero_grad()
        model(x).float().pow(2).mean().backward()
        opt.step()
    return agent.close()


def _row(summary: hooktrace.RunSummary, module: str, phase: str = "forward") -> dict[str, Any]:
    return next(m for m in summary.modules if m["module"] == module and m["phase"] == phase)


def _bytes(summary: hooktrace.RunSummary, module: str, phase: str = "forward") -> tuple[int, int]:
    row = _row(summary, module, phase)
    return row["activation_bytes"], row["self_activation_bytes"]


class Twice(nn.Module):
    """Two children that save the same input."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.GELU(), nn.GELU()
        self.unused = nn.Linear(1, 1)  # something to attach to

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(x)


class Gated(nn.Module):
    """A parent with an op of its own: ``act(h) * h`` saves act's output (its own) and h (act's input)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.act = nn.Linear(1024, 4096), nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        return self.act(h) * h


def _saves_its_weight(linear: nn.Linear, x: torch.Tensor) -> bool:
    saved: list[int] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tensor.untyped_storage().data_ptr())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        linear(x)
    return linear.weight.untyped_storage().data_ptr() in saved


@pytest.mark.parametrize("input_grad", [False, True], ids=["plain-input", "input-requires-grad"])
def test_a_linear_saves_exactly_its_input_and_a_gelu_its_input(tmp_path: Path, input_grad: bool) -> None:
    """An input that requires grad makes the Linear save its weight too (for the input's gradient):
    a parameter, left out."""
    torch.manual_seed(0)
    linear = nn.Linear(1024, 4096)
    model = nn.Sequential(linear, nn.GELU())
    batches = [torch.randn(64, 1024, requires_grad=input_grad) for _ in range(3)]
    assert _saves_its_weight(linear, batches[0]) is input_grad  # the case below is the one named
    summary = _run(model, batches, tmp_path)
    assert _bytes(summary, "0") == (256 * KIB, 256 * KIB)  # 64 x 1024 fp32; the weight is a parameter
    assert _bytes(summary, "1") == (MIB, MIB)  # 64 x 4096 fp32
    assert _bytes(summary, "Sequential") == (256 * KIB + MIB, 0)
    assert summary.ranks[0]["memory"]["activations"] == 256 * KIB + MIB
    assert all(step["activation_bytes"] == 256 * KIB + MIB for step in read_steps(tmp_path))


def test_a_parents_inclusive_bytes_are_its_childrens_plus_its_own(tmp_path: Path) -> None:
    torch.manual_seed(0)
    summary = _run(Gated(), [torch.randn(64, 1024) for _ in range(2)], tmp_path)
    inclusive, own = _bytes(summary, "Gated")
    children = _bytes(summary, "lin")[0] + _bytes(summary, "act")[0]
    assert own == MIB  # act's output, saved by the parent's multiplication; h is act's already
    assert inclusive == children + own == 256 * KIB + 2 * MIB


def test_a_tensor_saved_by_two_modules_counts_once_in_their_parent(tmp_path: Path) -> None:
    x = torch.randn(64, 4096, requires_grad=True)
    summary = _run(Twice(), [x, x], tmp_path)
    assert _bytes(summary, "a") == (MIB, MIB)
    assert _bytes(summary, "b") == (MIB, MIB)
    assert _bytes(summary, "Twice") == (MIB, 0)


class Checkpointed(nn.Module):
    def __init__(self, reentrant: bool) -> None:
        super().__init__()
        self.reentrant = reentrant
        self.inp = nn.Linear(256, 256)
        self.block = nn.Sequential(nn.Linear(256, 1024), nn.GELU(), nn.Linear(1024, 256))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return checkpoint(self.block, self.inp(x), use_reentrant=self.reentrant)


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpointed_blocks_report_their_recompute_instead_of_their_forward(tmp_path: Path, reentrant: bool) -> None:
    torch.manual_seed(0)
    summary = _run(Checkpointed(reentrant), [torch.randn(32, 256) for _ in range(3)], tmp_path)
    hidden = 32 * 1024 * 4
    forward = "eval" if reentrant else "forward"  # the reentrant forward runs under no_grad
    assert _bytes(summary, "block.1", forward) == (0, 0)  # nothing kept
    assert _bytes(summary, "block.1", "recompute") == (hidden, hidden)
    assert _bytes(summary, "block", "recompute")[0] == 32 * 256 * 4 + 2 * hidden
    assert summary.ranks[0]["hook_errors"] == 0


def test_no_grad_and_eval_calls_report_zero_saved_bytes(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU())
    agent = hooktrace.attach(model, out=str(tmp_path), metrics_port=0, sample_every=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(3):
        model(torch.randn(8, 64)).sum().backward()
        opt.step()
        opt.zero_grad()
        model.eval()
        with torch.no_grad():
            model(torch.randn(8, 64))
        model.train()
    summary = agent.close()
    assert _bytes(summary, "0", "eval") == (0, 0)
    assert _bytes(summary, "Sequential", "eval") == (0, 0)
    assert _bytes(summary, "0")[0] == 8 * 64 * 4


def test_adamw_state_is_two_fp32_copies_of_the_trainable_parameters(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4))
    model[0].bias.requires_grad_(False)  # frozen: a parameter, no gradient, no state
    agent = hooktrace.attach(model, out=str(tmp_path), metrics_port=0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    for _ in range(2):
        model(torch.randn(8, 32)).sum().backward()
        opt.step()
        opt.zero_grad()
    memory = agent.close().ranks[0]["memory"]
    trainable = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    assert memory["parameters"] == trainable + 64 * 4
    assert memory["gradients"] == trainable
    assert memory["optimizer_state"] == 2 * trainable
    first = next(m for m in memory["modules"] if m["module"] == "0")
    assert first == {
        "module": "0",
        "parameter_bytes": (32 * 64 + 64) * 4,
        "gradient_bytes": 32 * 64 * 4,
        "optimizer_state_bytes": 2 * 32 * 64 * 4,
    }


def _losses(model: nn.Module, steps: int) -> list[torch.Tensor]:
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    out = []
    for step in range(steps):
        torch.manual_seed(step)
        opt.zero_grad()
        loss = model(torch.randn(16, 32)).pow(2).mean()
        loss.backward()
        opt.step()
        out.append(loss.detach())
    return out


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 64), nn.Sigmoid(), nn.Linear(64, 1))


def test_losses_are_bit_identical_with_memory_tracking_on_every_step(tmp_path: Path) -> None:
    bare = _losses(_mlp(), 6)
    model = _mlp()
    agent = hooktrace.attach(model, out=str(tmp_path), metrics_port=0, sample_every=1)
    traced = _losses(model, 6)
    summary = agent.close()
    assert torch.equal(torch.stack(bare), torch.stack(traced))
    assert summary.ranks[0]["memory"]["activations"] > 0
    assert _top_hooks(False) is None  # nothing left pushed


def test_saved_tensors_are_freed_after_backward(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What our pack hook hands autograd (a detached alias of each saved tensor) is gone once
    backward ran: nothing of ours keeps it, or its storage, alive."""
    from hooktrace._record import memory

    handed: list[weakref.ref[torch.Tensor]] = []
    pack = memory._pack

    def spy(saved: list[tuple[int, int]], outer: Any, tensor: torch.Tensor) -> Any:
        packed = pack(saved, outer, tensor)
        handed.append(weakref.ref(packed[0]))
        return packed

    monkeypatch.setattr(memory, "_pack", spy)
    monkeypatch.setattr(memory.SavedTensors, "save_ns", lambda self: 0)  # its probe would pack too
    model = nn.Sequential(nn.Linear(32, 32), nn.Sigmoid())  # the Linear saves its input, Sigmoid its output
    agent = hooktrace.attach(model, out=str(tmp_path), metrics_port=0, sample_every=1)
    x = torch.randn(4, 32)
    out = model(x)
    assert len(handed) == 2 and all(ref() is not None for ref in handed)
    out.sum().backward()
    gc.collect()
    assert [ref() for ref in handed] == [None, None]  # the user still holds x and out: only the aliases died
    agent.close()


def test_an_in_place_change_of_a_saved_tensor_still_raises(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.Sigmoid())
    agent = hooktrace.attach(model, out=str(tmp_path), metrics_port=0, sample_every=1)
    out = model(torch.randn(2, 8))
    with torch.no_grad():
        out.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()
    agent.close()


class Fails(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x.exp()
        raise ValueError("boom")


def test_a_forward_that_raises_leaves_no_hook_pushed(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(4, 4), Fails())
    agent = hooktrace.attach(model, out=str(tmp_path), metrics_port=0, sample_every=1)
    with pytest.raises(ValueError, match="boom"):
        model(torch.randn(2, 4))
    assert _top_hooks(False) is None
    agent.close()


def test_a_users_own_saved_tensor_hooks_still_get_every_save(tmp_path: Path) -> None:
    def count(model: nn.Module) -> int:
        packed: list[int] = []

        def pack(t: torch.Tensor) -> torch.Tensor:
            packed.append(1)
            return t.detach()

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(torch.randn(4, 32)).sum().backward()
        return len(packed)

    bare = count(_mlp())
    model = _mlp()
    agent = hooktrace.attach(model, out=str(tmp_path), metrics_port=0, sample_every=1)
    assert count(model) == bare
    summary = agent.close()
    assert _bytes(summary, "1")[0] == 4 * 64 * 4  # Tanh saves its output, counted too


def test_memory_off_measures_nothing(tmp_path: Path) -> None:
    summary = _run(nn.Sequential(nn.Linear(8, 8)), [torch.randn(2, 8)] * 2, tmp_path, memory="off")
    assert "activation_bytes" not in _row(summary, "Sequential")
    assert "activation_bytes" not in read_steps(tmp_path)[-1]
    assert "memory" in summary.ranks[0] and "parameters" not in summary.ranks[0]["memory"]


def test_a_left_over_pair_is_popped_at_the_next_sampled_step(tmp_path: Path) -> None:
    """A KeyboardInterrupt inside forward skips the always_call post-hooks: the next sampled step
    pops what stayed pushed."""

    class Interrupts(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise KeyboardInterrupt

    model = nn.Sequential(nn.Linear(4, 4), Interrupts())
    agent = hooktrace.attach(model, out=str(tmp_path), metrics_port=0, sample_every=1)
    with pytest.raises(KeyboardInterrupt):
        model(torch.randn(2, 4))
    assert _top_hooks(False) is not None
    model[1] = nn.Identity()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        model(torch.randn(2, 4)).sum().backward()
        opt.step()
        opt.zero_grad()
    agent.close()
    assert _top_hooks(False) is None


def test_a_hook_error_after_the_push_still_pops_the_pair(tmp_path: Path) -> None:
    model = _mlp()
    agent = hooktrace.attach(model, out=str(tmp_path), metrics_port=0, sample_every=1)

    def explode() -> int:
        raise RuntimeError("clock broke")

    agent.recorder.stamp = explode  # raises in every hook, after the pre-hook's push
    _losses(model, 2)
    summary = agent.close()
    assert summary.ranks[0]["hook_errors"] > 0
    assert _top_hooks(False) is None


def test_a_pair_pushed_above_ours_by_a_later_pre_hook_is_kept_and_ours_popped(tmp_path: Path) -> None:
    """Post-hooks run in registration order: a pre-hook registered after ours pushes above ours
    and its post-hook pops after ours."""
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh())
    agent = hooktrace.attach(model, out=str(tmp_path), metrics_port=0, sample_every=1)
    model(torch.randn(2, 8)).sum().backward()  # step 1: our hooks are in place from now on
    seen: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen.append(1)
        return t.detach()

    def pre(module: nn.Module, args: Any) -> None:
        torch._C._autograd._push_saved_tensors_default_hooks(pack, lambda t: t)

    def post(module: nn.Module, args: Any, output: Any) -> None:
        torch._C._autograd._pop_saved_tensors_default_hooks()

    handles = [model[1].register_forward_pre_hook(pre), model[1].register_forward_hook(post)]
    model(torch.randn(2, 8)).sum().backward()
    for handle in handles:
        handle.remove()
    agent.close()
    assert seen == [1]  # Tanh's output went to the innermost pair, the user's
    assert _top_hooks(False) is None


@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf")  # Dynamo's own tracing
def test_a_compiled_submodule_is_measured_as_a_whole_without_a_recompile(tmp_path: Path) -> None:
    import torch._dynamo.utils

    def make() -> nn.Module:
        model = _mlp()
        model[2] = torch.compile(model[2], backend="aot_eager")  # type: ignore[assignment]
        return model

    torch._dynamo.reset()
    bare = _losses(make(), 3)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    model = make()
    agent = hooktrace.attach(model, out=str(tmp_path), metrics_port=0, sample_every=1)
    traced = _losses(model, 3)
    summary = agent.close()
    assert torch.equal(torch.stack(bare), torch.stack(traced))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 2 * graphs  # at most the copy's own: no recompile
    assert _bytes(summary, "2")[0] == 16 * 64 * 4  # the compiled Linear saves its input


def test_memory_is_a_flag_an_environment_variable_and_a_config_field() -> None:
    from click.testing import CliRunner

    from hooktrace.cli.main import cli

    assert hooktrace.Config.resolve(environ={"HOOKTRACE_MEMORY": "off"}).memory == "off"
    assert hooktrace.Config.resolve({"memory": False}).memory == "off"
    assert hooktrace.Config().memory == "on"
    with pytest.raises(hooktrace.ConfigError, match="--memory / HOOKTRACE_MEMORY must be one of on, off"):
        hooktrace.Config.resolve(environ={"HOOKTRACE_MEMORY": "maybe"})
    assert "--memory [on|off]" in CliRunner().invoke(cli, ["run", "--help"]).output


def test_a_users_pair_pushed_by_an_earlier_pre_hook_still_gets_every_save_and_is_popped(tmp_path: Path) -> None:
    """A pre/post hook pair registered before ours: its post-hook runs first and pops our pair
    instead of its own; ours then pops its pair. Its pack still saw every save (ours hands on)."""
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh())
    seen: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen.append(1)
        return t.detach()

    def pre(module: nn.Module, args: Any) -> None:
        torch._C._autograd._push_saved_tensors_default_hooks(pack, lambda t: t)

    def post(module: nn.Module, args: Any, output: Any) -> None:
        torch._C._autograd._pop_saved_tensors_default_hooks()

    model[1].register_forward_pre_hook(pre)
    model[1].register_forward_hook(post)
    agent = hooktrace.attach(model, out=str(tmp_path), metrics_port=0, sample_every=1)
    for _ in range(2):
        model(torch.randn(2, 8)).sum().backward()
        assert _top_hooks(False) is None
    summary = agent.close()
    assert seen == [1, 1]  # Tanh's output, each step
    assert _bytes(summary, "1")[0] == 2 * 8 * 4


def test_the_reported_overhead_counts_every_saved_tensor_at_its_measured_cost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The saved-tensor hooks run outside every timed hook body: each sampled step's reported
    overhead carries saves x the per-save cost measured at start (here made 1 ms to be seen)."""
    from hooktrace._record.memory import SavedTensors
    from tests.conftest import RecordCapture

    monkeypatch.setattr(SavedTensors, "save_ns", lambda self: 1_000_000)
    reported = {}
    for memory in ("on", "off"):
        agent = hooktrace.Agent(
            out=str(tmp_path / memory), metrics_port=0, sample_every=1, memory=memory, memory_every=1
        )
        capture = RecordCapture()
        agent.exporters.append(capture)
        model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 1))  # saves 5 tensors a step
        agent.attach(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        for _ in range(4):
            opt.zero_grad()
            model(torch.randn(4, 8)).pow(2).mean().backward()
            opt.step()
        agent.close()
        reported[memory] = [r.overhead_s for r in capture.records if r.sampled and r.activation_bytes]
    assert reported["off"] == []
    assert len(reported["on"]) >= 3
    assert all(seconds >= 0.004 for seconds in reported["on"])  # at least 4 saves x 1 ms per step
