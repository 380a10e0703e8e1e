"""A gallery of training habits found in real scripts (tests/scripts/, one per habit), each run under
plain python and under `hooktrace run`: the same bytes printed, and the right figures in the run's
files."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.twice import SCRIPTS, printed, run_both

LOAD_WITHOUT_HOOKTRACE = """
import pickle, sys
sys.modules["hooktrace"] = None  # `import hooktrace` (and any hooktrace.*) raises ImportError here
import torch
torch.manual_seed(1)
x = torch.randn(4, 16)
for path in sys.argv[1:]:
    if path.endswith(".pt"):
        model = torch.load(path, weights_only=False)
    else:
        with open(path, "rb") as handle:
            model = pickle.loads(handle.read())
    hooks = sum(
        len(getattr(module, name))
        for module in model.modules()
        for name in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    )
    print(path.rsplit("/", 1)[-1], type(model).__name__, "output", repr(model(x).sum().item()), "hooks", hooks)
"""


def _row(summary: dict[str, Any], module: str, phase: str) -> dict[str, Any] | None:
    rows = [r for r in summary["modules"] if r["module"] == module and r["phase"] == phase and r["rank"] == 0]
    assert len(rows) <= 1, rows
    return rows[0] if rows else None


def test_torch_save_pickle_and_a_deepcopied_ema_after_attach_keep_hooktrace_out_of_the_model(tmp_path: Path) -> None:
    runs = run_both(
        tmp_path, SCRIPTS / "save_pickle_ema.py", "--steps", "20", "--save", "model.pt", "--pickle", "model.pkl"
    )
    runs.assert_same_stdout()
    for name in ("model.pt", "model.pkl"):
        assert b"hooktrace" not in (runs.traced_dir / name).read_bytes(), name

    def load(run_dir: Path) -> str:
        paths = [str(run_dir / "model.pt"), str(run_dir / "model.pkl")]
        result = subprocess.run(
            [sys.executable, "-c", LOAD_WITHOUT_HOOKTRACE, *paths], capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stderr
        return result.stdout

    loaded = load(runs.traced_dir)
    assert loaded.count("Sequential output") == 2 and loaded.count("hooks 0") == 2, loaded
    assert loaded == load(runs.plain_dir)  # the same weights as the model saved without hooktrace
    steps = runs.steps()
    assert [s["step"] for s in steps] == list(range(1, 21))  # one per optimizer step: the EMA copy adds none
    assert runs.summary()["steps"] == 20


def test_dropout_zero_and_identity_after_a_slow_layer_take_none_of_its_backward_time(tmp_path: Path) -> None:
    runs = run_both(
        tmp_path, SCRIPTS / "identity_after_slow.py", "--steps", "12", hooktrace_args=("--sample-every", "2")
    )
    runs.assert_same_stdout()
    summary = runs.summary()
    backward_rows = [r for r in summary["modules"] if r["phase"] == "backward"]
    slow, root = _row(summary, "1", "backward"), _row(summary, "Sequential", "backward")
    assert slow is not None and root is not None, backward_rows
    assert slow["self_s"] and root["total_s"], backward_rows  # steady-state sampled steps were measured
    # the big Linear is nearly all of the backward pass, and that time stays its own
    assert slow["self_s"] >= 0.5 * root["total_s"], backward_rows
    for identity in ("2", "3"):  # Dropout(0.0), Identity()
        row = _row(summary, identity, "backward")
        assert row is None or not row["self_s"], row


def test_a_scripts_clipping_leaves_the_pre_clip_norm_and_the_injected_spike_is_caught_on_its_step(
    tmp_path: Path,
) -> None:
    runs = run_both(tmp_path, SCRIPTS / "clip_spike.py", "--steps", "35", "--spike-at", "30")
    runs.assert_same_stdout()
    norms = printed(runs.plain.stdout, "norm")  # what clip_grad_norm_ returned: the norm before clipping
    assert len(norms) == 35 and min(norms) > 1.0  # so every step's clip changed the gradients
    steps = runs.steps()
    assert [s["step"] for s in steps] == list(range(1, 36))
    assert [s["grad_norm"] for s in steps] == pytest.approx(norms, rel=1e-5)
    assert [s.get("clipped_by_script") for s in steps] == [True] * 35
    spikes = [
        (s["step"], e["module"]) for s in steps for e in s["events"] if e["kind"] == "grad_spike"
    ]  # fmt: skip
    assert (30, "__total__") in spikes, spikes
    assert all(step == 30 for step, _ in spikes), spikes


def test_two_optimizers_each_get_the_norm_of_their_own_parameters_on_their_own_step(tmp_path: Path) -> None:
    runs = run_both(tmp_path, SCRIPTS / "gan.py", "--steps", "20")
    runs.assert_same_stdout()
    lines = [line.split() for line in runs.plain.stdout.splitlines()]
    stepped = [words[0] for words in lines]  # D, G, D, G, ...
    norms = printed(runs.plain.stdout, "norm")
    assert stepped == ["D", "G"] * 20
    steps = runs.steps()
    assert len(steps) == 40, [s.get("optimizer") for s in steps]
    names = {"D": steps[0].get("optimizer"), "G": steps[1].get("optimizer")}
    assert all(isinstance(n, str) and n.startswith("Adam#") for n in names.values()), names
    assert names["D"] != names["G"], names
    assert [s.get("optimizer") for s in steps] == [names[who] for who in stepped]
    assert [s["grad_norm"] for s in steps] == pytest.approx(norms, rel=1e-5)


def test_a_loop_without_torch_optim_records_a_step_per_backward_with_its_norm(tmp_path: Path) -> None:
    runs = run_both(tmp_path, SCRIPTS / "manual_update.py", "--steps", "40")
    runs.assert_same_stdout()
    norms = printed(runs.plain.stdout, "norm")
    steps = runs.steps()
    assert [s["step"] for s in steps] == list(range(1, 41))
    assert all(isinstance(s["grad_norm"], float) and math.isfinite(s["grad_norm"]) for s in steps), steps
    assert [s["grad_norm"] for s in steps] == pytest.approx(norms, rel=1e-5)
    summary = runs.summary()
    assert summary["steps"] == 40
    assert summary.get("step_source") == "backward"


def test_a_torch_compiled_model_trains_the_same_under_hooktrace(tmp_path: Path) -> None:
    runs = run_both(tmp_path, SCRIPTS / "compile_step.py", "--steps", "8")
    runs.assert_same_stdout()
    assert [s["step"] for s in runs.steps()] == list(range(1, 9))
