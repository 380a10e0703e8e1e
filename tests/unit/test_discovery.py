"""Zero-code discovery: training calls make roots, eval calls do not; torch.compile never warns."""

from __future__ import annotations

import copy
import json
import pickle
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.modules import module as module_mod

from hooktrace._record.discovery import Discovery
from tests import zoo

COMPILE_WARNING = "global hooks on modules"


def _raise(exc: BaseException) -> None:
    raise exc


def _discovery(adopted: list[nn.Module]) -> Discovery:
    """A discovery whose roots go into ``adopted`` (their submodules count as known)."""

    def known(module: nn.Module) -> bool:
        return any(module is m for root in adopted for m in root.modules())

    return Discovery(
        adopt=lambda module, args: adopted.append(module), busy=lambda: False, known=known, on_error=_raise
    )


@pytest.fixture
def found() -> Iterator[tuple[Discovery, list[nn.Module]]]:
    adopted: list[nn.Module] = []
    discovery = _discovery(adopted)
    discovery.enable()
    yield discovery, adopted
    discovery.close()
    torch._dynamo.reset()


def _step(model: nn.Module) -> None:
    model(torch.randn(4, 8)).pow(2).mean().backward()


def test_a_module_called_without_gradients_becomes_a_root_only_at_its_first_training_call(
    found: tuple[Discovery, list[nn.Module]],
) -> None:
    _, adopted = found
    model = zoo.TwiceNet()
    with torch.no_grad():
        model(torch.randn(4, 8))  # a validation pass before training, or an EMA copy
    with torch.inference_mode():
        model(torch.randn(4, 8))
    assert adopted == []
    _step(model)
    assert adopted == [model]


def test_a_module_without_trainable_parameters_is_never_a_root(found: tuple[Discovery, list[nn.Module]]) -> None:
    _, adopted = found
    frozen = zoo.TwiceNet().requires_grad_(False)
    frozen(torch.randn(4, 8))
    model = zoo.TwiceNet()
    _step(model)
    assert adopted == [model]


def test_torch_compile_retires_the_global_hook_before_the_first_call_so_nothing_warns(
    found: tuple[Discovery, list[nn.Module]],
) -> None:
    discovery, adopted = found
    assert module_mod._has_any_global_hook()
    compiled = torch.compile(zoo.TwiceNet(), backend="eager")
    assert not module_mod._has_any_global_hook()  # gone before the compiled module's first call
    with torch.no_grad():
        compiled(torch.randn(4, 8))  # warnings are errors in tests: the compile warning would fail
    assert adopted == [] and discovery.retired
    _step(compiled)
    assert adopted == [compiled]
    assert len(compiled._forward_pre_hooks) == 0  # its own watch hook left with the adoption
    discovery.enable()  # the agent re-enables discovery on sampled steps: no global hook comes back
    assert not module_mod._has_any_global_hook()
    _step(compiled)


@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf")  # dynamo's own
def test_a_compiled_submodule_leaves_the_outer_model_as_the_root(found: tuple[Discovery, list[nn.Module]]) -> None:
    _, adopted = found
    model = zoo.TwiceNet()
    model.block = torch.compile(model.block, backend="eager")
    assert not module_mod._has_any_global_hook()
    assert len(model._forward_pre_hooks) == 1  # watched on its own: the root to be
    copied = copy.deepcopy(model)  # an EMA copy made now carries no hook of discovery's
    assert b"hooktrace" not in pickle.dumps(model)
    with torch.no_grad():
        model(torch.randn(4, 8))
        copied(torch.randn(4, 8))
    _step(model)
    assert adopted == [model]
    assert len(copied._forward_pre_hooks) == 0


def test_a_module_compiled_before_discovery_started_retires_it_at_its_first_call() -> None:
    compiled = torch.compile(zoo.TwiceNet(), backend="eager")
    adopted: list[nn.Module] = []
    discovery = _discovery(adopted)
    discovery.enable()
    try:
        with pytest.warns(UserWarning, match=COMPILE_WARNING):  # the hook exists at this call
            _step(compiled)
        assert adopted == [compiled] and discovery.retired
        assert not module_mod._has_any_global_hook()
        _step(compiled)  # no warning any more
    finally:
        discovery.close()
        torch._dynamo.reset()


def test_a_model_compiled_while_disabled_is_adopted_once_enabled_again(
    found: tuple[Discovery, list[nn.Module]],
) -> None:
    discovery, adopted = found
    discovery.disable()  # an unsampled step
    compiled = torch.compile(zoo.TwiceNet(), backend="eager")
    _step(compiled)
    assert adopted == [] and len(compiled._forward_pre_hooks) == 0
    discovery.enable()
    assert not module_mod._has_any_global_hook()
    _step(compiled)
    assert adopted == [compiled]


def test_close_removes_every_hook_of_discovery(found: tuple[Discovery, list[nn.Module]]) -> None:
    discovery, _ = found
    before = len(module_mod._global_module_registration_hooks)
    compiled = torch.compile(zoo.TwiceNet(), backend="eager")
    assert len(compiled._forward_pre_hooks) == 1
    discovery.close()
    assert len(compiled._forward_pre_hooks) == 0
    assert len(module_mod._global_module_registration_hooks) == before - 1
    assert not module_mod._has_any_global_hook()


SCRIPT = """
import copy, sys
import torch
from torch import nn

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))
train = torch.compile(model, backend="eager") if sys.argv[1] == "compiled" else model
opt = torch.optim.SGD(model.parameters(), lr=0.1)
with torch.no_grad():
    train(torch.randn(4, 8))  # a validation pass before training
ema = None
for step in range(6):
    opt.zero_grad()
    train(torch.randn(4, 8)).pow(2).mean().backward()
    opt.step()
    if ema is None:
        ema = copy.deepcopy(train).requires_grad_(False)  # made after hooktrace found the model
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p, 0.1)
        ema(torch.randn(4, 8))
kinds = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")
hooks = [h for m in ema.modules() for kind in kinds for h in getattr(m, kind).values()]
print("ema hooks from hooktrace:", sum("hooktrace" in getattr(h, "__module__", "") for h in hooks))
torch.save(train, sys.argv[2])
"""


@pytest.mark.parametrize(
    ("mode", "modules"), [("compiled", {"OptimizedModule"}), ("plain", {"Sequential", "0", "1", "2"})]
)
def test_hooktrace_run_finds_the_trained_model_not_its_ema_copy_nor_eval_calls_and_compile_never_warns(
    tmp_path: Path, mode: str, modules: set[str]
) -> None:
    script, out, saved = tmp_path / "train.py", tmp_path / "run", tmp_path / "model.pt"
    script.write_text(SCRIPT)
    result = subprocess.run(
        [sys.executable, "-m", "hooktrace.cli.main", "run", "--metrics-port", "0", "--out", str(out),
         "--sample-every", "2", str(script), mode, str(saved)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert COMPILE_WARNING not in result.stderr
    assert "ema hooks from hooktrace: 0" in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 6
    assert {row["module"] for row in summary["modules"]} == modules  # one root: no EMA
    assert b"hooktrace" not in saved.read_bytes()
