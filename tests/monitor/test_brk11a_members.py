"""Break tests (brk11a) of members=K: K models trained as one, every parameter stacked on a leading
dimension of K. The oracle: each member's slice p.grad[k] at the optimizer step (a step pre-hook
registered after the monitor's), in float64, averaged over the window's steps as the monitor does."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gradflow.monitor import GradientMonitor

K, STEPS = 3, 4


class Ensemble(nn.Module):
    """K linear models: weight (K, 4, 2), a per-member scale (K,) (one element per member), bias (K, 1, 2).
    Member 1's scale is multiplied by 0 in forward: its weight and bias get exact zero gradients."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(K, 4, 2))
        self.scale = nn.Parameter(torch.ones(K))
        self.bias = nn.Parameter(torch.zeros(K, 1, 2))
        self.register_buffer("alive", torch.tensor([1.0, 0.0, 1.0]))

    def forward(self, x):                                    # x (B, 4) -> (K, B, 2)
        out = torch.baddbmm(self.bias, x.expand(K, *x.shape), self.weight)
        return out * (self.scale * self.alive).view(K, 1, 1)


def oracle_rows(steps: list[dict[str, torch.Tensor]], k: int) -> dict[str, dict[str, float]]:
    rows = {}
    for name in steps[0]:
        gs = [s[name][k] for s in steps]
        rows[name] = {"mean": sum(float(g.mean()) for g in gs) / len(gs),
                      "mean_abs": sum(float(g.abs().mean()) for g in gs) / len(gs),
                      "norm": sum(float(g.norm()) for g in gs) / len(gs),
                      "max_abs": sum(float(g.abs().max()) for g in gs) / len(gs),
                      "zero_fraction": sum(int((g == 0).sum()) for g in gs) / sum(g.numel() for g in gs)}
    return rows


@pytest.mark.parametrize("optimizer_name", ["sgd", "adamw"])
def test_each_member_row_is_its_slice_of_the_gradient(optimizer_name):
    torch.manual_seed(0)
    model = Ensemble()
    optimizer = (torch.optim.SGD(model.parameters(), lr=0.1) if optimizer_name == "sgd"
                 else torch.optim.AdamW(model.parameters(), lr=0.01))
    steps: list[dict[str, torch.Tensor]] = []
    with GradientMonitor(model, None, members=K, activations=False) as monitor:
        optimizer.register_step_pre_hook(lambda *_: steps.append(
            {n: p.grad.detach().double().clone() for n, p in model.named_parameters()}))
        for step in range(STEPS):
            x = torch.randn(5, 4, generator=torch.Generator().manual_seed(step))
            optimizer.zero_grad()
            model(x).square().mean().backward()
            optimizer.step()
        monitor.log(0)
        totals = [math.sqrt(sum(float(s[n][k].square().sum()) for n in s)) for s in steps for k in range(K)]
        for k in range(K):
            window = monitor.member_history(k)[-1]
            expected = oracle_rows(steps, k)
            assert set(window.gradients) == set(expected)
            for name, want in expected.items():
                row = window.gradients[name]
                for field, value in want.items():
                    assert row[field] == pytest.approx(value, rel=1e-6, abs=1e-12), (k, name, field)
            member_totals = totals[k::K]
            assert window.overall["total_norm"] == pytest.approx(sum(member_totals) / STEPS, rel=1e-6, abs=1e-12)
    assert monitor.member_history(1)[-1].gradients["weight"]["zero_fraction"] == 1.0
