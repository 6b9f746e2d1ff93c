"""``GradientMonitor(model, optimizer=wrapper)`` where the wrapper is an Optimizer subclass that
never runs ``Optimizer.__init__`` (so torch never hooks its own ``step``) and steps an inner
optimizer: accelerate's ``AcceleratedOptimizer``, timm's ``Lookahead``. The monitor must record
the inner step that the wrapper makes, once per training step. Oracle: ``.grad`` captured inside
the inner optimizer's step function, below torch's hook wrapper (after every pre-hook)."""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch
from monitor_oracle import GradientOracle, assert_matches_oracle
from torch import nn

from gradflow import GradientMonitor


class TimmLookahead(torch.optim.Optimizer):
    """timm.optim.Lookahead as written there: shares the base optimizer's param_groups and never
    calls ``Optimizer.__init__``."""

    def __init__(self, base_optimizer, alpha=0.5, k=2):
        self._base_optimizer = base_optimizer
        self.param_groups = base_optimizer.param_groups
        self.defaults = base_optimizer.defaults
        self.state = defaultdict(dict)
        self.alpha, self.k, self.count = alpha, k, 0

    @torch.no_grad()
    def step(self, closure=None):
        loss = self._base_optimizer.step(closure)
        self.count += 1
        if self.count % self.k == 0:
            for group in self.param_groups:
                for p in group["params"]:
                    slow = self._base_optimizer.state[p].setdefault("slow", p.detach().clone())
                    slow.add_(p - slow, alpha=self.alpha)
                    p.copy_(slow)
        return loss

    def zero_grad(self, set_to_none=True):
        self._base_optimizer.zero_grad(set_to_none)


def _accelerated(optimizer):
    accelerate = pytest.importorskip("accelerate")
    return accelerate.Accelerator(cpu=True).prepare_optimizer(optimizer)


class InnerStepOracle(GradientOracle):
    """Captures .grad inside ``optimizer``'s own step function (below torch's hook wrapper)."""

    def __init__(self, named, optimizer):
        super().__init__(named)
        cls, oracle = type(optimizer), self
        self._restore = (cls, cls.step)
        original = cls.step.__wrapped__

        def step(self_, *args, **kwargs):
            if self_ is optimizer:
                oracle.capture()
            return original(self_, *args, **kwargs)

        cls.step = torch.optim.Optimizer.profile_hook_step(step)

    def close(self):
        cls, step = self._restore
        cls.step = step


@pytest.mark.parametrize("wrap", [TimmLookahead, _accelerated], ids=["timm-lookahead", "accelerated-optimizer"])
def test_a_monitor_given_the_wrapper_records_its_inner_step(wrap):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    inner = torch.optim.Adam(model.parameters(), lr=0.01)
    optimizer = wrap(inner)
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    oracle = InnerStepOracle(model.named_parameters(), inner)
    try:
        with GradientMonitor(model, optimizer=optimizer, activations=False) as monitor:
            for i in range(3):
                optimizer.zero_grad()
                nn.functional.mse_loss(model(x * (i + 1)), y).backward()
                optimizer.step()
            rows = monitor.log(0)
    finally:
        oracle.close()
    assert monitor.history[-1].overall["steps"] == 3
    assert_matches_oracle(rows, oracle)


def test_a_monitor_given_one_optimizer_ignores_another_that_shares_no_group():
    """The wrapper test's converse: with optimizer=a, b's steps stay unrecorded (b's groups are
    its own), as before."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    a = torch.optim.SGD(model[0].parameters(), lr=0.01)
    b = torch.optim.SGD(model[2].parameters(), lr=0.01)
    with GradientMonitor(model, optimizer=a, activations=False) as monitor:
        model(torch.randn(16, 4)).square().mean().backward()
        a.step()
        b.step()
        with pytest.warns(UserWarning, match="2.weight, 2.bias had gradients but no monitored optimizer stepped"):
            rows = monitor.log(0)
    assert set(rows) == {"0.weight", "0.bias"}
