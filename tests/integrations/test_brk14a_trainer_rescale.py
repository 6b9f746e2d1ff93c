"""GradflowTrainerCallback records the gradient the optimizer step applies, also when a callback
after it changes the gradient in ``on_pre_optimizer_step`` (it recorded before that one ran:
total norm 0.5 where the step applied 0.125). Oracle: a step pre-hook registered last on the torch
optimizer, float64 (brk14a)."""

from __future__ import annotations

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from gradflow.integrations.transformers import GradflowTrainerCallback  # noqa: E402


class Rescale(transformers.TrainerCallback):
    """Another callback scaling the gradient by 0.25 right before the step."""

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(0.25)


class Oracle(transformers.TrainerCallback):
    """Each step's applied gradient: a pre-hook on the torch optimizer, registered last."""

    def __init__(self) -> None:
        self.norms: list[dict[str, float]] = []

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        def read(*_):
            self.norms.append({n: p.grad.double().norm().item() for n, p in model.named_parameters()
                               if p.grad is not None})
        optimizer.optimizer.register_step_pre_hook(read)


@pytest.mark.filterwarnings("ignore:GradflowTrainerCallback writes no TensorBoard")   # true: report_to=[]
@pytest.mark.parametrize("order", ["monitor_first", "monitor_last"])
def test_a_callback_that_rescales_before_the_step_is_seen(tmp_path, order):
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=50, n_positions=8,
                                     bos_token_id=0, eos_token_id=0)
    ids = torch.randint(0, 50, (16, 8), generator=torch.Generator().manual_seed(0))
    callback, oracle = GradflowTrainerCallback(verbose=False, histograms=False, activations=False), Oracle()
    callbacks = [callback, Rescale(), oracle] if order == "monitor_first" else [Rescale(), callback, oracle]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=4,
                                          logging_steps=2, max_grad_norm=0.5, report_to=[], use_cpu=True,
                                          save_strategy="no", disable_tqdm=True)
    trainer = transformers.Trainer(model=transformers.GPT2LMHeadModel(config), args=args,
                                   train_dataset=[{"input_ids": r, "labels": r} for r in ids], callbacks=callbacks)
    trainer.train()
    assert len(oracle.norms) == 4 and [w.step for w in callback.monitor.history] == [2, 4]
    for window, steps in zip(callback.monitor.history, (oracle.norms[:2], oracle.norms[2:])):
        total = sum(math.sqrt(sum(v * v for v in s.values())) for s in steps) / 2
        assert window.overall["total_norm"] == pytest.approx(total, rel=1e-6)
        for name, row in window.gradients.items():
            assert row["norm"] == pytest.approx(sum(s[name] for s in steps) / 2, rel=1e-5), name
