"""A Hugging Face `Trainer` run: a tiny GPT-2 from a `GPT2Config` on seeded random tokens, on CPU.

Logs every step (`logging_steps=1`) with the default `max_grad_norm=1.0`, so each log entry has the
step's loss and its gradient norm before clipping. No network, no saving, no reporting. Writes
`trainer.state.log_history` as JSON to `--log`. No hooktrace import.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
warnings.filterwarnings("ignore")

import torch  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

VOCAB, LENGTH = 100, 16


class RandomTokens(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    """``count`` sequences of seeded random token ids; the labels are the inputs (a causal LM)."""

    def __init__(self, count: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, VOCAB, (count, LENGTH), generator=generator)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index], "labels": self.ids[index].clone()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--log", required=True, help="write trainer.state.log_history here (JSON)")
    args = parser.parse_args()
    hf_logging.set_verbosity_error()
    logging.getLogger("accelerate").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_positions=LENGTH, n_embd=32, n_layer=2, n_head=2)
    model = GPT2LMHeadModel(config)
    training_args = TrainingArguments(
        output_dir="trainer-out",
        max_steps=args.steps,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        logging_strategy="steps",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=RandomTokens(8 * args.steps, seed=0))
    trainer.train()
    with open(args.log, "w", encoding="utf-8") as handle:
        json.dump(trainer.state.log_history, handle)


if __name__ == "__main__":
    main()
