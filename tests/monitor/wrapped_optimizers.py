"""Optimizer wrappers the monitor's tests step: an optimizer whose step calls other optimizers'
steps, as Lookahead, SAM or ZeroRedundancyOptimizer do."""

from __future__ import annotations

import torch


class Lookahead(torch.optim.Optimizer):
    """Lookahead (Zhang et al. 2019) over ``inner``: its step calls the inner step (with the
    closure, if any) and every k steps pulls the weights towards slow copies."""

    def __init__(self, inner: torch.optim.Optimizer, k: int = 2, alpha: float = 0.5):
        self.inner, self.k, self.alpha, self.count = inner, k, alpha, 0
        super().__init__(inner.param_groups, {})
        self.slow = [p.detach().clone() for group in inner.param_groups for p in group["params"]]

    @torch.no_grad()
    def step(self, closure=None):
        loss = self.inner.step(closure)
        self.count += 1
        if self.count % self.k == 0:
            params = [p for group in self.inner.param_groups for p in group["params"]]
            for p, slow in zip(params, self.slow):
                slow.add_(p - slow, alpha=self.alpha)
                p.copy_(slow)
        return loss


class Combined(torch.optim.Optimizer):
    """One optimizer over several inner ones, each on part of the parameters (matrices with one,
    the rest with another), as ZeroRedundancyOptimizer's inner optimizer holds one rank's shard."""

    def __init__(self, *inner: torch.optim.Optimizer):
        self.inner = inner
        super().__init__([g for opt in inner for g in opt.param_groups], {})

    @torch.no_grad()
    def step(self, closure=None):
        for opt in self.inner:
            opt.step()
