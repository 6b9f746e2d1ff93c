"""record_if_synced in a custom accelerate loop with gradient accumulation and clipping: one record
per optimizer step, equal to an oracle read from p.grad just before ``optimizer.step()`` on the
synced micro-batch, read back from TensorBoard."""

from __future__ import annotations

import pytest
import torch
from torch import nn

accelerate = pytest.importorskip("accelerate")

from oracle_tools import compare, grad_row, tensorboard, windows  # noqa: E402

from gradflow import GradientMonitor  # noqa: E402
from gradflow.integrations.accelerate import record_if_synced  # noqa: E402


@pytest.mark.parametrize("clip", ["clip_grad_norm_", "clip_grad_value_"])
def test_records_once_per_accumulation_cycle(tmp_path, clip):
    """accelerate's clip_grad_norm_ clips through get_total_norm + clip_grads_with_norm_ (1.16) and
    its clip_grad_value_ through torch's: the norm before clipping is the oracle's, from p.grad."""
    from torch.utils.tensorboard import SummaryWriter

    torch.manual_seed(0)
    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    data = torch.utils.data.TensorDataset(torch.randn(32, 4), torch.randn(32, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer, loader = accelerator.prepare(model, optimizer, torch.utils.data.DataLoader(data, batch_size=4))
    records, before, synced = [], [], 0
    with SummaryWriter(str(tmp_path)) as writer:
        monitor = GradientMonitor(accelerator.unwrap_model(model), writer, automatic=False)
        for step, (x, y) in enumerate(loader):
            with accelerator.accumulate(model):
                accelerator.backward(nn.functional.mse_loss(model(x), y))
                if accelerator.sync_gradients:
                    before.append(grad_row(accelerator.unwrap_model(model))[""]["total_norm"])
                    getattr(accelerator, clip)(model.parameters(), 0.1 if clip == "clip_grad_norm_" else 0.01)
                    records.append(grad_row(accelerator.unwrap_model(model)))
                synced += record_if_synced(monitor, accelerator, optimizer)
                optimizer.step()
                optimizer.zero_grad()
            if synced and synced % 2 == 0 and step % 2 == 1:
                monitor.log(synced)
        monitor.remove()
    assert synced == len(records) == 4
    assert [w.steps for w in monitor.history] == [2, 2]
    assert compare(windows(records, [2, 4]), tensorboard(str(tmp_path))) < 1e-5
    for window, norms in zip(monitor.history, (before[:2], before[2:])):
        assert window.overall["clipped_steps"] == 2        # every step clips: the limits are far below
        assert window.overall["total_norm_before_clip"] == pytest.approx(sum(norms) / 2, rel=1e-6)
