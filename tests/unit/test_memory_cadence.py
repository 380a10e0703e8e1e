"""``--memory-every``: which sampled steps count the bytes saved for backward."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from hooktrace.cli.main import cli
from hooktrace.errors import ConfigError
from tests.conftest import read_steps, train


def _measured_steps(tmp_path: Path, steps: int, **options: object) -> list[int]:
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 1))
    train(model, lambda: torch.randn(4, 8), steps, tmp_path, **options)
    return [r["step"] for r in read_steps(tmp_path) if r.get("activation_bytes")]


def test_step_one_the_next_sampled_step_then_the_sampled_step_at_or_after_each_multiple(tmp_path: Path) -> None:
    assert _measured_steps(tmp_path / "a", 26, sample_every=2, memory_every=5) == [1, 3, 5, 11, 15, 21, 25]
    assert _measured_steps(tmp_path / "b", 12, sample_every=1, memory_every=5) == [1, 2, 5, 10]


def test_every_sampled_step_with_one_and_none_with_memory_off(tmp_path: Path) -> None:
    assert _measured_steps(tmp_path / "a", 7, sample_every=3, memory_every=1) == [1, 4, 7]
    assert _measured_steps(tmp_path / "b", 7, sample_every=1, memory="off") == []


def test_the_flag_the_variable_and_the_field_agree_and_bad_values_name_the_flag(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hooktrace.config import Config

    assert Config.resolve({"memory_every": 7}).memory_every == 7
    monkeypatch.setenv("HOOKTRACE_MEMORY_EVERY", "9")
    assert Config.resolve({}).memory_every == 9
    with pytest.raises(ConfigError, match="--memory-every"):
        Config(memory_every=0)
    result = CliRunner().invoke(cli, ["run", "--memory-every", "0", str(tmp_path / "x.py")])
    assert result.exit_code == 2 and "memory" in result.output and "every" in result.output
