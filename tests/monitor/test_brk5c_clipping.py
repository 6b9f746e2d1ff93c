"""Clipping beyond one ``clip_grad_norm_`` call per step (break test brk5c).

The oracle: the L2 norm of all clipped gradients, computed in float64 straight from ``p.grad``
just before the step's first clipping call, and whether the step's calls changed a gradient.
``total_norm_before_clip`` is an L2 norm whatever norm the clipping used (the verdict divides
it by the L2 norm the step applied), and a step counts once in ``clip_calls`` and
``clipped_steps`` however many clipping calls it made.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gradflow import GradientMonitor

U = torch.nn.utils


def grads(params) -> list[torch.Tensor]:
    return [p.grad for p in params if p.grad is not None]


def l2(params) -> float:
    return math.sqrt(sum(float(g.double().square().sum()) for g in grads(params)))


def pnorm(params, norm_type: float) -> float:
    return float(torch.linalg.vector_norm(torch.cat([g.double().flatten() for g in grads(params)]), norm_type))


class WithEmpty(nn.Module):
    """A Linear and a parameter with no element (an empty local shard is the same to the wrapper)."""

    def __init__(self) -> None:
        super().__init__()
        self.dense = nn.Linear(3, 2)
        self.empty = nn.Parameter(torch.zeros(0))

    def forward(self, x):
        return self.dense(x).sum() + self.empty.sum()


def test_value_clipping_with_an_empty_gradient_leaves_training_alone():
    """torch's clip_grad_value_ clamps an empty gradient fine; the monitor's look at it (the largest
    |g|, an infinity norm that torch refuses on an empty tensor) raised out of the user's step."""
    torch.manual_seed(0)
    model = WithEmpty()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with GradientMonitor(model, None, activations=False) as monitor:
        norms = []
        for step in range(2):
            optimizer.zero_grad()
            model(torch.randn(4, 3)).backward()
            norms.append(l2(model.parameters()))
            U.clip_grad_value_(model.parameters(), 1e3 if step else 1e-3)   # clamps at step 0 only
            optimizer.step()
        monitor.log(0)
    overall = monitor.history[-1].overall
    assert overall["clip_calls"] == 2 and overall["clipped_steps"] == 1
    assert overall["total_norm_before_clip"] == pytest.approx(sum(norms) / 2, rel=1e-6)
