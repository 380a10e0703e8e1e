"""The agent never changes the training's numbers: same seeded run, same losses, bit for bit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from torch import nn

import hooktrace
from tests import zoo

MODELS = {
    "inplace_relu": zoo.InplaceReLUNet,
    "inplace_residual": zoo.InplaceResidualNet,
    "weight_tying": zoo.TiedNet,
    "block_called_twice": zoo.TwiceNet,
    "dict_outputs": zoo.DictNet,
    "frozen_parameters": zoo.FrozenNet,
    "checkpointing": zoo.CheckpointNet,
}


def _attach(tmp_path: Path, **options: Any):  # type: ignore[no-untyped-def]
    def attach(model: nn.Module) -> hooktrace.Agent:
        return hooktrace.attach(model, out=str(tmp_path), metrics_port=0, sample_every=2, **options)

    return attach


@pytest.mark.parametrize("backward", ["auto", "full"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_losses_are_bit_identical_with_and_without_the_agent(name: str, backward: str, tmp_path: Path) -> None:
    factory = MODELS[name]
    bare, _ = zoo.train(factory)
    traced, agent = zoo.train(factory, attach=_attach(tmp_path, backward=backward))
    summary = agent.close()
    assert traced == bare
    assert summary.steps == 6
    assert summary.ranks[0]["hook_errors"] == 0


@pytest.mark.parametrize(("accumulate", "two_optimizers"), [(3, False), (1, True), (2, True)])
def test_accumulation_and_two_optimizers_keep_losses_and_count_optimizer_steps(
    accumulate: int, two_optimizers: bool, tmp_path: Path
) -> None:
    bare, _ = zoo.train(zoo.TwiceNet, accumulate=accumulate, two_optimizers=two_optimizers)
    traced, agent = zoo.train(
        zoo.TwiceNet, attach=_attach(tmp_path), accumulate=accumulate, two_optimizers=two_optimizers
    )
    summary = agent.close()
    assert traced == bare
    assert summary.steps == 6
    assert summary.ranks[0]["micro_batches"] == 6 * accumulate
