"""A step pre-hook on the *inner* optimizer of a wrapper (Lookahead, SAM) runs after the
wrapper's own pre-hooks: the gradient the training step applies is the one the inner step sees,
after that hook. The monitor must count one step per training step and report that gradient.
Found by helper brk5a: Lookahead(SGD) with a hook on the SGD that triples ``.grad`` gave
``steps`` 6 for 3 training steps and a norm of 0.98 where 1.47 was applied (the mean of the
untripled and the tripled gradient).

Oracle: ``.grad`` read by a pre-hook on the inner optimizer registered after the tripling hook,
with the monitor attached (the monitor keeps its own hook last), at every inner step. (With a
closure, torch runs pre-hooks before the closure's backward, so such a hook changes nothing the
step applies: not tested here.)"""

from __future__ import annotations

import pytest
import torch
from monitor_oracle import GradientOracle, assert_matches_oracle
from torch import nn
from wrapped_optimizers import Combined, Lookahead

from gradflow import GradientMonitor


def _triple_in_place(optimizer, args, kwargs):
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad.mul_(3.0)


def _triple_anew(optimizer, args, kwargs):
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = p.grad * 3.0


@pytest.mark.parametrize("hook", [_triple_in_place, _triple_anew], ids=["in-place", "new-tensor"])
@pytest.mark.parametrize("inner_class", [torch.optim.SGD, torch.optim.Adam], ids=["sgd", "adam"])
def test_a_hook_on_the_inner_optimizer_is_applied_once_per_step(inner_class, hook):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    inner = inner_class(model.parameters(), lr=0.01)
    optimizer = Lookahead(inner)
    oracle = GradientOracle(model.named_parameters())
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    with GradientMonitor(model, activations=False) as monitor:
        inner.register_step_pre_hook(hook)
        inner.register_step_pre_hook(lambda *_: oracle.capture())
        for i in range(3):
            optimizer.zero_grad()
            nn.functional.mse_loss(model(x * (i + 1)), y).backward()
            optimizer.step()
        rows = monitor.log(0)
    assert monitor.history[-1].overall["steps"] == 3
    assert_matches_oracle(rows, oracle)


class Centralized(Lookahead):
    """A wrapper whose own step changes ``.grad`` before its inner step: gradient centralization
    (Yong et al. 2020) of each matrix's rows, then the inner step."""

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and p.dim() > 1:
                    p.grad.sub_(p.grad.mean(dim=1, keepdim=True))
        return self.inner.step(closure)


def test_a_wrapper_that_changes_the_gradient_in_its_own_step_counts_it_once():
    """The same kind: the gradient is final only at the inner step (it counted 2 steps in 1,
    one before centralizing and one after)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    inner = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    optimizer = Centralized(inner)
    oracle = GradientOracle(model.named_parameters())
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    with GradientMonitor(model, activations=False) as monitor:
        inner.register_step_pre_hook(lambda *_: oracle.capture())
        for i in range(3):
            optimizer.zero_grad()
            nn.functional.mse_loss(model(x * (i + 1)), y).backward()
            optimizer.step()
        rows = monitor.log(0)
    assert rows["0.weight"]["mean"] == pytest.approx(0.0, abs=1e-9)       # centralized rows: mean 0
    assert_matches_oracle(rows, oracle)


def test_a_hook_on_an_inner_optimizer_over_part_of_the_parameters_is_said():
    """The wrapper's step records every parameter before the inner hooks run; where a hook on an
    inner optimizer over part of them then changes their gradients, the step stays counted once
    with the gradients the wrapper's step saw, and a warning says so (it counted them twice, the
    biases included). Oracle: .grad before the wrapper's step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    matrices = torch.optim.SGD([p for p in model.parameters() if p.dim() == 2], lr=0.01)
    optimizer = Combined(matrices, torch.optim.SGD([p for p in model.parameters() if p.dim() != 2], lr=0.01))
    oracle = GradientOracle(model.named_parameters())
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    with GradientMonitor(model, activations=False) as monitor:
        matrices.register_step_pre_hook(_triple_in_place)
        with pytest.warns(UserWarning, match=r"0\.weight, 2\.weight: their gradients changed"):
            for i in range(2):
                optimizer.zero_grad()
                nn.functional.mse_loss(model(x * (i + 1)), y).backward()
                oracle.capture()
                optimizer.step()
        rows = monitor.log(0)
    assert monitor.history[-1].overall["steps"] == 2
    assert_matches_oracle(rows, oracle)


class KeepsASpare(torch.optim.Optimizer):
    """An optimizer that holds another over the same parameters (say, to switch to it later)
    but applies its own update: its step is the one that applies the gradient."""

    def __init__(self, params, lr=0.01):
        super().__init__(params, {"lr": lr})
        self.spare = torch.optim.SGD(self.param_groups, lr=lr)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                p.add_(p.grad.sign(), alpha=-group["lr"])


def test_a_held_optimizer_that_never_steps_leaves_the_record_to_the_step():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    optimizer = KeepsASpare(model.parameters())
    oracle = GradientOracle(model.named_parameters())
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    with GradientMonitor(model, activations=False) as monitor:
        for i in range(3):
            optimizer.zero_grad()
            nn.functional.mse_loss(model(x * (i + 1)), y).backward()
            oracle.capture()
            optimizer.step()
        rows = monitor.log(0)
    assert monitor.history[-1].overall["steps"] == 3
    assert_matches_oracle(rows, oracle)
