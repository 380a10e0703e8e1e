"""A PyTorch Lightning `Trainer.fit` with `gradient_clip_val=0.5`, on CPU, random data.

Lightning runs forward and backward inside the optimizer's closure (`optimizer.step(closure)`), and
clips after `on_before_optimizer_step`, where this module takes the total gradient norm. Writes
`{"losses": [...], "norms": [...]}` (one per step) as JSON to `--log`. No hooktrace import.
"""

from __future__ import annotations

import argparse
import json
import logging
import warnings

warnings.filterwarnings("ignore")

import lightning as L  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402


class TinyRegression(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 1))
        self.losses: list[float] = []
        self.norms: list[float] = []

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.losses.append(loss.item())
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        self.norms.append(torch.nn.utils.get_total_norm(grads).item())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1e-2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--log", required=True, help="write the losses and pre-clip norms here (JSON)")
    args = parser.parse_args()
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x = torch.randn(8 * args.steps, 16)
    y = x.sum(dim=1, keepdim=True)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8, shuffle=False)
    module = TinyRegression()
    trainer = L.Trainer(
        max_steps=args.steps,
        accelerator="cpu",
        devices=1,
        gradient_clip_val=0.5,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        enable_checkpointing=False,
        default_root_dir=".",
    )
    trainer.fit(module, data)
    with open(args.log, "w", encoding="utf-8") as handle:
        json.dump({"losses": module.losses, "norms": module.norms}, handle)


if __name__ == "__main__":
    main()
