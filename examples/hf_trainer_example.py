"""GradflowTrainerCallback in a Hugging Face Trainer run: a tiny GPT-2 built from a config (nothing
is downloaded) learning to repeat a pattern; a few seconds on a CPU.

    python examples/hf_trainer_example.py                # events in runs/hf_trainer_example/runs/
    tensorboard --logdir runs/hf_trainer_example
"""

import sys

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from gradflow.integrations.transformers import GradflowTrainerCallback

if __name__ == "__main__":
    output_dir = sys.argv[1] if len(sys.argv) > 1 else "runs/hf_trainer_example"
    torch.manual_seed(0)
    torch.set_num_threads(1)       # a tiny model: extra threads only spin
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config)
    rows = (torch.arange(16)[None, :] + torch.randint(0, 64, (256, 1))) % 64        # counting sequences
    data = [{"input_ids": r, "labels": r} for r in rows]
    args = TrainingArguments(output_dir=output_dir, max_steps=40, per_device_train_batch_size=8,
                             gradient_accumulation_steps=2, max_grad_norm=1.0, learning_rate=3e-3,
                             logging_steps=5, report_to=["tensorboard"], save_strategy="no", use_cpu=True,
                             disable_tqdm=True)
    callback = GradflowTrainerCallback()
    Trainer(model=model, args=args, train_dataset=data, callbacks=[callback]).train()
    print(callback.diagnosis.report())
