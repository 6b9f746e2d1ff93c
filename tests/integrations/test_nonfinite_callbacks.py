"""The Lightning and Hugging Face callbacks with ``nonfinite=True``: a NaN planted in one module at
a chosen optimizer step is named, with that step, in the verdict they print and keep."""

from __future__ import annotations

import warnings

import pytest
import torch

pl = pytest.importorskip("lightning.pytorch")
transformers = pytest.importorskip("transformers")

from test_lightning_callback import Net, loader  # noqa: E402 - after the skip / thread setting above
from test_trainer_callback import train  # noqa: E402 - after the skip / thread setting above

from gradflow.integrations.lightning import GradflowCallback  # noqa: E402 - after the skip / thread setting above
from gradflow.integrations.transformers import GradflowTrainerCallback  # noqa: E402 - after the skip / thread setting above


class PlantLightning(pl.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 3:
            with torch.no_grad():
                pl_module.body[2].bias[0] = float("nan")


def test_lightning_callback_names_the_planted_module_and_step(tmp_path, capsys):
    callback = GradflowCallback(every_n_steps=2, nonfinite=True, histograms=False)
    trainer = pl.Trainer(max_epochs=1, logger=pl.loggers.CSVLogger(str(tmp_path)), accelerator="cpu", devices=1,
                         callbacks=[PlantLightning(), callback], enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(Net(), loader())
    expected = "the first non-finite value came from body.2 (forward) at step 3"
    assert expected in callback.diagnosis.line()
    assert expected in capsys.readouterr().out


class PlantTrainer(transformers.TrainerCallback):
    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == 2:
            with torch.no_grad():
                model.transformer.h[0].mlp.c_fc.bias[0] = float("nan")


def test_trainer_callback_names_the_planted_module_and_step(tmp_path, capsys):
    callback = GradflowTrainerCallback(every_n_steps=2, nonfinite=True, histograms=False)
    train(tmp_path, [PlantTrainer(), callback], report_to=(), gradient_accumulation_steps=1)
    expected = "the first non-finite value came from transformer.h.0.mlp.c_fc (forward) at step 2"
    assert expected in callback.diagnosis.line()
    assert expected in capsys.readouterr().out
