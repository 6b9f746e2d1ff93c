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


class _PlainSGD(torch.optim.Optimizer):
    """SGD written out, as a custom optimizer is (its step taking a closure); never made
    itself, so torch never hooks its step (only a subclass's)."""

    def __init__(self, params, lr):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-group["lr"])


class _IgnoresClosure(_PlainSGD):
    """Takes a closure and never calls it (the loop ran backward before the step)."""

    def step(self, closure=None):
        return super().step()


class _ClosureOnSomeSteps(torch.optim.Optimizer):
    """Calls its closure only on every other step (a loss to report), its own update always,
    with weight decay added to the gradient in place (0 here: the values stay, the version moves)."""

    def __init__(self, params, lr, weight_decay=0.0):
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay})
        self.count = 0

    @torch.no_grad()
    def step(self, closure=None):
        self.count += 1
        loss = None
        if closure is not None and self.count % 2:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                p.add_(p.grad.add_(p, alpha=group["weight_decay"]), alpha=-group["lr"])
        return loss


@pytest.mark.parametrize("make", [
    lambda p: _IgnoresClosure(p, lr=0.1),
    lambda p: _ClosureOnSomeSteps(p, lr=0.1),
], ids=["never-calls-it", "calls-it-every-other-step"])
def test_a_step_given_a_closure_it_does_not_call_records_the_gradient_it_applies(make):
    """step(closure) records after the closure's first call; a step that never called it recorded
    nothing (0 of 4 steps, 'a hand-written update' said), though it applied the gradient the
    loop's backward left."""
    model = _model()
    optimizer = make(list(model.parameters()))
    applied = []
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    with GradientMonitor(model) as monitor:
        for step in range(4):
            optimizer.zero_grad()
            F.mse_loss(model(x * (step + 1)), y).backward()

            def closure(step=step):
                optimizer.zero_grad()
                loss = F.mse_loss(model(x * (step + 1)), y)
                loss.backward()
                return loss
            optimizer.step(closure)          # the closure's gradient is the loop's: the same batch and weights
            applied.append({name: p.grad.detach().double() for name, p in model.named_parameters()})
        stats = monitor.log(0)
    assert monitor.history[-1].overall["steps"] == 4
    for name in applied[0]:
        assert stats[name]["norm"] == pytest.approx(np.mean([a[name].norm().item() for a in applied]), rel=1e-6)


def test_a_closure_that_raised_leaves_nothing_for_the_next_step():
    """The awaited closure of a step that raised is not recorded again at the end of that
    optimizer's next step (one given no closure, recorded as it begins)."""
    model = _model()
    optimizer = _ClosureOnSomeSteps(model.parameters(), lr=0.1)
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    norms = []

    def bad_batch():
        raise ValueError("bad batch")
    with GradientMonitor(model) as monitor:
        F.mse_loss(model(x), y).backward()
        with pytest.raises(ValueError):
            optimizer.step(bad_batch)
        for _ in range(2):
            optimizer.step()
            norms.append(model[0].weight.grad.norm().item())
        stats = monitor.log(0)
    assert stats["0.weight"]["steps"] == 2
    assert stats["0.weight"]["norm"] == pytest.approx(np.mean(norms), rel=1e-6)


class _Checkpointed(nn.Module):
    """Its middle block under activation checkpointing: recomputed inside backward."""

    def __init__(self, reentrant: bool, head: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 1)
        self.reentrant, self.head = reentrant, head

    def forward(self, x):
        h = torch.tanh(self.a(x))
        if self.head:                        # the last block: the backward's first steps are in it
            return torch.utils.checkpoint.checkpoint(lambda t: self.c(torch.tanh(self.b(t))), h,
                                                     use_reentrant=self.reentrant)
        h = torch.utils.checkpoint.checkpoint(lambda t: torch.tanh(self.b(t)), h, use_reentrant=self.reentrant)
        return self.c(h)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("head", [False, True], ids=["middle", "head"])
def test_steps_inside_one_backward_with_a_checkpoint_recompute_are_one_step(reentrant, head):
    """One optimizer per parameter inside backward, a checkpointed block recomputed in it: the
    recompute (a forward pass inside backward, or a nested backward with use_reentrant=True)
    split the backward's steps into 2 or 3 rows of grad/total_norm (0.645 and 0.475 where the 3
    steps applied 0.927)."""
    model = _Checkpointed(reentrant, head)
    applied: dict = {}
    handles = _in_backward(list(model.parameters()), applied)
    x, y = torch.randn(16, 4, requires_grad=True), torch.randn(16, 1)
    norms = []
    with GradientMonitor(model) as monitor:
        for step in range(3):
            applied.clear()
            F.mse_loss(model(x * (step + 1)), y).backward()
            assert len(applied) == 6
            norms.append(math.sqrt(sum(float(g.pow(2).sum()) for g in applied.values())))
        monitor.log(0)
    for handle in handles:
        handle.remove()
    overall = monitor.history[-1].overall
    assert overall["steps"] == 3
    assert overall["total_norm"] == pytest.approx(np.mean(norms), rel=1e-6)
    assert overall["total_norm_max"] == pytest.approx(max(norms), rel=1e-6)


def _sgd_step(self, closure=None):
    with torch.no_grad():
        for group in self.param_groups:
            for p in group["params"]:
                p.add_(p.grad, alpha=-group["lr"])


def _replaced_class() -> type:
    """A fresh optimizer class (its step replaced on the class in one case: not shared)."""
    class Replaced(torch.optim.Optimizer):
        def __init__(self, params):
            super().__init__(params, {"lr": 0.1})

        def step(self, closure=None):
            raise NotImplementedError
    return Replaced


@pytest.mark.parametrize("replace", [
    lambda optimizer: setattr(optimizer, "step", _sgd_step.__get__(optimizer)),
    lambda optimizer: setattr(type(optimizer), "step", _sgd_step),
], ids=["on-the-instance", "on-the-class"])
def test_a_torch_optimizer_whose_step_was_replaced_after_it_was_made_is_named(replace):
    """torch hooks an optimizer's step when it is made; a step put on the instance or the class
    after that runs no hook, so no step is recorded. log() said 'a hand-written update, an
    optimizer that is not a torch.optim.Optimizer, ...' of a torch.optim.Optimizer."""
    model = _model()
    optimizer = _replaced_class()(model.parameters())
    replace(optimizer)
    with GradientMonitor(model) as monitor:
        for _ in range(2):
            F.mse_loss(model(torch.randn(8, 4)), torch.randn(8, 1)).backward()
            optimizer.step()
            optimizer.zero_grad()
        with pytest.warns(UserWarning, match="whose step was replaced after it was made"):
            assert monitor.log(0) == {}


@pytest.mark.parametrize("between", ["clip", "pre-hook"], ids=["clip_grad_norm_", "step-pre-hook-rescales"])
def test_steps_inside_backward_and_after_it_with_the_rest_changed_in_place_between(between):
    """The join after a backward reads that no forward pass came since, not that the gradients
    are untouched: the body clipped (or rescaled in a step pre-hook) before its step split the
    step again (0.531 where the 3 steps applied 0.968; rescaled: 0.775 where 1.127)."""
    model = _model()
    head, body = list(model[2].parameters()), list(model[0].parameters())
    applied: dict = {}
    handles = _in_backward(head, applied)
    optimizer = torch.optim.Adam(body, lr=0.01)
    if between == "pre-hook":
        optimizer.register_step_pre_hook(lambda *_: torch._foreach_mul_([p.grad for p in body], 0.5) and None)
    optimizer.register_step_pre_hook(
        lambda *_: applied.update({p: p.grad.detach().double().clone() for p in body}))
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    norms = []
    with GradientMonitor(model) as monitor:
        for step in range(3):
            applied.clear()
            F.mse_loss(model(x * (step + 1)), y).backward()
            if between == "clip":
                torch.nn.utils.clip_grad_norm_(body, 0.1)
            optimizer.step()
            optimizer.zero_grad()
            norms.append(math.sqrt(sum(float(g.pow(2).sum()) for g in applied.values())))
        monitor.log(0)
    for handle in handles:
        handle.remove()
    assert monitor.history[-1].overall["total_norm"] == pytest.approx(np.mean(norms), rel=1e-6)


def test_a_step_after_another_forward_and_backward_is_not_joined_to_the_steps_inside_backward():
    """A GAN-like loop: D stepped inside its backward, then G's forward, backward (into G alone)
    and step, with zero_grad(set_to_none=False) (the same gradient tensors all along): two rows
    an iteration, as before."""
    torch.manual_seed(0)
    g_net, d_net = nn.Linear(4, 4), nn.Linear(4, 1)
    model = nn.ModuleDict({"G": g_net, "D": d_net})
    applied: dict = {}
    handles = _in_backward(list(d_net.parameters()), applied)
    opt_g = torch.optim.SGD(g_net.parameters(), lr=0.01)
    norms = []
    with GradientMonitor(model) as monitor:
        for _ in range(3):
            applied.clear()
            d_net(g_net(torch.randn(8, 4)).detach()).mean().backward()
            norms.append(math.sqrt(sum(float(g.pow(2).sum()) for g in applied.values())))
            opt_g.zero_grad(set_to_none=False)
            (-d_net(g_net(torch.randn(8, 4))).mean()).backward(inputs=list(g_net.parameters()))
            norms.append(math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in g_net.parameters())))
            opt_g.step()
        monitor.log(0)
    for handle in handles:
        handle.remove()
    assert monitor.history[-1].overall["total_norm"] == pytest.approx(np.mean(norms), rel=1e-6)
