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


def run(clip, steps: int = 6, micro: int = 1):
    """A small MLP, SGD; ``clip(params, step)`` clips and returns (oracle norm before clipping,
    whether the step clipped). Odd steps' batches are 4x larger, so limits and norms vary."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3))
    params = list(model.parameters())
    optimizer = torch.optim.SGD(params, lr=0.05)
    norms, clipped = [], 0
    with GradientMonitor(model, None, activations=False) as monitor:
        for step in range(steps):
            optimizer.zero_grad(set_to_none=True)
            for k in range(micro):
                model(torch.randn(8, 4) * (1 + 3 * (step % 2))).square().mean().backward()
                if k < micro - 1:                 # clipping each micro-batch: the last call's norm is the step's
                    clip(params, step)
            norm, did = clip(params, step)
            norms.append(norm)
            clipped += did
            optimizer.step()
        monitor.log(0)
    return monitor.history[-1].overall, norms, clipped


def limit(norm: float, step: int) -> float:
    return norm * (0.5 if step % 2 else 2.0)


def clip_norm_type(norm_type):
    def clip(params, step):
        before, p = l2(params), pnorm(params, norm_type)
        U.clip_grad_norm_(params, limit(p, step), norm_type=norm_type)
        return before, p + 1e-6 > limit(p, step)
    return clip


def total_norm_type(norm_type):      # accelerate's clip_grad_norm_(norm_type=...) clips this way
    def clip(params, step):
        before = l2(params)
        total = U.get_total_norm(grads(params), norm_type=norm_type)
        U.clip_grads_with_norm_(params, limit(float(total), step), total)
        return before, float(total) + 1e-6 > limit(float(total), step)
    return clip


@pytest.mark.parametrize("clip", [clip_norm_type(1.0), clip_norm_type(math.inf), clip_norm_type(3.0),
                                  total_norm_type(1.0), total_norm_type(math.inf)],
                         ids=["norm_type=1", "norm_type=inf", "norm_type=3", "get_total_norm(1)", "get_total_norm(inf)"])
def test_norm_before_clipping_is_the_l2_norm_whatever_norm_clips(clip):
    overall, norms, clipped = run(clip)
    assert clipped == 3 and overall["clipped_steps"] == clipped and overall["clip_calls"] == len(norms)
    assert overall["total_norm_before_clip"] == pytest.approx(sum(norms) / len(norms), rel=1e-6)


def twice_same(params, step):
    before = l2(params)
    U.clip_grad_norm_(params, limit(before, step))
    U.clip_grad_norm_(params, limit(before, step))       # on what the first left: within its limit
    return before, before + 1e-6 > limit(before, step)


def value_then_norm(params, step):
    before = l2(params)
    largest = max(float(g.abs().max()) for g in grads(params))
    U.clip_grad_value_(params, largest * 2.0)             # clamps nothing
    U.clip_grad_norm_(params, limit(l2(params), step))
    return before, before + 1e-6 > limit(before, step)


def two_halves(params, step):                             # a body and a head clipped apart
    before, body, head = l2(params), params[:2], params[2:]
    U.clip_grad_norm_(body, limit(l2(body), step))
    U.clip_grad_norm_(head, l2(head) * 2.0)
    return before, step % 2 == 1


def each_micro_batch(params, step):                       # accelerate's clip_grad_norm_ outside `if sync_gradients`
    before = l2(params)
    U.clip_grad_norm_(params, limit(before, step))
    return before, before + 1e-6 > limit(before, step)


@pytest.mark.parametrize("clip, micro", [(twice_same, 1), (value_then_norm, 1), (two_halves, 1), (each_micro_batch, 3)],
                         ids=["same parameters twice", "value then norm", "two disjoint halves", "each micro-batch"])
def test_several_clipping_calls_in_one_step_count_that_step_once(clip, micro):
    overall, norms, clipped = run(clip, micro=micro)
    assert overall["clip_calls"] == len(norms) == overall["steps"]
    assert overall["clipped_steps"] == clipped == 3
    assert overall["total_norm_before_clip"] == pytest.approx(sum(norms) / len(norms), rel=1e-6)


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


def test_a_call_over_clipped_and_unclipped_parameters_says_what_the_step_keeps():
    def body_then_all(params, step):
        before = l2(params[:2])
        U.clip_grad_norm_(params[:2], before * 0.5)
        U.clip_grad_norm_(params, 1e9)
        return before, True

    with pytest.warns(UserWarning, match="earlier calls' norm"):
        overall, norms, clipped = run(body_then_all, steps=2)
    assert overall["clip_calls"] == 2 and overall["clipped_steps"] == 2
    assert overall["total_norm_before_clip"] == pytest.approx(sum(norms) / len(norms), rel=1e-6)


def test_get_total_norm_is_torch_s_own_again_after_the_last_monitor_leaves():
    before = U.get_total_norm
    with GradientMonitor(nn.Linear(2, 1), None):
        assert U.get_total_norm is not before             # watched: it tells clip_grads_with_norm_ its norm
        assert U.get_total_norm(torch.ones(4), norm_type=1.0).item() == 4.0
    assert U.get_total_norm is before
