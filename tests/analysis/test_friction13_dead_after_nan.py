"""Dead units are not read off a ReLU whose input went NaN (friction13).

A ReLU fed NaN outputs NaN, which is never positive, so its window counted every unit dead and
the verdict said ``dead-units`` with the advice for dying ReLUs (fewer layers, LeakyReLU ...),
although the units were alive until a NaN from another layer reached them. The oracle: the
planted NaN (a layer that takes the log of a negative number at one step) and the ReLU's own
outputs before it, counted by hand in a forward hook (the share of units never positive).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gradflow import GradientMonitor
from gradflow.analysis.diagnose import diagnose_monitor
from gradflow.analysis.measures import measure_activations
from gradflow.monitor import Window

NAN_STEP = 30


class LogOfNegative(nn.Module):
    """A Linear layer followed by log(|y| + 1), which takes the log of a negative number on its
    ``at``-th training call (its output NaN from then on, through the NaN weights)."""

    def __init__(self, width: int, at: int) -> None:
        super().__init__()
        self.lin, self.calls, self.at = nn.Linear(width, width), 0, at

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        shift = 100.0 if self.training and self.calls == self.at else 0.0
        return torch.log(self.lin(x).abs() + 1 - shift)


def nan_run(bias: float):
    """8 windows of 10 steps; the NaN made at step NAN_STEP upstream of the ReLU. ``bias``: the
    first layer's bias (-10: its ReLU dead from the start). Returns the monitor, the last loss
    per epoch and the share of the ReLU's units never positive in each window before the NaN."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), LogOfNegative(8, NAN_STEP + 1), nn.Linear(8, 8), nn.ReLU(),
                          nn.Linear(8, 1))
    with torch.no_grad():
        model[2].bias.fill_(bias)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    alive = []
    model[3].register_forward_hook(lambda m, i, out: alive.append((out > 0).any(0)) if m.training else None)
    losses, dead = [], []
    with GradientMonitor(model, None, activations_every=1) as monitor:
        for epoch in range(8):
            alive.clear()
            for _ in range(10):
                x, y = torch.randn(16, 4), torch.randn(16, 1)
                optimizer.zero_grad()
                loss = nn.functional.mse_loss(model(x), y)
                loss.backward()
                optimizer.step()
            losses.append(loss.item())
            dead.append(1.0 - torch.stack(alive).any(0).double().mean().item())
            monitor.log(epoch)
    return monitor, losses, dead


@pytest.mark.parametrize("bias, fires", [(0.0, False), (-10.0, True)], ids=["alive-until-nan", "dead-from-start"])
def test_dead_units_are_read_before_the_nan(bias, fires):
    monitor, losses, dead = nan_run(bias)
    windows = monitor.history
    assert math.isnan(windows[-1].activations["3"]["mean"])       # the NaN reached the ReLU
    last_finite = NAN_STEP // 10 - 1                                # window 2 ends at step 29
    assert measure_activations(windows)["3"]["dead"] == pytest.approx(dead[last_finite])
    diagnosis = diagnose_monitor(monitor, losses)
    assert ("dead-units" in diagnosis.verdicts) is fires
    assert "exploding" in diagnosis.verdicts                        # the NaN is still the verdict


@pytest.mark.parametrize("means, expected", [
    ([0.5, math.nan], 0.25),                  # NaN outputs in the last window: the one before
    ([0.5, math.inf], 0.25),
    ([math.nan, math.nan], math.nan),         # never finite: no reading
    ([0.5, 0.2], 1.0),                        # finite: the last window, as before
], ids=["nan-last", "inf-last", "never-finite", "finite"])
def test_dead_fraction_of_the_last_finite_window(means, expected):
    windows = [Window(i, 1, activations={"relu_1": {"mean": mean, "dead_fraction": dead}})
               for i, (mean, dead) in enumerate(zip(means, [0.25, 1.0]))]
    got = measure_activations(windows)["relu_1"]["dead"]
    assert got == pytest.approx(expected, nan_ok=True)
