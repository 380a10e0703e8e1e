"""Gradient norms are those backward produced, whatever the training loop does after it:
clipping, a GradScaler, an optimizer closure, several optimizers, no torch.optim at all."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import pytest
import torch
from torch import nn

import hooktrace
from hooktrace._record import amp
from tests import zoo
from tests.conftest import read_steps


def grad_norm(params: Iterable[nn.Parameter]) -> float:
    grads = [p.grad for p in params if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))


def small_net() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))


def attach(model: nn.Module, out: Path, **options: object) -> hooktrace.Agent:
    return hooktrace.attach(model, out=str(out), metrics_port=0, print_summary=False, **options)


def test_norms_are_read_before_the_scripts_clipping_and_the_step_says_it_clipped(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = small_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    agent = attach(model, tmp_path)
    returned = []
    for step in range(1, 31):
        opt.zero_grad()
        (model(torch.randn(16, 4)).pow(2).mean() * (1e4 if step == 25 else 1.0)).backward()
        returned.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.1)))
        opt.step()
    agent.close()
    steps = read_steps(tmp_path)
    assert [s["grad_norm"] for s in steps] == pytest.approx(returned, rel=1e-5)
    assert all(s["clipped_by_script"] for s in steps)
    assert any(e["kind"] == "grad_spike" and e["module"] == "__total__" for e in steps[24]["events"])


def test_a_loop_that_does_not_clip_is_not_said_to_clip(tmp_path: Path) -> None:
    zoo.train(lambda: zoo.SleepyNet(0.0, 0.0), steps=5, attach=lambda model: attach(model, tmp_path))[1].close()
    steps = read_steps(tmp_path)
    assert len(steps) == 5 and not any(s.get("clipped_by_script") for s in steps)


def test_norms_under_a_grad_scaler_are_unscaled_whether_or_not_the_script_unscales(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = small_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    agent = attach(model, tmp_path)
    assert agent.gradients.on_unscale in amp._listeners
    expected = []
    for step in range(12):
        opt.zero_grad()
        scaler.scale(model(torch.randn(16, 4)).pow(2).mean()).backward()
        if step % 2:
            scaler.unscale_(opt)  # the script clips unscaled gradients
            expected.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)))
        else:
            expected.append(grad_norm(model.parameters()) / scaler.get_scale())  # step() unscales
        scaler.step(opt)
        scaler.update()
    agent.close()
    steps = read_steps(tmp_path)
    assert [s["grad_norm"] for s in steps] == pytest.approx(expected, rel=1e-4)
    assert [bool(s.get("clipped_by_script")) for s in steps] == [bool(i % 2) for i in range(12)]
    assert agent.gradients.on_unscale not in amp._listeners  # the agent stopped listening at close


def test_each_optimizer_of_a_gan_gets_the_norm_of_exactly_its_parameters(tmp_path: Path) -> None:
    torch.manual_seed(0)
    gen, disc = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 8)), small_net_d()
    g_opt, d_opt = torch.optim.Adam(gen.parameters(), 1e-3), torch.optim.Adam(disc.parameters(), 1e-3)
    agent = hooktrace.Agent(out=str(tmp_path), metrics_port=0, print_summary=False, sample_every=1)
    agent.attach(disc)
    agent.attach(gen)
    bce = nn.BCEWithLogitsLoss()
    expected = []
    for _ in range(6):
        fake = gen(torch.randn(8, 4))
        d_opt.zero_grad()
        (bce(disc(torch.randn(8, 8)), torch.ones(8, 1)) + bce(disc(fake.detach()), torch.zeros(8, 1))).backward()
        expected.append(("Adam#0", grad_norm(disc.parameters())))
        d_opt.step()
        g_opt.zero_grad()
        bce(disc(fake), torch.ones(8, 1)).backward()  # also fills the discriminator's gradients
        expected.append(("Adam#1", grad_norm(gen.parameters())))
        g_opt.step()
    agent.close()
    steps = read_steps(tmp_path)
    assert [s["optimizer"] for s in steps] == [name for name, _ in expected]
    assert [s["grad_norm"] for s in steps] == pytest.approx([norm for _, norm in expected], rel=1e-5)
    g_steps = [s for s in steps if s["optimizer"] == "Adam#1"]
    assert all(all(label.startswith("Sequential2") for label in s["module_grad_norms"]) for s in g_steps)


def small_net_d() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))


def test_two_models_found_in_the_first_step_are_both_named_by_their_model(tmp_path: Path) -> None:
    gen, disc = nn.Sequential(nn.Linear(4, 8)), small_net_d()
    agent = hooktrace.Agent(out=str(tmp_path), metrics_port=0, print_summary=False)
    agent.discover()
    opt = torch.optim.SGD([*gen.parameters(), *disc.parameters()], lr=0.01)
    for _ in range(3):
        opt.zero_grad()
        disc(gen(torch.randn(4, 4))).mean().backward()
        opt.step()
    agent.close()
    labels = set(read_steps(tmp_path)[0]["module_grad_norms"])
    assert labels == {"Sequential.0", "Sequential2.0", "Sequential2.2"}


def test_a_loop_without_torch_optim_counts_a_step_per_update_with_its_norm(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = small_net()
    agent = attach(model, tmp_path)
    expected = []
    for _ in range(40):
        model(torch.randn(16, 4)).pow(2).mean().backward()
        expected.append(grad_norm(model.parameters()))
        for p in model.parameters():
            p.data.add_(p.grad, alpha=-0.01)
            p.grad.zero_()
    agent.close()
    steps = read_steps(tmp_path)
    assert len(steps) == 40
    assert [s["grad_norm"] for s in steps] == pytest.approx(expected, rel=1e-5)
    assert all("optimizer" not in s for s in steps)


def test_gradient_accumulation_without_torch_optim_is_one_step_per_reset(tmp_path: Path) -> None:
    model = small_net()
    agent = attach(model, tmp_path)
    for _ in range(5):
        for _ in range(3):
            model(torch.randn(4, 4)).sum().backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.01 * p.grad
        model.zero_grad()
    agent.close()
    assert [s["micro_batches"] for s in read_steps(tmp_path)] == [3] * 5


def test_a_closure_step_reads_the_gradients_its_closure_made_and_says_so(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = small_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    agent = attach(model, tmp_path)
    made = []
    for _ in range(6):

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = model(torch.randn(16, 4)).pow(2).mean()
            loss.backward()
            made.append(grad_norm(model.parameters()))
            return loss

        opt.step(closure)
    agent.close()
    steps = read_steps(tmp_path)
    assert [s["grad_norm"] for s in steps] == pytest.approx(made, rel=1e-5)
    assert all(s["closure"] and s["phases"]["forward"] > 0 and s["phases"]["backward"] > 0 for s in steps)


def test_identity_modules_get_no_backward_time_and_the_producer_keeps_its_own(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 1024), nn.Dropout(0.0), nn.Identity(), nn.Linear(1024, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.001)
    agent = attach(model, tmp_path, sample_every=1)
    for _ in range(6):
        opt.zero_grad()
        model(torch.randn(128, 256)).pow(2).mean().backward()
        opt.step()
    summary = agent.close()
    backward = {m["module"]: m for m in summary.modules if m["phase"] == "backward"}
    assert "1" not in backward and "2" not in backward
    assert backward["0"]["self_s"] > 0


def test_the_partial_last_step_is_marked_and_has_no_gradient_norm(tmp_path: Path) -> None:
    model = small_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    agent = attach(model, tmp_path)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(4, 4)).sum().backward()
        opt.step()
    model(torch.randn(4, 4)).sum().backward()  # interrupted before its optimizer step
    agent.close()
    steps = read_steps(tmp_path)
    assert [bool(s.get("partial")) for s in steps] == [False, False, False, True]
    assert "grad_norm" not in steps[-1]


def test_eval_calls_before_training_are_not_counted_in_step_one(tmp_path: Path) -> None:
    def attach_then_validate(model: nn.Module) -> hooktrace.Agent:
        agent = attach(model, tmp_path)
        with torch.no_grad():
            model(torch.randn(2, 8))  # a validation pass before training: 50 ms
        return agent

    zoo.train(lambda: zoo.SleepyNet(forward_s=0.05, backward_s=0.0), steps=2, attach=attach_then_validate)[1].close()
    first = read_steps(tmp_path)[0]
    assert "eval" not in first["phases"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert not any(m["phase"] == "eval" for m in summary["modules"])


@pytest.mark.parametrize(("flow_every", "flow_steps"), [(5, [5, 11]), (0, [])])
def test_gradient_flow_is_read_on_the_sampled_step_at_or_after_each_multiple(
    flow_every: int, flow_steps: list[int], tmp_path: Path
) -> None:
    agent_box: list[hooktrace.Agent] = []

    def attach_it(model: nn.Module) -> hooktrace.Agent:
        agent_box.append(attach(model, tmp_path, sample_every=2, flow_every=flow_every))
        return agent_box[0]

    zoo.train(lambda: zoo.SleepyNet(0.0, 0.0), steps=12, attach=attach_it)[1].close()
    steps = read_steps(tmp_path)
    assert [s["step"] for s in steps if "output_grad_norms" in s] == flow_steps
    assert [s["step"] for s in steps if s["sampled"]] == [1, 3, 5, 7, 9, 11]


def test_raise_on_explosion_stops_a_closure_step_before_its_update(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = small_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    attach(model, tmp_path, on_explosion="raise")
    x = torch.randn(16, 4)
    for step in range(1, 16):

        def closure(scale: float = 1e6 if step == 15 else 1.0) -> torch.Tensor:
            opt.zero_grad()
            loss = model(x).pow(2).mean() * scale
            loss.backward()
            return loss

        if step < 15:
            opt.step(closure)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(hooktrace.GradientExplosionError):
        opt.step(closure)
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))


def test_the_unscale_wrapper_is_installed_with_the_first_listener_and_removed_with_the_last(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # this test alone, whatever agents of other tests still listen (all restored after it)
    before = amp._original or torch.amp.GradScaler.unscale_  # PyTorch's own method
    monkeypatch.setattr(torch.amp.GradScaler, "unscale_", before)
    monkeypatch.setattr(amp, "_listeners", [])
    monkeypatch.setattr(amp, "_original", None)
    seen: list[torch.optim.Optimizer] = []
    first, second = amp.on_unscale(seen.append), amp.on_unscale(seen.append)
    assert torch.amp.GradScaler.unscale_ is not before
    model = small_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(model(torch.randn(4, 4)).sum()).backward()
    scaler.unscale_(opt)
    assert seen == [opt, opt]
    first.remove()
    assert torch.amp.GradScaler.unscale_ is not before  # one listener left
    second.remove()
    assert torch.amp.GradScaler.unscale_ is before
