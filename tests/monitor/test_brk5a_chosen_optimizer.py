"""``GradientMonitor(model, optimizer=opt)`` records ``opt``'s steps only. A loop that replaces
``opt`` by a new optimizer (a new one after unfreezing, a restart) leaves the monitor watching
an optimizer that no longer exists: helper brk5a found it recorded nothing and ``log()`` blamed
a hand-written update. The monitor must say what happened, at the first step of the new one."""

from __future__ import annotations

import gc

import pytest
import torch
from torch import nn

from gradflow import GradientMonitor


def _train(model, optimizer, steps=2):
    for i in range(steps):
        optimizer.zero_grad()
        model(torch.randn(8, 4) * (i + 1)).pow(2).mean().backward()
        optimizer.step()


def test_a_chosen_optimizer_that_was_deleted_is_said_when_another_steps():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with GradientMonitor(model, activations=False, optimizer=optimizer) as monitor:
        _train(model, optimizer)
        assert monitor.log(0)["0.weight"]["steps"] == 2
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)      # the SGD is gone
        gc.collect()
        with pytest.warns(UserWarning, match=r"optimizer=SGD.*no longer exists.*Adam"):
            _train(model, optimizer)
        assert monitor.log(1) == {}


def test_another_optimizer_beside_a_living_chosen_one_is_not_said():
    """A GAN monitored through one of its two optimizers: the other's steps are left out, as asked."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    chosen = torch.optim.SGD(model[0].parameters(), lr=0.01)
    other = torch.optim.SGD(model[2].parameters(), lr=0.01)
    with GradientMonitor(model, activations=False, optimizer=chosen) as monitor:
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            _train(model, chosen)
            _train(model, other)
        assert set(monitor.log(0)) == {"0.weight", "0.bias"}
