"""One GradflowCallback in a second fit on a new Trainer (fine-tuning after pre-training): the
windows are labelled by that Trainer's ``global_step`` (as its own logged metrics are), and the
verdict's losses are that fit's, not the first fit's too (they were labelled 17.. where the new
Trainer logged 1..; 5 losses went with 1 window). Resuming from a checkpoint still carries the
count and the losses on (brk14a)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

pl = pytest.importorskip("lightning.pytorch")

from gradflow.integrations.lightning import GradflowCallback  # noqa: E402


class Net(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.body(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def loader():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 4, generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x[:, :1] * 3), batch_size=4)


def fit(model, callback, tmp_path, ckpt_path=None, **args):
    args.setdefault("max_epochs", 1)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[callback], default_root_dir=str(tmp_path), **args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, loader(), ckpt_path=ckpt_path)
    return trainer


def quiet():
    return GradflowCallback(every_n_steps=4, verbose=False, histograms=False, activations=False, weights=False)


def test_a_second_fit_on_a_new_trainer_is_labelled_and_judged_as_that_fit(tmp_path):
    torch.manual_seed(0)
    model, callback = Net(), quiet()
    fit(model, callback, tmp_path, enable_checkpointing=False)
    assert callback.steps == 8 and len(callback.losses) == 2
    second = fit(model, callback, tmp_path, enable_checkpointing=False)
    assert [w.step for w in callback.monitor.history] == [4, 8] and second.global_step == 8
    assert callback.steps == 8 and len(callback.losses) == 2 == len(callback.monitor.history)


def test_resuming_from_a_checkpoint_carries_the_count_and_losses_on(tmp_path):
    torch.manual_seed(0)
    model, callback = Net(), quiet()
    first = fit(model, callback, tmp_path)
    path = first.checkpoint_callback.best_model_path
    resumed = quiet()
    fit(Net(), resumed, tmp_path, ckpt_path=path, max_epochs=2)
    assert [w.step for w in resumed.monitor.history] == [12, 16] and resumed.steps == 16
    assert resumed.losses[:2] == pytest.approx(callback.losses) and len(resumed.losses) == 4
