"""A fused optimizer told to skip its step by hand (brk15a): ``optimizer.found_inf`` (and perhaps
``optimizer.grad_scale``) set with no GradScaler. torch's fused step then applies nothing; the
monitor left the step out of the rows but did not count it in ``skipped_steps``. The oracle is the
parameter itself: the step did not change it."""

from __future__ import annotations

import pytest
import torch
from test_brk10a_optimizers import _batch, _fused
from torch import nn

from gradflow import GradientMonitor


def _step(model, optimizer, i, found, scale, scaler):
    optimizer.zero_grad()
    x, y = _batch(i)
    loss = nn.functional.mse_loss(model(x), y)
    if scale is not None:
        optimizer.grad_scale = torch.tensor(scale)
    if scaler is None:
        optimizer.found_inf = torch.tensor(found)
        loss.backward()
        optimizer.step()
    else:                                   # GradScaler sets found_inf itself: an inf in the gradient
        scaler.scale(loss).backward()
        if found:
            model[0].weight.grad[0, 0] = float("inf")
        scaler.step(optimizer)
        scaler.update()


@pytest.mark.parametrize("cls", [torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD, torch.optim.Adagrad],
                         ids=["adam", "adamw", "sgd", "adagrad"])
@pytest.mark.parametrize("scale, scaler", [(None, False), (4.0, False), (None, True), (4.0, True)],
                         ids=["found-inf-only", "with-grad-scale", "gradscaler", "gradscaler-and-grad-scale"])
def test_a_fused_step_skipped_by_found_inf_is_counted_as_skipped(cls, scale, scaler):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    optimizer = _fused(cls, model.parameters())
    amp = torch.amp.GradScaler("cpu", init_scale=256.0) if scaler else None
    changed = []                            # the oracle: did the step change the weight?
    with GradientMonitor(model, activations=False) as monitor:
        for i, found in enumerate([0.0, 1.0, 0.0, 1.0, 1.0]):
            before = model[0].weight.detach().clone()
            _step(model, optimizer, i, found, scale, amp)
            changed.append(not torch.equal(before, model[0].weight))
        rows = monitor.log(0)
    applied, skipped = sum(changed), len(changed) - sum(changed)
    assert (applied, skipped) == (2, 3)
    row, overall = rows["0.weight"], monitor.history[-1].overall
    assert (row["steps"], row["skipped_steps"]) == (applied, skipped)
    assert (overall["steps"], overall["skipped_steps"]) == (applied, skipped)
