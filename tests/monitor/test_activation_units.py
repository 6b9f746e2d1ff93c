"""Dead units of small activation outputs laid out (N, C, H, W) and per member of a batched
model, on both reduction paths (the fused kernel counts each unit from the rows' layout, torch
ops from per-element unit slots). The oracle: the outputs themselves, captured by a hook of the
test's own, and each unit's largest value over every step and position."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from small_models import BatchedLinear
from torch import nn

from gradflow import GradientMonitor


class View(nn.Module):
    def __init__(self, *shape):
        super().__init__()
        self.shape = shape

    def forward(self, x):
        return x.reshape(*x.shape[:-1], *self.shape) if self.shape else x.flatten(-3)


def capture(module: nn.Module, into: list) -> None:
    module.register_forward_hook(lambda m, i, o: into.append(o.detach().clone()))


def train(model: nn.Module, monitor: GradientMonitor, inputs, steps: int) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for step in range(steps):
        optimizer.zero_grad()
        model(inputs(step)).pow(2).mean().backward()
        optimizer.step()


def test_dead_units_of_small_image_outputs_match_oracle(reduction_path):
    """(N, C, H, W) outputs of 2 x 6 x 4 x 4 values: units are the 6 channels, each over its H x W."""
    torch.manual_seed(4)
    model = nn.Sequential(OrderedDict(conv=nn.Conv2d(2, 6, 3, padding=1), relu=nn.ReLU(), flat=nn.Flatten(),
                                      out=nn.Linear(96, 1)))
    with torch.no_grad():
        model.conv.bias.copy_(torch.tensor([-9.0, -9.0, 0.0, 0.0, 0.1, -0.2]))     # two dead channels at least
    outputs = []
    capture(model.relu, outputs)
    with GradientMonitor(model, activations_every=1) as monitor:
        train(model, monitor, lambda step: torch.randn(2, 2, 4, 4), 5)
        monitor.log(0)
    relu = torch.stack(outputs).double()                  # steps x N x C x H x W
    got = monitor.history[0].activations["relu"]
    assert got["dead_fraction"] == pytest.approx((relu.amax(dim=(0, 1, 3, 4)) <= 0).double().mean().item())
    assert 0 < got["dead_fraction"] < 1
    assert got["mean"] == pytest.approx(relu.mean().item(), rel=1e-6)
    assert got["std"] == pytest.approx(relu.std(unbiased=False).item(), rel=1e-5)


def test_dead_units_of_each_member_of_a_batched_model_match_oracle(reduction_path):
    """Members' outputs (K, N, C, H, W): each member's units are its own C channels over H x W."""
    torch.manual_seed(8)
    members = 3
    model = nn.Sequential(OrderedDict(dense=BatchedLinear(members, 2, 4 * 3 * 3), view=View(4, 3, 3),
                                      relu=nn.ReLU(), flat=View(), out=BatchedLinear(members, 36, 1)))
    with torch.no_grad():                                 # dead channels: member 0's first, member 1's second and third
        model.dense.bias.clamp_(min=0.1)
        model.dense.bias[0, :, :9] = -9.0
        model.dense.bias[1, :, 9:27] = -9.0
    outputs = []
    capture(model.relu, outputs)
    with GradientMonitor(model, members=members, activations_every=1) as monitor:
        train(model, monitor, lambda step: torch.randn(members, 5, 2), 4)
        monitor.log(0)
    relu = torch.stack(outputs).double()                  # steps x K x N x C x H x W
    deads = []
    for k in range(members):
        got = monitor.member_history(k)[0].activations["relu"]
        dead = (relu[:, k].amax(dim=(0, 1, 3, 4)) <= 0).double().mean().item()
        assert got["dead_fraction"] == pytest.approx(dead), k
        assert got["mean"] == pytest.approx(relu[:, k].mean().item(), rel=1e-6), k
        deads.append(dead)
    assert deads[:2] == [0.25, 0.5]                       # the members differ: each counts its own units
