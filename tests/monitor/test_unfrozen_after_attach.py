"""Gradual unfreezing (ULMFiT; a backbone frozen for the first epochs of fine-tuning): a
parameter frozen when the monitor attached and trainable later is followed. Its gradients are
recorded from its first step, and its weight update ratio from the window after the one it was
unfrozen in (that window's start was not kept: NaN, unknown). Oracle: ||w_end - w_start|| /
||w_start|| over each window, from copies taken at the window's edges."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gradflow import GradientMonitor


@pytest.mark.parametrize("width", [8, 2000], ids=["tiny", "large"])
def test_a_parameter_unfrozen_after_attach_gets_update_ratios(width):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, width), nn.Tanh(), nn.Linear(width, 1))
    for p in model[0].parameters():
        p.requires_grad_(False)
    optimizer = torch.optim.SGD(model[2].parameters(), lr=0.01)
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    ratios = []
    with GradientMonitor(model, activations=False) as monitor:
        for window in range(4):
            if window == 1:                                   # unfreeze the backbone
                for p in model[0].parameters():
                    p.requires_grad_(True)
                optimizer.add_param_group({"params": list(model[0].parameters())})
            start = model[0].weight.detach().clone()
            for _ in range(3):
                optimizer.zero_grad()
                nn.functional.mse_loss(model(x), y).backward()
                optimizer.step()
            rows = monitor.log(window)
            oracle = ((model[0].weight.detach() - start).norm() / start.norm()).item()
            ratios.append((monitor.history[-1].weights["0.weight"]["update_ratio"], oracle))
    assert rows["0.weight"]["steps"] == 3
    assert ratios[0] == (0.0, 0.0)                            # frozen: did not move
    assert math.isnan(ratios[1][0])                           # unfrozen in this window: its start was not kept
    for got, expected in ratios[2:]:
        assert got == pytest.approx(expected, rel=1e-5)
