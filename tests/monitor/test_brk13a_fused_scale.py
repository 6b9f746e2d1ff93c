"""Break tests of the recording core (helper brk13a): a fused optimizer given a ``grad_scale``
of the user's. torch's fused optimizers divide the gradients by ``optimizer.grad_scale`` inside
their step whenever it is set, with or without a GradScaler (GradScaler multiplies its own scale
into one the user set: torch/amp/grad_scaler.py). The oracle is ``p.grad / grad_scale`` in
float64, read in a step pre-hook of the optimizer (the monitor's runs after it)."""

from __future__ import annotations

import math

import pytest
import torch
from test_brk10a_optimizers import _batch, _fused
from torch import nn

from gradflow import GradientMonitor


@pytest.mark.parametrize("cls", [torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD, torch.optim.Adagrad],
                         ids=["adam", "adamw", "sgd", "adagrad"])
@pytest.mark.parametrize("scaler", [False, True], ids=["no-scaler", "scaler"])
def test_a_grad_scale_set_by_the_user_is_divided_out_as_the_fused_step_does(cls, scaler):
    """Gradient accumulation by a summed loss, 4 micro-batches, the mean taken by the fused step:
    ``optimizer.grad_scale = 4``. The rows are the applied gradients (before: 4x them without a
    GradScaler, 0.0205 where 0.0051 was applied)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    optimizer = _fused(cls, model.parameters())
    amp = torch.amp.GradScaler("cpu", init_scale=256.0) if scaler else None
    applied: dict[str, list[tuple[float, float]]] = {name: [] for name, _ in model.named_parameters()}

    def oracle(opt, args, kwargs):
        for name, p in model.named_parameters():
            g = p.grad.double() / opt.grad_scale.double()
            applied[name].append((g.mean().item(), g.norm().item()))

    optimizer.register_step_pre_hook(oracle)
    with GradientMonitor(model, activations=False) as monitor:
        for i in range(3):
            optimizer.zero_grad()
            loss = sum(nn.functional.mse_loss(model(x), y) for x, y in map(_batch, range(4 * i, 4 * i + 4)))
            optimizer.grad_scale = torch.tensor(4.0)
            if amp is None:
                loss.backward()
                optimizer.step()
            else:
                amp.scale(loss).backward()
                amp.step(optimizer)
                amp.update()
        rows = monitor.log(0)
    for name, steps in applied.items():
        assert rows[name]["steps"] == len(steps) == 3
        for k, key in enumerate(("mean", "norm")):
            expected = sum(step[k] for step in steps) / 3
            assert math.isclose(rows[name][key], expected, rel_tol=1e-5), (name, key, rows[name][key], expected)
