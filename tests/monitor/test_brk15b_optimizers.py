"""Optimizers and loops of brk15b's break test, each against the gradient the steps apply (float64,
read in the optimizers' step pre-hooks or the post-accumulate-grad hooks that step)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradflow import GradientMonitor


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))


def _in_backward(params, applied: dict) -> list:
    """torchtune's optimizer in backward: one optimizer per parameter, stepped from its
    post-accumulate-grad hook, its gradient set to None right after. ``applied`` gets each
    gradient as its step applies it."""
    optimizers = {p: torch.optim.SGD([p], lr=0.01) for p in params}

    def step(p):
        applied[p] = p.grad.detach().double().clone()
        optimizers[p].step()
        optimizers[p].zero_grad(set_to_none=True)
    return [p.register_post_accumulate_grad_hook(step) for p in params]


@pytest.mark.parametrize("inside", ["head", "body"], ids=["head-in-backward", "body-in-backward"])
def test_steps_inside_backward_and_after_it_are_one_step_of_the_total_norm(inside):
    """Part of one backward's gradients stepped inside it (one optimizer per parameter), the rest
    by an optimizer after it: one training step, whose grad/total_norm is the norm of everything
    applied (as the docs say of Muon + AdamW). The step after backward was a row of its own:
    mean over 6 part-norms 0.64 where the 3 steps applied 0.93."""
    model = _model()
    head, body = list(model[2].parameters()), list(model[0].parameters())
    stepped, after = (head, body) if inside == "head" else (body, head)
    applied: dict = {}
    handles = _in_backward(stepped, applied)
    optimizer = torch.optim.Adam(after, lr=0.01)
    optimizer.register_step_pre_hook(
        lambda *_: applied.update({p: p.grad.detach().double().clone() for p in after}))
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    norms = []
    with GradientMonitor(model) as monitor:
        for step in range(3):
            applied.clear()
            F.mse_loss(model(x * (step + 1)), y).backward()
            optimizer.step()
            optimizer.zero_grad()
            norms.append(math.sqrt(sum(float(g.pow(2).sum()) for g in applied.values())))
            assert len(applied) == 4
        stats = monitor.log(0)
    for handle in handles:
        handle.remove()
    overall = monitor.history[-1].overall
    assert overall["steps"] == 3 and all(row["steps"] == 3 for row in stats.values())
    assert overall["total_norm"] == pytest.approx(np.mean(norms), rel=1e-6)
    assert overall["total_norm_max"] == pytest.approx(max(norms), rel=1e-6)


def test_a_second_backward_after_the_in_backward_steps_starts_a_new_step():
    """The join reads the gradients the backward left: where another backward came between (its
    in-backward steps a row of their own) the step after it joins that one, not the first."""
    model = _model()
    head, body = list(model[2].parameters()), list(model[0].parameters())
    applied: dict = {}
    handles = _in_backward(head, applied)
    optimizer = torch.optim.SGD(body, lr=0.01)
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    rows = []
    with GradientMonitor(model) as monitor:
        applied.clear()
        F.mse_loss(model(x), y).backward()                 # the head steps; the body's gradient waits
        rows.append(dict(applied))
        applied.clear()
        F.mse_loss(model(2 * x), y).backward()             # the head again; the body's accumulates
        rows.append({**applied, **{p: p.grad.detach().double().clone() for p in body}})
        optimizer.step()
        stats = monitor.log(0)
    for handle in handles:
        handle.remove()
    norms = [math.sqrt(sum(float(g.pow(2).sum()) for g in row.values())) for row in rows]
    overall = monitor.history[-1].overall
    assert overall["total_norm"] == pytest.approx(np.mean(norms), rel=1e-6)
    assert stats["2.weight"]["steps"] == 2 and stats["0.weight"]["steps"] == 1
