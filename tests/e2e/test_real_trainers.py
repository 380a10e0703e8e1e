"""Real trainers under `hooktrace run`: a Hugging Face `Trainer` and a PyTorch Lightning `Trainer.fit`,
each run under plain python and under hooktrace. The losses stay bit-identical, and hooktrace's
per-step gradient norm is the one the trainer itself saw before clipping.

The scripts are tests/scripts/hf_trainer.py and tests/scripts/lightning_fit.py (the dev extras
install transformers, accelerate and lightning).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.twice import SCRIPTS, Runs, run_both

STEPS = 30


def _log(runs: Runs, run_dir: Path, name: str) -> Any:
    runs.assert_both_succeeded()
    return json.loads((run_dir / name).read_text())


def test_a_hugging_face_trainer_logs_the_same_losses_and_its_grad_norm_is_hooktraces(tmp_path: Path) -> None:
    runs = run_both(tmp_path, SCRIPTS / "hf_trainer.py", "--steps", str(STEPS), "--log", "log_history.json")
    plain = [e for e in _log(runs, runs.plain_dir, "log_history.json") if "loss" in e]
    traced = [e for e in _log(runs, runs.traced_dir, "log_history.json") if "loss" in e]
    assert [e["step"] for e in plain] == list(range(1, STEPS + 1))
    assert [e["loss"] for e in traced] == [e["loss"] for e in plain]  # bit-identical floats
    assert [e["grad_norm"] for e in traced] == [e["grad_norm"] for e in plain]
    steps = runs.steps()
    assert [s["step"] for s in steps] == list(range(1, STEPS + 1))
    # the Trainer logs the norm that clip_grad_norm_(max_grad_norm=1.0) returned: before clipping
    assert [s["grad_norm"] for s in steps] == pytest.approx([e["grad_norm"] for e in plain], rel=1e-5)


def test_lightning_fit_with_clipping_keeps_its_losses_and_hooktrace_sees_the_closure_and_pre_clip_norm(
    tmp_path: Path,
) -> None:
    runs = run_both(tmp_path, SCRIPTS / "lightning_fit.py", "--steps", str(STEPS), "--log", "log.json")
    plain = _log(runs, runs.plain_dir, "log.json")
    traced = _log(runs, runs.traced_dir, "log.json")
    assert len(plain["losses"]) == len(plain["norms"]) == STEPS
    assert traced["losses"] == plain["losses"]  # bit-identical floats
    assert traced["norms"] == plain["norms"]
    steps = runs.steps()
    assert [s["step"] for s in steps] == list(range(1, STEPS + 1))
    # Lightning runs forward and backward inside optimizer.step(closure)
    not_in_closure = [(s["step"], s.get("closure"), s.get("partial")) for s in steps if s.get("closure") is not True]
    assert not not_in_closure, f"(step, closure, partial) of the steps without closure: true: {not_in_closure}"
    no_phase = [
        (s["step"], s["phases"]) for s in steps if not (s["phases"].get("forward") and s["phases"].get("backward"))
    ]
    assert not no_phase, f"steps without forward or backward time: {no_phase}"
    # the norm on_before_optimizer_step took: after the closure's backward, before Lightning clips to 0.5
    assert [s.get("grad_norm") for s in steps] == pytest.approx(plain["norms"], rel=1e-5)
