"""AMP the way torch's AMP recipe clips: ``scaler.unscale_(optimizer)``, then clipping, then
``scaler.step(optimizer)``, with an overflow on one step. The overflow step is skipped: it is
counted in ``skipped_steps`` and is averaged into nothing, neither the gradient rows (fused
optimizers unscale inside their own step, and here were already unscaled) nor the norm before
clipping. Oracle: ``.grad`` after ``unscale_`` and the norm ``clip_grad_norm_`` returned, on the
applied steps only."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradflow import GradientMonitor


def _optimizer(name, params):
    kind, _, fused = name.partition("-")
    cls = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD, "adagrad": torch.optim.Adagrad}[kind]
    try:
        return cls(params, lr=1e-3, fused=bool(fused))
    except (RuntimeError, TypeError) as error:
        pytest.skip(f"no {name} here: {error}")


@pytest.mark.parametrize("clip", [None, "clip_grad_norm_", "clip_grad_value_"])
@pytest.mark.parametrize("name", ["adam-fused", "sgd-fused", "adagrad-fused", "adam"])
def test_unscale_then_step_counts_the_overflow_step_as_skipped_only(name, clip):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    optimizer = _optimizer(name, model.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    grad_norms, clip_norms, clipped = [], [], 0
    with GradientMonitor(model, activations=False) as monitor:
        for i in range(4):
            optimizer.zero_grad()
            scaler.scale(nn.functional.mse_loss(model(x * (i + 1)), y)).backward()
            if i == 2:                                             # an overflow: the scaler skips this step
                model[0].weight.grad[0, 0] = float("inf")
            scaler.unscale_(optimizer)
            if i != 2:
                grads = [p.grad.double() for p in model.parameters()]
                grad_norms.append(grads[0].norm().item())
                clip_norms.append(torch.cat([g.reshape(-1) for g in grads]).norm().item())
                clipped += 1 if clip == "clip_grad_norm_" else int(max(g.abs().max() for g in grads) > 0.05)
            if clip == "clip_grad_norm_":
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
            elif clip == "clip_grad_value_":
                torch.nn.utils.clip_grad_value_(model.parameters(), 0.05)
            scaler.step(optimizer)
            scaler.update()
        rows = monitor.log(0)
    row, overall = rows["0.weight"], monitor.history[-1].overall
    assert (row["steps"], row["skipped_steps"], row["nonfinite"]) == (3, 1, 0)
    assert (overall["steps"], overall["skipped_steps"]) == (3, 1)
    if clip is None:
        assert row["norm"] == pytest.approx(sum(grad_norms) / 3, rel=1e-5)
        assert "clip_calls" not in overall
    else:
        assert overall["clip_calls"] == 3 and overall["clipped_steps"] == clipped
        assert overall["total_norm_before_clip"] == pytest.approx(sum(clip_norms) / 3, rel=1e-5)


def test_a_non_finite_norm_on_an_applied_step_is_still_averaged_in():
    """Without a GradScaler the step with an inf gradient is applied: its norm before clipping
    (inf) is part of the window, as before."""
    torch.manual_seed(1)
    model = nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    with GradientMonitor(model, activations=False) as monitor:
        for i in range(2):
            model(torch.randn(8, 4)).sum().backward()
            if i == 1:
                model.weight.grad[0, 0] = float("inf")
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad()
        monitor.log(0)
    overall = monitor.history[-1].overall
    assert overall["clip_calls"] == 2 and overall["total_norm_before_clip"] == float("inf")
