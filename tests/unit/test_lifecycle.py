"""Attach, detach, errors inside hooks, and the step cases the tracker must get right."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn.modules import module as module_mod
from torch.optim import optimizer as optimizer_mod

import hooktrace
from tests import zoo
from tests.conftest import read_steps, read_trace
from tests.servers import free_port


def _hook_counts(model: nn.Module) -> int:
    total = 0
    for m in model.modules():
        total += len(m._forward_pre_hooks) + len(m._forward_hooks) + len(m._backward_hooks)
        total += len(m._backward_pre_hooks) + len(m._forward_hooks_always_called)
        total += len(m._forward_hooks_with_kwargs) + len(m._forward_pre_hooks_with_kwargs)
    return total


def _global_hooks() -> int:
    return (
        len(module_mod._global_forward_pre_hooks)
        + len(module_mod._global_forward_hooks)
        + len(module_mod._global_module_registration_hooks)
        + len(optimizer_mod._global_optimizer_pre_hooks)
        + len(optimizer_mod._global_optimizer_post_hooks)
    )


def _train(model: nn.Module, steps: int, opt: torch.optim.Optimizer | None = None) -> None:
    opt = opt or torch.optim.SGD(model.parameters(), lr=0.01)
    for step in range(steps):
        opt.zero_grad()
        model(zoo.make_batch(step, model)).pow(2).mean().backward()
        opt.step()


def test_detach_leaves_the_model_exactly_as_before(tmp_path: Path) -> None:
    model = zoo.TwiceNet()
    before_attrs = {name: set(vars(m)) for name, m in model.named_modules()}
    before_globals = _global_hooks()
    agent = hooktrace.attach(model, out=str(tmp_path), metrics_port=0, sample_every=1)
    _train(model, 2)
    assert _hook_counts(model) > 0
    agent.detach()
    assert _hook_counts(model) == 0
    assert _global_hooks() == before_globals
    assert {name: set(vars(m)) for name, m in model.named_modules()} == before_attrs
    agent.close()


def test_attaching_twice_returns_the_same_agent_and_other_options_are_refused(tmp_path: Path) -> None:
    model = zoo.TwiceNet()
    agent = hooktrace.attach(model, out=str(tmp_path), metrics_port=0)
    assert hooktrace.attach(model) is agent
    with pytest.raises(hooktrace.AttachError, match="already attached"):
        hooktrace.attach(model, sample_every=3)
    model.apply(agent.instrument)  # by hand, again: still one set of hooks
    _train(model, 2)
    assert agent.close().steps == 2


@pytest.mark.parametrize(
    ("thing", "message"),
    [
        ([1, 2], "needs a torch.nn.Module, got list"),
        (nn.ReLU(), "has no parameters"),
        ("scripted", "TorchScript"),
    ],
)
def test_things_hooks_cannot_work_on_are_refused_with_a_fix(thing: Any, message: str) -> None:
    if thing == "scripted":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.script is deprecated in 2.13
            thing = torch.jit.script(nn.Linear(2, 2))
    with pytest.raises(hooktrace.AttachError, match=message):
        hooktrace.attach(thing, metrics_port=0, write_files=False)


def test_a_raising_hook_never_reaches_the_training_loop(tmp_path: Path) -> None:
    bare, _ = zoo.train(zoo.TwiceNet)

    def broken(model: nn.Module) -> hooktrace.Agent:
        agent = hooktrace.attach(model, out=str(tmp_path), metrics_port=0, sample_every=1)

        def explode() -> int:
            raise RuntimeError("clock broke")

        agent.recorder.stamp = explode
        return agent

    traced, agent = zoo.train(zoo.TwiceNet, attach=broken)
    summary = agent.close()
    assert traced == bare
    assert summary.ranks[0]["hook_errors"] > 0
    assert any("clock broke" in note for note in summary.notes)


def test_repeated_hook_errors_detach_the_agent_and_say_so_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = zoo.SleepyNet(0, 0)
    agent = hooktrace.attach(model, out=str(tmp_path), metrics_port=0, sample_every=1)

    def explode() -> int:
        raise RuntimeError("boom")

    agent.recorder.stamp = explode
    _train(model, 30)
    assert _hook_counts(model) == 0
    assert capsys.readouterr().err.count("detaching to protect training") == 1
    agent.close()


def test_apply_instrument_finds_the_root_on_its_first_forward(tmp_path: Path) -> None:
    model = zoo.TwiceNet()
    agent = hooktrace.Agent(out=str(tmp_path), metrics_port=0, sample_every=1)
    model.apply(agent.instrument)
    _train(model, 3)
    summary = agent.close()
    assert summary.steps == 3
    assert {m["module"] for m in summary.modules} >= {"TwiceNet", "block", "block.0", "out"}
    block = next(m for m in summary.modules if m["module"] == "block" and m["phase"] == "forward")
    assert block["calls"] == 6  # called twice per step, three sampled steps


def test_two_models_each_get_instrumented_and_named(tmp_path: Path) -> None:
    gen, disc = nn.Sequential(nn.Linear(4, 8), nn.Tanh()), nn.Sequential(nn.Linear(8, 1))
    agent = hooktrace.Agent(out=str(tmp_path), metrics_port=0, sample_every=1)
    agent.attach(gen)
    agent.attach(disc)
    g_opt, d_opt = torch.optim.SGD(gen.parameters(), lr=0.01), torch.optim.SGD(disc.parameters(), lr=0.01)
    for _ in range(2):
        d_opt.zero_grad()
        disc(gen(torch.randn(4, 4)).detach()).mean().backward()
        d_opt.step()
        g_opt.zero_grad()
        (-disc(gen(torch.randn(4, 4)))).mean().backward()
        g_opt.step()
    names = {m["module"] for m in agent.close().modules}
    # both models found before the first step closed: every name says which model it belongs to
    assert {"Sequential", "Sequential.0", "Sequential2", "Sequential2.0"} <= names
    assert "0" not in names


def test_eval_calls_are_kept_apart_from_training_steps(tmp_path: Path) -> None:
    model = zoo.TwiceNet()
    agent = hooktrace.attach(model, out=str(tmp_path), metrics_port=0, sample_every=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for step in range(3):
        opt.zero_grad()
        model(zoo.make_batch(step, model)).mean().backward()
        opt.step()
        with torch.no_grad():
            model(zoo.make_batch(99, model))
    summary = agent.close()
    assert summary.steps == 3
    phases = {m["phase"] for m in summary.modules if m["module"] == "block"}
    assert phases == {"forward", "backward", "eval"}
    assert all(step["micro_batches"] == 1 for step in read_steps(tmp_path))


def test_checkpoint_recompute_is_labelled_and_not_counted_as_forward(tmp_path: Path) -> None:
    _, agent = zoo.train(
        zoo.CheckpointNet,
        steps=2,
        attach=lambda m: hooktrace.attach(m, out=str(tmp_path), metrics_port=0, sample_every=1),
    )
    rows = {(m["module"], m["phase"]): m for m in agent.close().modules}
    assert rows[("block.0", "forward")]["calls"] == 2
    assert rows[("block.0", "recompute")]["calls"] == 2


def test_modules_never_called_are_reported(tmp_path: Path) -> None:
    model = zoo.TwiceNet()
    model.unused = nn.Linear(3, 3)
    agent = hooktrace.attach(model, out=str(tmp_path), metrics_port=0, sample_every=1)
    _train(model, 2)
    assert agent.close().never_called == ["unused"]


def test_modules_added_after_attach_are_picked_up_on_the_next_sampled_step(tmp_path: Path) -> None:
    class Growing(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first = nn.Linear(8, 8)
            self.extra: nn.Module = nn.Identity()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.extra(self.first(x))

    model = Growing()
    agent = hooktrace.attach(model, out=str(tmp_path), metrics_port=0, sample_every=1)
    _train(model, 1)
    model.extra = nn.Linear(8, 8)
    _train(model, 2)
    assert any(m["module"] == "extra" and m["module_type"] == "Linear" for m in agent.close().modules)


def test_gradscaler_skipped_steps_are_closed_and_counted(tmp_path: Path) -> None:
    model = zoo.TwiceNet()
    agent = hooktrace.attach(model, out=str(tmp_path), metrics_port=0, sample_every=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for step in range(4):
        opt.zero_grad()
        loss = model(zoo.make_batch(step, model)).mean()
        if step == 2:
            loss = loss * float("inf")
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    agent.close()
    steps = read_steps(tmp_path)
    assert len(steps) == 4
    assert [s.get("skipped", False) for s in steps] == [False, False, True, False]
    assert [e["kind"] for e in steps[2]["events"]] == ["amp_skip"]


def test_a_compiled_model_is_timed_at_its_boundary_and_warns_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = torch.compile(zoo.TwiceNet(), backend="eager")
    agent = hooktrace.attach(model, out=str(tmp_path), metrics_port=0, sample_every=1)
    _train(model, 3)
    summary = agent.close()
    assert summary.steps == 3
    assert {m["module"] for m in summary.modules} == {"OptimizedModule"}
    assert capsys.readouterr().err.count("torch.compile'd") == 1


def test_a_parameter_passed_as_an_argument_gets_no_hook_that_outlives_the_run(tmp_path: Path) -> None:
    class UsesParam(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(8))
            self.inner = nn.Linear(8, 1)
            self.mul = Mul()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(self.mul(x, self.scale))

    class Mul(nn.Module):
        def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            return x * w

    model = UsesParam()
    agent = hooktrace.attach(model, out=str(tmp_path), metrics_port=0, sample_every=1)
    _train(model, 4)
    agent.close()
    assert not model.scale._backward_hooks
    assert _hook_counts(model) == 0


def test_names_lose_wrapper_parts_but_keep_a_users_own_module_attribute() -> None:
    from hooktrace._record.module_table import clean_name

    assert clean_name("module._orig_mod.blocks.0") == "blocks.0"
    assert clean_name("layers._fsdp_wrapped_module.attn._checkpoint_wrapped_module") == "layers.attn"
    assert clean_name("encoder.module.fc") == "encoder.module.fc"


def test_watched_modules_and_parameters_are_reported_on_every_step(tmp_path: Path) -> None:
    model = zoo.TwiceNet()
    agent = hooktrace.attach(model, out=str(tmp_path), metrics_port=0, sample_every=10, watch=("out", "block.0.weight"))
    _train(model, 5)
    summary = agent.close()
    rows = {(m["module"], m["phase"]): m for m in summary.modules}
    assert rows[("out", "forward")]["steps"] == 4  # watched: every steady step (step 1 is warm-up)
    assert rows[("block.0", "forward")]["steps"] == 0  # not watched: sampled step 1 only
    assert rows[("block.0", "forward")]["warmup_total_s"] is not None
    steps = read_steps(tmp_path)
    assert all("block.0.weight" in s.get("param_grad_norms", {}) for s in steps)
    assert "out.weight" not in steps[1].get("param_grad_norms", {})


def test_a_watch_name_that_names_nothing_fails_at_attach_with_the_fix() -> None:
    with pytest.raises(hooktrace.ConfigError, match=r"--watch / HOOKTRACE_WATCH 'blocks\.9' names no module"):
        hooktrace.attach(zoo.TwiceNet(), metrics_port=0, write_files=False, watch=("blocks.9",))


def test_the_trace_file_is_capped_and_the_dropped_events_are_counted(tmp_path: Path) -> None:
    from tests.conftest import read_trace

    model = zoo.TwiceNet()
    agent = hooktrace.attach(model, out=str(tmp_path), metrics_port=0, sample_every=1, max_trace_events=20)
    _train(model, 4)
    summary = agent.close()
    events = read_trace(tmp_path)
    assert len([e for e in events if e.get("ph") != "M" or e["name"] != "hooktrace"]) <= 20
    assert summary.ranks[0]["dropped"]["trace_events"] > 0


def test_an_optimizer_of_a_model_the_agent_does_not_watch_ends_no_step(tmp_path: Path) -> None:
    watched, other = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)), nn.Linear(4, 1)
    other_opt = torch.optim.SGD(other.parameters(), lr=0.01)
    agent = hooktrace.attach(watched, out=str(tmp_path), metrics_port=0)
    opt = torch.optim.SGD(watched.parameters(), lr=0.01)
    for step in range(6):
        x = torch.randn(4, 4, generator=torch.Generator().manual_seed(step))
        other_opt.zero_grad()
        other(x).pow(2).mean().backward()  # another model's step before each of the watched model's
        other_opt.step()
        opt.zero_grad()
        watched(x).pow(2).mean().backward()
        opt.step()
    agent.close()
    steps = read_steps(tmp_path)
    assert [s["step"] for s in steps] == [1, 2, 3, 4, 5, 6]
    assert all(s["grad_norm"] is not None and s["phases"]["optimizer"] > 0 for s in steps)


@pytest.mark.parametrize("direct", [True, False], ids=["hook-dicts", "public-registration"])
def test_module_hooks_exist_on_sampled_steps_only_and_a_users_own_hooks_keep_running(
    direct: bool, tmp_path: Path, monkeypatch: Any
) -> None:
    """Both ways of putting the hooks on: straight into the hook dicts, and the public
    ``register_forward_*_hook`` a PyTorch with another private layout gets."""
    monkeypatch.setattr("hooktrace._record.recorder.direct_hooks_supported", lambda: direct)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    seen: list[str] = []
    user = model[1].register_forward_hook(lambda m, a, out: seen.append("user"))
    agent = hooktrace.attach(model, out=str(tmp_path), metrics_port=0, sample_every=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    counts = []
    for _ in range(6):
        opt.zero_grad()
        model(torch.randn(2, 4)).pow(2).mean().backward()
        opt.step()
        counts.append(sum(_hook_counts(m) for m in list(model)))  # submodules only; the root keeps its hooks
    agent.close()
    # step 1 and step 4 are sampled: their hooks are on until the next step's forward closes them
    assert counts[1] == counts[2] == counts[4] == counts[5] == 1  # only the user's hook in between
    assert counts[0] > 1 and counts[3] > 1
    assert seen == ["user"] * 6
    user.remove()
    assert _hook_counts(model) == 0
    timed = {e["name"] for e in read_trace(tmp_path) if e.get("ph") == "X"}
    assert {"forward 0", "forward 2", "backward 2"} <= timed


def test_modules_inserted_without_a_registration_are_found_within_ten_sampled_steps(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(8, 4), nn.Tanh(), nn.Linear(4, 1))
    extra = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1))  # built before attach: no registration after
    agent = hooktrace.attach(model, out=str(tmp_path), metrics_port=0, sample_every=1)
    _train(model, 2)
    model._modules["2"] = extra  # bypasses register_module, as ModuleList.insert does
    _train(model, 11)
    assert any(m["module"] == "2.1" for m in agent.close().modules)


def test_an_optimizer_of_parameter_copies_still_drives_the_steps(tmp_path: Path) -> None:
    """fp32 master weights: the optimizer updates copies; gradients are copied over by hand."""
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))
    masters = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    opt = torch.optim.SGD(masters, lr=0.01)
    agent = hooktrace.attach(model, out=str(tmp_path), metrics_port=0)
    for step in range(3):
        model.zero_grad()
        model(zoo.make_batch(step, model)).pow(2).mean().backward()
        for master, param in zip(masters, model.parameters(), strict=True):
            master.grad = param.grad.detach().clone()
        opt.step()
        with torch.no_grad():
            for master, param in zip(masters, model.parameters(), strict=True):
                param.copy_(master)
    agent.close()
    steps = read_steps(tmp_path)
    assert [s["step"] for s in steps] == [1, 2, 3]
    assert all(s["grad_norm"] is not None and s["phases"]["optimizer"] > 0 for s in steps)


def test_detach_drops_every_reference_to_the_users_batches(tmp_path: Path) -> None:
    import gc
    import weakref

    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    agent = hooktrace.attach(model, out=str(tmp_path), metrics_port=0)
    batch = torch.randn(2, 4)
    model(batch).pow(2).mean().backward()  # a forward whose step never reaches an optimizer
    alive = weakref.ref(batch)
    agent.detach()
    del batch
    gc.collect()
    assert alive() is None
    agent.close()


def test_watch_names_on_a_ddp_model_are_the_inner_models_names(tmp_path: Path) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = DistributedDataParallel(zoo.TwiceNet())
        agent = hooktrace.attach(
            model, out=str(tmp_path), metrics_port=0, sample_every=10, watch=("out", "block.0.weight")
        )
        _train(model, 3)
        rows = {(m["module"], m["phase"]): m for m in agent.close().modules}
    finally:
        dist.destroy_process_group()
    assert rows[("out", "forward")]["steps"] == 2  # the watched module: every steady step (step 1 apart)
    assert all("block.0.weight" in s.get("param_grad_norms", {}) for s in read_steps(tmp_path))


def test_a_full_step_queue_drops_and_counts_steps_without_blocking_training(tmp_path: Path) -> None:
    import threading

    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))
    agent = hooktrace.attach(model, out=str(tmp_path), metrics_port=0, queue_size=4)
    release = threading.Event()
    process = agent.worker.processor.process

    def stuck(buf: Any) -> Any:  # a worker that cannot keep up
        release.wait(10)
        return process(buf)

    agent.worker.processor.process = stuck  # type: ignore[method-assign]
    _train(model, 20)  # returns although the worker is stuck
    release.set()
    summary = agent.close()
    dropped = summary.ranks[0]["dropped"]["steps"]
    assert dropped >= 10
    assert len(read_steps(tmp_path)) == 20 - dropped


EXIT_WHILE_BUSY = """
import sys, time, torch
from torch import nn
import hooktrace
import hooktrace._record.dispatch as dispatch
dispatch.PROBE_CALLS = 4000  # the worker's first poll measures the saved-tensor cost: ~0.3 s of torch ops
model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.01)
hooktrace.attach(model, out=sys.argv[1], metrics_port=0, print_summary=False)
for _ in range(3):
    opt.zero_grad()
    model(torch.randn(4, 8)).sum().backward()
    opt.step()
model(torch.randn(4, 8))  # closes step 3
time.sleep(0.3)  # the worker is inside torch operations now; the script ends without close()
"""


def test_a_script_that_ends_without_close_while_the_worker_is_busy_keeps_its_exit_code(tmp_path: Path) -> None:
    """A daemon thread killed inside a torch operation at interpreter exit aborts the process (exit
    code 134, "terminate called without an active exception"): the worker is halted at exit first."""
    import subprocess
    import sys

    script = tmp_path / "ends.py"
    script.write_text(EXIT_WHILE_BUSY)
    for _ in range(2):
        done = subprocess.run(
            [sys.executable, str(script), str(tmp_path / "out")], capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr[-2000:]
        assert "terminate called" not in done.stderr
    assert read_steps(tmp_path / "out")  # the lines written so far were flushed
