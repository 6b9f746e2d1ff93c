"""Three faults a review of the night's diff found (review15), each against its oracle:

- an inf gradient or activation of a float32 model read as finite once the float64 range's
  scaled sums came in (stats.wide_root, wide_spread): total_norm 0 for the inf step, std 0.0;
- ``log()`` after ``remove()`` with layers changed in the window re-attached the removed monitor;
- bfloat16 gradients and weights under ``torch.set_default_dtype(torch.float64)`` failed in the
  fused kernels: their conversion buffers took the default dtype, not float32.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gradflow.monitor import GradientMonitor


def _applied_norms(model, optimizer):
    """Each step's total norm as the step applies it: float64, in the last step pre-hook, scaled by
    the largest |g| (as dnrm2) so that 1e200 gradients do not overflow the oracle itself."""
    norms = []

    def oracle(opt, args, kwargs):
        grads = torch.cat([p.grad.double().reshape(-1) for p in model.parameters() if p.grad is not None])
        largest = grads.abs().max().item()
        norms.append(largest if largest in (0.0, math.inf) or math.isnan(largest)
                     else largest * (grads / largest).square().sum().sqrt().item())
    optimizer.register_step_pre_hook(oracle)
    return norms


@pytest.mark.parametrize("float64_beside", [False, True], ids=["float32-only", "float64-layer-of-1e200-beside"])
def test_an_inf_gradient_reads_inf_in_the_total_norm(float64_beside):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    if float64_beside:
        model[1].double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    with GradientMonitor(model, activations=False) as monitor:
        norms = _applied_norms(model, optimizer)
        for step in range(3):
            optimizer.zero_grad()
            hidden = model[0](torch.randn(5, 4))
            model[1](hidden.to(model[1].weight.dtype)).sum().backward()
            if float64_beside:
                model[1].weight.grad.mul_(1e200)
            if step == 2:                                  # the last: SGD's 0 * inf would make the weights NaN
                model[0].weight.grad[0, 0] = float("inf")
            optimizer.step()
        monitor.log(0)
    overall = monitor.history[-1].overall
    assert norms[2] == math.inf and math.isfinite(norms[0]) and math.isfinite(norms[1])
    assert overall["total_norm_max"] == math.inf
    assert overall["total_norm"] == math.inf           # the mean over the steps, one of them inf


def test_a_float64_model_past_1e154_still_reads_its_finite_norm():
    """The other side of the same rule: no inf value, float64 gradients of 1e200: finite."""
    model = nn.Linear(3, 2).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    with GradientMonitor(model, activations=False) as monitor:
        norms = _applied_norms(model, optimizer)
        for _ in range(2):
            optimizer.zero_grad()
            model(torch.randn(4, 3, dtype=torch.float64)).sum().backward()
            for p in model.parameters():
                p.grad.mul_(1e200)
            optimizer.step()
        monitor.log(0)
    overall = monitor.history[-1].overall
    assert overall["total_norm_max"] == pytest.approx(max(norms), rel=1e-12)
    assert overall["total_norm"] == pytest.approx(sum(norms) / 2, rel=1e-12)


def test_an_inf_activation_of_a_float32_model_reads_nan_std():
    """A ReLU whose outputs are inf (1e30 x 1e10 overflows float32): its std is not a number,
    as ``statistics.pstdev`` of values with an inf is; it read 0.0."""
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))
    with torch.no_grad():
        model[0].weight.fill_(1e30)
        model[0].bias.zero_()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    with GradientMonitor(model, activations_every=1) as monitor:
        optimizer.zero_grad()
        out = model(torch.full((3, 2), 1e10))
        assert torch.isinf(model[0](torch.full((3, 2), 1e10))).all()
        out.sum().backward()
        optimizer.step()
        monitor.log(0)
    (row,) = monitor.history[-1].activations.values()
    assert math.isnan(row["std"])


def test_log_after_remove_with_changed_layers_does_not_attach_again():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with GradientMonitor(model) as monitor:
        model(torch.randn(2, 4)).sum().backward()
        optimizer.step()
    model.append(nn.Linear(1, 1))                              # a head added after training
    with pytest.warns(UserWarning):
        stats = monitor.log(0)                                 # the last window: its rows still
    assert stats["0.weight"]["steps"] == 1
    assert not monitor.attached
    with GradientMonitor(model) as again:                      # the model is free for a new monitor
        assert again.attached


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_under_a_float64_default_dtype(dtype):
    """Gradients folded a piece at a time (large ones) and weights too, with torch's default
    dtype float64: the rows match the float64 oracle of the applied gradient."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(0)
        model = nn.Linear(512, 512).to(dtype)                  # 262,144 weights: the large path
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        with GradientMonitor(model, activations=False) as monitor:
            norms = _applied_norms(model, optimizer)
            model(torch.randn(4, 512).to(dtype)).float().square().sum().backward()
            applied = model.weight.grad.double().norm().item()
            optimizer.step()
            stats = monitor.log(0)
    finally:
        torch.set_default_dtype(before)
    assert stats["weight"]["norm"] == pytest.approx(applied, rel=1e-9)
    assert monitor.history[-1].overall["total_norm"] == pytest.approx(norms[0], rel=1e-9)
    assert stats["weight"]["weight_norm"] == pytest.approx(model.weight.double().norm().item(), rel=1e-6)
