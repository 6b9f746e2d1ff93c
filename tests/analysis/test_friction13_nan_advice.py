"""The advice on a NaN made in a module's forward pass at a healthy step size (friction13).

A layer that takes the log of a negative number at step 30, after three windows of updates near
1e-4 of the weights per step, got only "Updates are far too large: lower the learning rate"
(exploding's advice). The advice now also points at that module's code. The oracle: the planted
log of a negative number, and the update ratio per step computed by hand from the weights
before and after each window; a learning rate so large that the first window already explodes
gets no such sentence.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradflow import GradientMonitor
from gradflow.analysis.diagnose import diagnose_monitor
from tests.analysis.test_friction13_dead_after_nan import NAN_STEP, LogOfNegative

HINT = "check its input's range"


def run(lr: float, plant: bool):
    """8 windows of 10 steps; returns the diagnosis and the largest update per step (||p_end -
    p_start|| / ||p_start|| / steps, every parameter) of the windows before the first NaN."""
    torch.manual_seed(0)
    middle = LogOfNegative(8, NAN_STEP + 1) if plant else nn.Sequential(nn.Linear(8, 8), nn.Tanh())
    model = nn.Sequential(nn.Linear(4, 8), middle, nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    weights = list(model.parameters())
    largest, finite = 0.0, True
    losses = []
    with GradientMonitor(model, None, nonfinite=True) as monitor:
        for epoch in range(8):
            start = [w.detach().double().clone() for w in weights]
            for _ in range(10):
                optimizer.zero_grad()
                loss = nn.functional.mse_loss(model(torch.randn(16, 4)), 100 * torch.randn(16, 1))
                loss.backward()
                optimizer.step()
            losses.append(loss.item())
            monitor.log(epoch)
            finite = finite and all(torch.isfinite(w).all() for w in weights)
            if finite:
                largest = max([largest] + [((w.double() - s).norm() / s.norm()).item() / 10 for w, s in zip(weights, start)])
    return diagnose_monitor(monitor, losses), largest


@pytest.mark.parametrize("lr, plant, hinted", [(1e-6, True, True), (100.0, False, False)],
                         ids=["log-of-negative-small-steps", "lr-100-explodes-in-window-0"])
def test_a_nan_made_forward_at_small_steps_points_at_the_module(lr, plant, hinted):
    diagnosis, largest = run(lr, plant)
    assert "exploding" in diagnosis.verdicts, diagnosis.report()
    assert (HINT in diagnosis.recommendation) is hinted, diagnosis.recommendation
    if hinted:
        assert largest < 1e-3
        assert "made in the forward pass of layer '1' after 3 window(s) of small updates" in diagnosis.recommendation
        assert f"at most {largest:.2g} of the weights per step" in diagnosis.recommendation, diagnosis.recommendation
