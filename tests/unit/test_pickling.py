"""An instrumented model pickles, saves and deep-copies exactly like the bare model."""

from __future__ import annotations

import copy
import copyreg
import io
import json
import logging
import pickle
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn.modules.module import register_module_forward_hook

import hooktrace
from hooktrace._record.pickling import is_ours
from tests import zoo

REPO = Path(__file__).resolve().parents[2]
HOOK_DICTS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_backward_pre_hooks",
    "_backward_hooks",
)

USER = logging.getLogger("test_pickling.user")
"""The user's hooks are this logger's methods: they pickle by name and do nothing when called."""
USER.disabled = True

LOADER = """
import json, pickle, sys
sys.modules["hooktrace"] = None  # `import hooktrace` fails from here on
sys.path.insert(0, sys.argv[1])  # tests.zoo, for the model classes
import torch
path = sys.argv[2]
if path.endswith(".pt"):
    model = torch.load(path, weights_only=False)
else:
    with open(path, "rb") as handle:
        model = pickle.load(handle)
hooks = [
    [name, kind, getattr(hook, "__qualname__", repr(hook))]
    for name, module in model.named_modules()
    for kind in ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")
    for hook in getattr(module, kind).values()
]
model(torch.randn(4, 8)).sum().backward()
loaded = sorted(n for n, m in sys.modules.items() if n.split(".")[0] == "hooktrace" and m is not None)
print(json.dumps({"hooks": hooks, "loaded": loaded}))
"""

USER_HOOKS = [["", "_forward_pre_hooks", "Logger.info"], ["block", "_forward_hooks", "Logger.debug"]]


def _model() -> nn.Module:
    """A model with the user's own hooks: a forward-pre hook on the root, a forward hook inside."""
    model = zoo.InplaceResidualNet()
    model.register_forward_pre_hook(USER.info)
    model.block.register_forward_hook(USER.debug)
    return model


def _hooks(model: nn.Module, keep: Callable[[Any], bool] = lambda hook: True) -> list[tuple[str, str, Any]]:
    return [
        (name, kind, hook)
        for name, module in model.named_modules()
        for kind in ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")
        for hook in getattr(module, kind).values()
        if keep(hook)
    ]


def _flags(model: nn.Module) -> list[tuple[str, str, int]]:
    return [(name, kind, len(getattr(module, kind))) for name, module in model.named_modules() for kind in HOOK_DICTS]


def _saved(model: nn.Module) -> bytes:
    buffer = io.BytesIO()
    torch.save(model, buffer)
    return buffer.getvalue()


def _load_without_hooktrace(tmp_path: Path, payload: bytes, suffix: str) -> dict[str, Any]:
    path = tmp_path / f"model{suffix}"
    path.write_bytes(payload)
    result = subprocess.run(
        [sys.executable, "-I", "-c", LOADER, str(REPO), str(path)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def _train(model: nn.Module, steps: int, start: int = 0) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for step in range(start, start + steps):
        opt.zero_grad()
        model(zoo.make_batch(step, model)).pow(2).mean().backward()
        opt.step()


@pytest.fixture
def attach(tmp_path: Path) -> Iterator[Callable[..., hooktrace.Agent]]:
    agents: list[hooktrace.Agent] = []

    def attach(model: nn.Module, **options: Any) -> hooktrace.Agent:
        agents.append(hooktrace.attach(model, out=str(tmp_path / "run"), metrics_port=0, **options))
        return agents[-1]

    yield attach
    for agent in agents:
        agent.close()


def test_an_attached_model_pickles_and_saves_to_the_bytes_of_the_bare_model(attach: Any) -> None:
    model = _model()
    protocols = range(2, pickle.HIGHEST_PROTOCOL + 1)
    bare_pickles, bare_flags = [pickle.dumps(model, protocol=p) for p in protocols], _flags(model)
    attach(model)
    assert _hooks(model, is_ours)  # the agent's root hooks are in the model's dicts
    assert [pickle.dumps(model, protocol=p) for p in protocols] == bare_pickles
    saved = _saved(model)
    assert b"hooktrace" not in saved
    assert _flags(torch.load(io.BytesIO(saved), weights_only=False)) == bare_flags


@pytest.mark.parametrize("backward", ["auto", "full"])
def test_a_model_saved_and_pickled_on_a_sampled_step_loads_where_hooktrace_cannot_be_imported(
    attach: Any, tmp_path: Path, backward: str
) -> None:
    model = _model()
    attach(model, sample_every=1, backward=backward)
    _train(model, 3)
    assert len(_hooks(model, is_ours)) > 2  # per-module hooks of the sampled steps are registered
    for payload, suffix in ((_saved(model), ".pt"), (pickle.dumps(model), ".pkl")):
        assert b"hooktrace" not in payload
        found = _load_without_hooktrace(tmp_path, payload, suffix)
        assert found == {"hooks": USER_HOOKS, "loaded": []}


def test_pickles_saves_and_deep_copies_made_inside_a_forward_hook_mid_step_hold_no_hooktrace_hook(
    attach: Any, tmp_path: Path
) -> None:
    model = _model()
    attach(model, sample_every=1)
    _train(model, 2)
    made: dict[str, Any] = {}

    def on_forward(module: nn.Module, args: Any, output: Any) -> None:
        if module is model.block and not made:  # the root's forward is running, its hooks active
            made["ours"] = len(_hooks(model, is_ours))
            made["pickle"], made["save"], made["copy"] = pickle.dumps(model), _saved(model), copy.deepcopy(model)

    handle = register_module_forward_hook(on_forward)  # a global hook: not part of what is pickled
    try:
        _train(model, 1, start=2)
    finally:
        handle.remove()
    assert made["ours"] > 2
    assert b"hooktrace" not in made["pickle"] and b"hooktrace" not in made["save"]
    assert _load_without_hooktrace(tmp_path, made["save"], ".pt") == {"hooks": USER_HOOKS, "loaded": []}
    assert _load_without_hooktrace(tmp_path, made["pickle"], ".pkl") == {"hooks": USER_HOOKS, "loaded": []}
    assert [(n, k, h) for n, k, h in _hooks(made["copy"])] == [
        ("", "_forward_pre_hooks", USER.info),
        ("block", "_forward_hooks", USER.debug),
    ]


def test_a_deep_copy_keeps_the_users_hooks_and_records_nothing_into_the_agent(attach: Any) -> None:
    model = _model()
    seen: list[str] = []
    model.out.register_forward_hook(
        lambda module, args, output: seen.append("copy" if module is not model.out else "model")
    )
    agent = attach(model, sample_every=1, backward="full")
    _train(model, 3)
    ema = copy.deepcopy(model)  # on a sampled step's hooks: every module carries the agent's
    assert _hooks(ema, is_ours) == []
    assert [kind for _, kind, _ in _hooks(ema)] == ["_forward_pre_hooks", "_forward_hooks", "_forward_hooks"]
    assert all(m._is_full_backward_hook is None for m in ema.modules())
    buf = agent.recorder.buf
    before = (len(buf.events), len(buf.marks), dict(buf.calls), agent.tracker.closed_steps)
    seen.clear()
    _train(ema, 2)  # the copy trains with its own optimizer
    with torch.no_grad():
        ema(zoo.make_batch(0, ema))
    assert seen == ["copy"] * 3
    assert (len(buf.events), len(buf.marks), dict(buf.calls), agent.tracker.closed_steps) == before
    _train(model, 2, start=3)
    assert agent.close().steps == 5


def test_a_shallow_copy_shares_the_hook_dicts_as_it_does_without_hooktrace(attach: Any) -> None:
    model = _model()
    attach(model)
    shallow = copy.copy(model)
    assert shallow._forward_pre_hooks is model._forward_pre_hooks
    assert shallow._forward_hooks is model._forward_hooks


def test_a_model_that_cannot_be_pickled_bare_fails_with_its_own_error(attach: Any) -> None:
    model = _model()
    model.transform = lambda x: x  # a local lambda: pickle cannot name it
    with pytest.raises(Exception) as bare_pickle:
        pickle.dumps(model)
    with pytest.raises(Exception) as bare_save:
        _saved(model)
    attach(model, sample_every=1)
    _train(model, 1)
    with pytest.raises(type(bare_pickle.value)) as attached_pickle:
        pickle.dumps(model)
    with pytest.raises(type(bare_save.value)) as attached_save:
        _saved(model)
    assert str(attached_pickle.value) == str(bare_pickle.value)
    assert str(attached_save.value) == str(bare_save.value)


def test_after_detach_the_model_pickles_as_before_attach(attach: Any) -> None:
    model = _model()
    bare = pickle.dumps(model)
    agent = attach(model, sample_every=1)
    agent.detach()
    assert pickle.dumps(model) == bare
    assert _hooks(copy.deepcopy(model)) == _hooks(model)


class Chained(nn.Linear):
    """A layer whose class has a reducer of its own in ``copyreg.dispatch_table``."""


def test_a_reducer_registered_before_for_a_class_is_still_called(attach: Any) -> None:
    calls: list[nn.Module] = []

    def reducer(obj: nn.Module) -> Any:
        calls.append(obj)
        return obj.__reduce_ex__(4)

    copyreg.dispatch_table[Chained] = reducer
    try:
        model = nn.Sequential(Chained(8, 4), nn.Tanh(), nn.Linear(4, 1))
        attach(model, sample_every=1)
        _train(model, 2)
        payload = pickle.dumps(model)
        assert calls == [model[0]] and b"hooktrace" not in payload
        assert _hooks(pickle.loads(payload)) == []
    finally:
        del copyreg.dispatch_table[Chained]
