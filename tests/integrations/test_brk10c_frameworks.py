"""Clipping through the frameworks, in cases the other integration tests do not run (break test
brk10c; lightning 2.6.6, transformers 5.25.0, accelerate 1.16.0, torch 2.13.0).

The oracle: the L2 norm, in float64 from ``p.grad``, of the gradients just before the
framework's clipping call (Lightning: in ``on_before_optimizer_step``, or in ``training_step``
before ``self.clip_gradients``; accelerate: before ``accelerator.clip_grad_norm_``; the Trainer:
the ``grad_norm`` its clipping returned), and the norm after it, read at the step.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn


def l2(params) -> float:
    return math.sqrt(sum(float(p.grad.double().square().sum()) for p in params if p.grad is not None))


# -- accelerate: clip_grad_norm_ by any norm_type ------------------------------------------------

def test_accelerate_clip_grad_norm_by_any_norm_type_gives_the_l2_norm_before_clipping():
    """accelerate 1.16 clips ``norm_type=0`` with a total made by hand (no get_total_norm call):
    the monitor took it for the L2 norm (4.0, the count of non-zero gradient tensors, where the
    L2 norm was 1.93). Other norm types go through get_total_norm(norm_type)."""
    accelerate = pytest.importorskip("accelerate")
    from gradflow import GradientMonitor
    from gradflow.integrations.accelerate import record_if_synced

    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2)
    for norm_type in (0, 1, math.inf):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        data = torch.utils.data.TensorDataset(torch.randn(16, 4), torch.randn(16, 1))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        model, optimizer, loader = accelerator.prepare(model, optimizer, torch.utils.data.DataLoader(data, batch_size=4))
        monitor = GradientMonitor(accelerator.unwrap_model(model), None, automatic=False, activations=False)
        before = []
        for x, y in loader:
            with accelerator.accumulate(model):
                accelerator.backward(nn.functional.mse_loss(model(x), y))
                if accelerator.sync_gradients:
                    before.append(l2(model.parameters()))
                    accelerator.clip_grad_norm_(model.parameters(), 1e-3, norm_type=norm_type)
                record_if_synced(monitor, accelerator, optimizer)
                optimizer.step()
                optimizer.zero_grad()
        monitor.log(0)
        monitor.remove()
        overall = monitor.history[-1].overall
        assert overall["steps"] == overall["clip_calls"] == overall["clipped_steps"] == len(before) == 2, norm_type
        assert overall["total_norm_before_clip"] == pytest.approx(sum(before) / 2, rel=1e-6), norm_type


# -- the Hugging Face Trainer ------------------------------------------------------------------------

def trainer_run(tmp_path, max_grad_norm: float, accumulation: int, freeze: bool = False):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from gradflow.integrations.transformers import GradflowTrainerCallback

    class Applied(transformers.TrainerCallback):          # the gradient the step applies: after clipping
        def __init__(self) -> None:
            self.norms: list[float] = []

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            self.norms.append(l2(model.parameters()))

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16,
                                     bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config)
    if freeze:                                            # frozen position embeddings: no gradient
        model.transformer.wpe.weight.requires_grad_(False)
    ids = torch.randint(0, 50, (8 * accumulation, 8), generator=torch.Generator().manual_seed(0))
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=accumulation,
        max_grad_norm=max_grad_norm, max_steps=4, logging_steps=4, learning_rate=1e-3, report_to=[], use_cpu=True,
        save_strategy="no", disable_tqdm=True, seed=0)
    applied, callback = Applied(), GradflowTrainerCallback(verbose=False, activations=False, histograms=False)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=[{"input_ids": r, "labels": r} for r in ids],
                                   callbacks=[applied, callback])
    grad_norms = []
    clip = trainer.accelerator.clip_grad_norm_

    def recording_clip(*a, **k):                           # the Trainer's own grad_norm, as it computes it
        norm = clip(*a, **k)
        grad_norms.append(float(norm))
        return norm
    trainer.accelerator.clip_grad_norm_ = recording_clip
    trainer.train()
    return callback.monitor.history[-1].overall, grad_norms, applied.norms


def test_trainer_without_clipping_reports_no_clipping_though_it_computes_the_norm(tmp_path):
    """max_grad_norm=0: the Trainer still computes grad_norm each step (accelerator.clip_grad_norm_
    with max_norm inf: get_total_norm, no clip_grads_with_norm_). Nothing was clipped, so no
    clipping columns; total_norm is the Trainer's grad_norm."""
    overall, grad_norms, applied = trainer_run(tmp_path, 0.0, 1)
    assert len(grad_norms) == overall["steps"] == 4
    assert not {"total_norm_before_clip", "clipped_steps", "clip_calls"} & set(overall)
    assert overall["total_norm"] == pytest.approx(sum(applied) / 4, rel=1e-6)
    assert overall["total_norm"] == pytest.approx(sum(grad_norms) / 4, rel=1e-5)


def test_trainer_clipping_accumulated_steps_with_a_frozen_layer(tmp_path):
    """max_grad_norm 0.05 (every step clips), 3 micro-batches per step, a frozen embedding: one
    clipping call per optimizer step, whose norm is the Trainer's grad_norm."""
    overall, grad_norms, applied = trainer_run(tmp_path, 0.05, 3, freeze=True)
    assert len(grad_norms) == overall["steps"] == overall["clip_calls"] == overall["clipped_steps"] == 4
    assert min(grad_norms) > 0.05
    assert overall["total_norm_before_clip"] == pytest.approx(sum(grad_norms) / 4, rel=1e-5)
    assert overall["total_norm"] == pytest.approx(sum(applied) / 4, rel=1e-6)


# -- Lightning ---------------------------------------------------------------------------------------

def lightning_fit(module, callbacks_before=(), **trainer_args):
    pl = pytest.importorskip("lightning.pytorch")
    from gradflow.integrations.lightning import GradflowCallback

    class Raw(pl.Callback):                               # before Lightning's gradient_clip_val clips
        def __init__(self) -> None:
            self.norms: list[float] = []

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            self.norms.append(l2(pl_module.parameters()))

    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 4, generator=g) * 3
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x[:, :1] ** 2), batch_size=8)
    raw, callback = Raw(), GradflowCallback(every_n_steps=100, verbose=False, activations=False, histograms=False)
    trainer = pl.Trainer(max_epochs=1, logger=False, callbacks=[*callbacks_before, raw, callback], accelerator="cpu",
                         devices=1,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         **trainer_args)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        trainer.fit(module, data)
    ours = [str(w.message) for w in said if "gradflow" in w.filename or "total_norm" in str(w.message)]
    assert not ours, ours          # Lightning unscales before it clips: nothing to say
    return callback.monitor.history[-1].overall, raw.norms


def lightning_module(manual: bool = False, freeze: bool = False):
    pl = pytest.importorskip("lightning.pytorch")

    class Net(pl.LightningModule):
        """A Tanh MLP; manual: two optimizers (body, head), each clipped by self.clip_gradients."""

        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh())
            self.head = nn.Linear(8, 1)
            self.automatic_optimization = not manual
            self.before: list[float] = []
            if freeze:
                self.body[0].requires_grad_(False)

        def training_step(self, batch, batch_idx):
            x, y = batch
            if self.automatic_optimization:
                return nn.functional.mse_loss(self.head(self.body(x)).float(), y)
            for optimizer, part in zip(self.optimizers(), (self.body, self.head)):
                optimizer.zero_grad()
                self.manual_backward(nn.functional.mse_loss(self.head(self.body(x)), y))
                self.before.append(l2(part.parameters()))
                self.clip_gradients(optimizer, gradient_clip_val=1e-3, gradient_clip_algorithm="norm")
                optimizer.step()

        def configure_optimizers(self):
            if manual:
                return torch.optim.SGD(self.body.parameters(), lr=0.05), torch.optim.SGD(self.head.parameters(), lr=0.05)
            return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.05)

    return Net()


def test_lightning_value_clipping_under_bf16_mixed_with_a_frozen_layer():
    overall, before = lightning_fit(lightning_module(freeze=True), precision="bf16-mixed",
                                    gradient_clip_val=1e-3, gradient_clip_algorithm="value")
    assert overall["steps"] == overall["clip_calls"] == overall["clipped_steps"] == len(before) == 6
    assert overall["total_norm_before_clip"] == pytest.approx(sum(before) / 6, rel=1e-6)
    assert overall["total_norm"] < 0.1 * overall["total_norm_before_clip"]


def test_lightning_manual_optimization_two_optimizers_each_clipped():
    """Each optimizer's step clips its own parameters: one clipping step per optimizer step
    (12, over 6 training steps: ``steps`` counts training steps), each with the norm of the
    parameters that optimizer steps, as ``total_norm`` is per optimizer step."""
    module = lightning_module(manual=True)
    overall, _ = lightning_fit(module)
    assert overall["steps"] == 6 and overall["clip_calls"] == overall["clipped_steps"] == len(module.before) == 12
    assert overall["total_norm_before_clip"] == pytest.approx(sum(module.before) / 12, rel=1e-6)
    assert overall["total_norm"] == pytest.approx(1e-3, rel=1e-4)


def test_lightning_the_clip_of_a_step_the_scaler_skips_is_not_counted_in_the_next():
    """16-mixed with a GradScaler, an inf planted in the gradients of optimizer step 3: Lightning
    counts the skip at its hook and then clips (norm inf: "clipped"). That call's clipped flag was
    carried into the next step, which did not clip (clip value 100, every finite norm below 5):
    clipped_steps 1 where none of the applied steps clipped."""
    pl = pytest.importorskip("lightning.pytorch")
    from lightning.pytorch.plugins import MixedPrecision

    class Plant(pl.Callback):
        def on_after_backward(self, trainer, pl_module):
            if trainer.global_step == 2:
                next(pl_module.parameters()).grad.fill_(math.inf)

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    overall, before = lightning_fit(lightning_module(), callbacks_before=[Plant()], gradient_clip_val=100.0,
                                    plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    finite = [n for n in before if math.isfinite(n)]
    assert len(before) == 6 and len(finite) == 5 and max(finite) < 100
    assert overall["steps"] == 5 and overall["skipped_steps"] == 1
    assert overall["clip_calls"] == 5 and overall["clipped_steps"] == 0
    assert overall["total_norm_before_clip"] == pytest.approx(sum(finite) / 5, rel=1e-6)
