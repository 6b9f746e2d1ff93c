"""Small models and a training step that several monitor tests share."""

from __future__ import annotations

import torch
from torch import nn


class BatchedLinear(nn.Module):
    """K independent Linear layers as one: weight (K, out, in), input (K, batch, in)."""

    def __init__(self, members: int, inputs: int, outputs: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(members, outputs, inputs) * 0.5)
        self.bias = nn.Parameter(torch.randn(members, 1, outputs) * 0.1)

    def forward(self, x):
        return torch.baddbmm(self.bias, x, self.weight.transpose(1, 2))


def relu_mlp() -> nn.Sequential:
    """Linear(3, 4), ReLU, Linear(4, 1), seeded."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))


def sgd_step(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """One training step on a random batch of 8 inputs of 3 features."""
    optimizer.zero_grad()
    model(torch.randn(8, 3)).square().mean().backward()
    optimizer.step()
