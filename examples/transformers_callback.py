"""A tiny GPT-2 (built from a config: nothing downloaded) trained by the Hugging Face Trainer and
reported by tensorpulse; `--nan-step N` breaks a weight at optimizer step N.

    tensorpulse broker --port 9092 &  tensorpulse stream --bootstrap 127.0.0.1:9092 &
    python examples/transformers_callback.py --nan-step 20     # ExplodingTensor fires at step 20
    tensorpulse alerts --bootstrap 127.0.0.1:9092

Needs `pip install 'tensorpulse[transformers]'`.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

from tensorpulse.producers.transformers import TensorPulseCallback


class RandomTokens(torch.utils.data.Dataset):
    """Sequences of random token ids, the same ones for the same index."""

    def __init__(self, n: int, length: int = 32, vocab: int = 128) -> None:
        self.n, self.length, self.vocab = n, length, vocab

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(0, self.vocab, (self.length,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "labels": ids}


class BreakAWeight(TrainerCallback):
    def __init__(self, step: int | None) -> None:
        self.step = step

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            with torch.no_grad():
                model.transformer.h[0].mlp.c_fc.weight[0, 0] = float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap", default="127.0.0.1:9092")
    parser.add_argument("--job", default="transformers-example")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--nan-step", type=int, default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=128, n_positions=32, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0
    )
    training = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="tensorpulse-example-"),
        max_steps=args.steps,
        per_device_train_batch_size=8,
        gradient_accumulation_steps=2,  # the step axis counts optimizer steps
        logging_steps=1,  # the Trainer's logs (loss, grad_norm, learning_rate) join every record
        eval_strategy="steps",
        eval_steps=20,  # an eval record at steps 20, 40, 60, with "eval_loss" as "loss"
        report_to=[],
        use_cpu=True,
        save_strategy="no",
    )
    trainer = Trainer(
        model=GPT2LMHeadModel(config),
        args=training,
        train_dataset=RandomTokens(1024),
        eval_dataset=RandomTokens(64),
        callbacks=[BreakAWeight(args.nan_step), TensorPulseCallback(args.job, args.bootstrap)],
    )
    trainer.train()


if __name__ == "__main__":
    main()
