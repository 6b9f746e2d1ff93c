"""GradflowCallback records the gradient each optimizer step applies, once per step (break test brk5c).

Lightning calls ``on_before_optimizer_step`` before its own ``gradient_clip_val`` clipping, and
once per closure evaluation (LBFGS evaluates several in one step). The oracle: every ``p.grad``
in float64 at the optimizer's step post-hook (registered at train start: ``.grad`` there holds
what the step applied), and the L2 norm of the raw gradients in ``on_before_optimizer_step``
(the norm before clipping).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

pl = pytest.importorskip("lightning.pytorch")

from oracle_tools import grad_row, windows  # noqa: E402

from gradflow.integrations.lightning import GradflowCallback  # noqa: E402


class Net(pl.LightningModule):
    def __init__(self, optimizer: str = "sgd") -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        self.optimizer = optimizer

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.body(x), y)

    def configure_optimizers(self):
        if self.optimizer == "lbfgs":
            return torch.optim.LBFGS(self.parameters(), lr=0.1, max_iter=4)
        return torch.optim.SGD(self.parameters(), lr=0.05)


class Oracle(pl.Callback):
    def __init__(self) -> None:
        self.applied: list[dict] = []
        self.raw: list[float] = []

    def on_train_start(self, trainer, pl_module):
        trainer.optimizers[0].register_step_post_hook(lambda *_: self.applied.append(grad_row(pl_module)))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.raw.append(grad_row(pl_module)[""]["total_norm"])


def fit(model, callbacks, batches: int = 9, **trainer_args):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4 * batches, 4, generator=g) * 3
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x[:, :1] ** 2), batch_size=4)
    trainer = pl.Trainer(max_epochs=1, logger=False, callbacks=callbacks, accelerator="cpu", devices=1,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         **trainer_args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, data)
    return trainer


@pytest.mark.parametrize("algorithm, limit", [("norm", 0.5), ("value", 0.05)])
def test_the_rows_are_the_clipped_gradient_the_step_applied(algorithm, limit):
    torch.manual_seed(0)
    oracle, callback = Oracle(), GradflowCallback(every_n_steps=2, verbose=False, activations=False)
    fit(Net(), [oracle, callback], accumulate_grad_batches=3, gradient_clip_val=limit,
        gradient_clip_algorithm=algorithm)
    assert len(oracle.applied) == callback.steps == 3                   # 9 batches accumulated by 3
    expected = windows(oracle.applied, [2, 3])
    for window, label, raw in zip(callback.monitor.history, (2, 3), (oracle.raw[:2], oracle.raw[2:])):
        for name, row in window.gradients.items():
            for key in ("mean_abs", "norm", "max_abs"):
                assert row[key] == pytest.approx(expected[label][name][key], rel=1e-6), (name, key)
            if algorithm == "value":
                assert row["max_abs"] <= limit * (1 + 1e-6)
        overall = window.overall
        assert overall["total_norm"] == pytest.approx(expected[label][""]["total_norm"], rel=1e-6)
        assert overall["total_norm_before_clip"] == pytest.approx(sum(raw) / len(raw), rel=1e-6)
        assert overall["clipped_steps"] == overall["steps"] == len(raw)
        assert overall["total_norm_before_clip"] > 2 * overall["total_norm"]     # the verdict's excess sees it


def test_lbfgs_records_once_per_step_not_per_closure_evaluation():
    torch.manual_seed(0)
    oracle, callback = Oracle(), GradflowCallback(every_n_steps=100, verbose=False, activations=False)
    fit(Net("lbfgs"), [oracle, callback], batches=3)
    assert len(oracle.applied) == 3 and len(oracle.raw) > 3                # several evaluations per step
    assert callback.steps == 3 and [w.steps for w in callback.monitor.history] == [3]
