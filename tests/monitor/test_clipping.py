"""Every clipping path of torch gives the norm before clipping and the clipped steps.

The oracle is the L2 norm of all gradients, computed in float64 straight from ``p.grad`` just
before the clipping call, and whether that call changed a gradient (norm clipping: torch scales
when ``total + 1e-6 > max_norm``; value clipping: some ``|g|`` exceeded the clip value).
"""

from __future__ import annotations

import math
from collections import OrderedDict

import pytest
import torch
from torch import nn

from gradflow import GradientMonitor


def clip_norm(params, limit):
    torch.nn.utils.clip_grad_norm_(params, limit)


def clip_norm_module(params, limit):
    torch.nn.utils.clip_grad.clip_grad_norm_(params, limit)


def clip_with_norm(params, limit):       # accelerate >= 1.10 and the HF Trainer clip this way
    from torch.nn.utils import clip_grads_with_norm_, get_total_norm

    total = get_total_norm([p.grad for p in params if p.grad is not None])
    clip_grads_with_norm_(params, limit, total)


def clip_value(params, limit):
    torch.nn.utils.clip_grad_value_(params, limit)


def clip_value_module(params, limit):
    torch.nn.utils.clip_grad.clip_grad_value_(params, clip_value=limit)


def hand_norm(params) -> float:
    return math.sqrt(sum(float(p.grad.double().square().sum()) for p in params if p.grad is not None))


def hand_max(params) -> float:
    return max(float(p.grad.abs().max()) for p in params if p.grad is not None)


PATHS = [
    (clip_norm, "norm"), (clip_norm_module, "norm"), (clip_with_norm, "norm"),
    (clip_value, "value"), (clip_value_module, "value"),
]
IDS = ["clip_grad_norm_", "clip_grad.clip_grad_norm_", "get_total_norm+clip_grads_with_norm_",
       "clip_grad_value_", "clip_grad.clip_grad_value_"]


def run(clip, kind, steps=8, seed=0):
    """Train a small MLP; every other step's limit is far above the gradient, so it does not clip."""
    torch.manual_seed(seed)
    model = nn.Sequential(OrderedDict(dense_1=nn.Linear(4, 16), act=nn.Tanh(), dense_2=nn.Linear(16, 1)))
    params = list(model.parameters())
    optimizer = torch.optim.SGD(params, lr=0.05)
    norms, clipped = [], 0
    with GradientMonitor(model, None) as monitor:
        for step in range(steps):
            x = torch.randn(32, 4)
            optimizer.zero_grad(set_to_none=True)
            nn.functional.mse_loss(model(x), x.sum(1, keepdim=True)).backward()
            norm, largest = hand_norm(params), hand_max(params)
            if kind == "norm":
                limit = norm * (0.5 if step % 2 == 0 else 2.0)
                clipped += norm + 1e-6 > limit
            else:
                limit = largest * (0.5 if step % 2 == 0 else 2.0)
                clipped += largest > limit
            norms.append(norm)
            clip(params, limit)
            optimizer.step()
        monitor.log(0)
        return monitor.history[-1].overall, norms, clipped


@pytest.mark.parametrize("clip, kind", PATHS, ids=IDS)
def test_norm_before_clipping_and_clipped_steps_match_the_oracle(clip, kind):
    overall, norms, clipped = run(clip, kind)
    assert clipped == 4
    assert overall["clipped_steps"] == clipped
    assert overall["clip_calls"] == len(norms)
    assert overall["total_norm_before_clip"] == pytest.approx(sum(norms) / len(norms), rel=1e-6)
    # and the norm the step applied is the clipped one, below the norm before clipping
    assert overall["total_norm"] < overall["total_norm_before_clip"]


def test_clipping_paths_are_restored_after_the_last_monitor_leaves():
    names = ("clip_grad_norm_", "clip_grad_value_", "clip_grads_with_norm_")
    before = {name: getattr(torch.nn.utils, name) for name in names}
    module = {name: getattr(torch.nn.utils.clip_grad, name) for name in ("clip_grad_norm_", "clip_grad_value_")}
    model = nn.Linear(2, 1)
    with GradientMonitor(model, None):
        assert all(getattr(torch.nn.utils, name) is not before[name] for name in names)
    assert {name: getattr(torch.nn.utils, name) for name in names} == before
    assert {name: getattr(torch.nn.utils.clip_grad, name) for name in module} == module


def test_clipping_other_parameters_is_not_counted():
    model, other = nn.Linear(3, 1), nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with GradientMonitor(model, None) as monitor:
        model(torch.randn(4, 3)).sum().backward()
        other(torch.randn(4, 3)).sum().backward()
        torch.nn.utils.clip_grad_value_(other.parameters(), 1e-4)
        torch.nn.utils.clip_grad_norm_(other.parameters(), 1e-4)
        optimizer.step()
        monitor.log(0)
    assert "clipped_steps" not in monitor.history[-1].overall


def clip_per_group(params, limit):     # accelerate and the Trainer clip each device mesh in turn, one total
    from torch.nn.utils import clip_grads_with_norm_, get_total_norm

    total = get_total_norm([p.grad for p in params if p.grad is not None])
    clip_grads_with_norm_(params[:2], limit, total)
    clip_grads_with_norm_(params[2:], limit, total)


def test_one_total_norm_clipped_in_groups_counts_once():
    overall, norms, clipped = run(clip_per_group, "norm")
    assert overall["clip_calls"] == len(norms) and overall["clipped_steps"] == clipped == 4
    assert overall["total_norm_before_clip"] == pytest.approx(sum(norms) / len(norms), rel=1e-6)
