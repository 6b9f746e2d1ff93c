"""``grad/total_norm_before_clip`` under Lightning's ``gradient_clip_val`` is the mean over the
window's steps with a clipping call, those under the limit included, as the callback's key table
now says (it said: over the steps that clipped, 8.02 where 6.61 was written) (brk14a)."""

from __future__ import annotations

import math
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
        self.raw: list[float] = []     # the oracle: each step's norm before Lightning clips

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.body(x), y)

    def on_before_optimizer_step(self, optimizer):
        self.raw.append(math.sqrt(sum(p.grad.double().pow(2).sum().item() for p in self.parameters())))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_the_norm_before_clipping_is_the_mean_over_every_step_with_a_clip_call():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 4, generator=g)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x[:, :1] * 3), batch_size=4)
    torch.manual_seed(0)
    model, callback = Net(), GradflowCallback(every_n_steps=8, verbose=False, histograms=False, activations=False)
    limit = 5.0                      # between the steps' norms: some steps clip, some do not
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[callback],
                         gradient_clip_val=limit)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, data)
    overall = callback.monitor.history[-1].overall
    clipped = [n for n in model.raw if n > limit]
    assert overall["clip_calls"] == len(model.raw) == 8 and overall["clipped_steps"] == len(clipped)
    assert 0 < len(clipped) < 8
    assert overall["total_norm_before_clip"] == pytest.approx(sum(model.raw) / len(model.raw), rel=1e-6)
