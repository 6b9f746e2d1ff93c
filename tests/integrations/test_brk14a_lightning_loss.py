"""GradflowCallback's window losses are the loss ``training_step`` returned, also under gradient
accumulation, where Lightning hands ``on_train_batch_end`` the loss divided by
``accumulate_grad_batches`` (its documented normalization), and when a
``GradientAccumulationScheduler`` changes that divisor between epochs (brk14a)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

pl = pytest.importorskip("lightning.pytorch")

from gradflow.integrations.lightning import GradflowCallback  # noqa: E402


class Net(pl.LightningModule):
    """Keeps each loss its training_step returned (the oracle)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        self.returned: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.body(x), y)
        self.returned.append(loss.item())
        return {"loss": loss}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def loader():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 4, generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x[:, :1] * 3), batch_size=4)


CASES = [   # (trainer arguments, micro-batches in each window of 2 optimizer steps; 8 per epoch)
    pytest.param(lambda: dict(accumulate_grad_batches=4, max_epochs=2), [8, 8], id="accumulate_4"),
    pytest.param(lambda: dict(callbacks=[pl.callbacks.GradientAccumulationScheduler({0: 1, 1: 4})], max_epochs=2),
                 [2, 2, 2, 2, 8], id="accumulation_scheduler_1_then_4"),
]


@pytest.mark.parametrize("trainer_args,per_window", CASES)
def test_window_losses_are_the_returned_losses_not_divided_by_the_accumulation(trainer_args, per_window):
    torch.manual_seed(0)
    model, callback = Net(), GradflowCallback(every_n_steps=2, verbose=False, histograms=False,
                                              weights=False, activations=False)
    args = trainer_args()
    args["callbacks"] = [*args.get("callbacks", []), callback]
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, **args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, loader())
    expected, start = [], 0
    for n in per_window:
        expected.append(sum(model.returned[start:start + n]) / n)
        start += n
    assert start == len(model.returned)
    assert callback.losses == pytest.approx(expected, rel=1e-6)
