"""Break tests (helper brk5b) of attaching and removing, threads and conversions, each against an
oracle: statistics taken straight from ``p.grad`` right before ``optimizer.step()``, and the
model's and optimizer's complete hook sets compared before attaching and after removing."""

from __future__ import annotations

import pytest
import torch
from monitor_oracle import step_statistics
from torch import nn

from gradflow.monitor import GradientMonitor


def _model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))


def _captured(model: nn.Module, by_name: dict[str, list[float]]) -> None:
    """The oracle: each parameter's gradient norm, by its name now (a replaced parameter's too)."""
    for name, p in model.named_parameters():
        if p.grad is not None:
            by_name.setdefault(name, []).append(step_statistics(p.grad)["norm"])


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


@pytest.mark.parametrize("when", ["mid-window", "between-windows"])
@pytest.mark.parametrize("stepped_by", ["new-optimizer", "group-added"])
def test_one_parameter_replaced_by_a_new_one_is_followed_at_the_next_step(when, stepped_by):
    """``model[0].weight = nn.Parameter(...)`` (same shape, dtype and device: a layer
    re-initialised), then stepped by a new optimizer over ``model.parameters()`` or by the old one
    with the new weight added as a group: each step applies the new weight's gradient, so each is
    recorded (before: the optimizer held monitored parameters besides it, so the monitor never
    looked for replaced ones and dropped the new weight's steps until the next log())."""
    model = _model(1)
    x = torch.randn(16, 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    norms: dict[str, list[float]] = {}
    with GradientMonitor(model, activations=False) as monitor:
        for _ in range(2):
            optimizer.zero_grad()
            model(x).square().mean().backward()
            _captured(model, norms)
            optimizer.step()
        if when == "between-windows":
            first = monitor.log(0)
            assert first["0.weight"]["norm"] == pytest.approx(_mean(norms.pop("0.weight")), rel=1e-6)
            norms.clear()
        model[0].weight = nn.Parameter(model[0].weight.detach() * 3.0)
        if stepped_by == "new-optimizer":
            optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        else:
            optimizer.add_param_group({"params": [model[0].weight]})
        for _ in range(3):
            optimizer.zero_grad()
            model.zero_grad()
            model(x).square().mean().backward()
            _captured(model, norms)
            optimizer.step()
        rows = monitor.log(1)
    expected_steps = 5 if when == "mid-window" else 3
    for name, values in norms.items():
        assert rows[name]["steps"] == expected_steps == len(values), (name, rows[name]["steps"], len(values))
        assert rows[name]["norm"] == pytest.approx(_mean(values), rel=1e-6), name
