"""float64 statistics over float64's whole range (brk15a): a sum of squares overflows past
|x| ~ 1.3e154 (and vanishes below ~1.5e-162), so norms of finite float64 tensors read inf (or 0).
The norms keep the tensor's own range, scaled by the largest |x| as LAPACK's dnrm2 does. The
oracle is ``math.hypot`` over the values (Python scales it, exact to an ulp or so) and ``statistics.pstdev``
(exact fractions), computed by hand from the tensors the step applied."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from torch import nn

from gradflow import GradientMonitor

SCALES = [1e200, 1e300, 1e-200, 1.0]
IDS = ["1e200", "1e300", "1e-200", "one"]


def _norm(t: torch.Tensor) -> float:
    return math.hypot(*t.double().reshape(-1).tolist())


def _model(scale: float) -> nn.Module:
    """The first layer's weights of about ``scale``, the last's of about 1 / ``scale``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 40), nn.ReLU(), nn.Linear(40, 3)).double()
    with torch.no_grad():
        for p in model[0].parameters():
            p.mul_(scale)
        for p in model[2].parameters():
            p.div_(scale)
    return model


def _set_gradients(params, scale: float) -> dict[int, torch.Tensor]:
    """Gradients of about ``scale`` set by hand (the oracle: what the step applies)."""
    generator = torch.Generator().manual_seed(1)
    for p in params:
        p.grad = torch.randn(p.shape, dtype=p.dtype, generator=generator) * scale
    return {id(p): p.grad.clone() for p in params}


@pytest.mark.parametrize("scale", SCALES, ids=IDS)
def test_float64_norms_keep_the_tensors_range(scale):
    """Weights of ~scale and ~1/scale, gradients of ~scale, activations of ~scale and the step's
    total norm: before, 1e200 read weight_norm inf, total_norm inf and activation std NaN."""
    model = _model(scale)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    outputs: list[torch.Tensor] = []
    model[1].register_forward_hook(lambda m, i, out: outputs.append(out.detach().clone()))
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    with GradientMonitor(model, weights=True, activations=True, activations_every=1) as monitor:
        model(torch.randn(8, 6, dtype=torch.float64))
        grads = _set_gradients(list(model.parameters()), scale)
        optimizer.step()
        rows = monitor.log(0)
    window = monitor.history[-1]
    for name, p in model.named_parameters():
        assert rows[name]["norm"] == pytest.approx(_norm(grads[id(p)]), rel=1e-12), name
        assert rows[name]["weight_norm"] == pytest.approx(_norm(weights[name]), rel=1e-12), name
    total = math.hypot(*(_norm(g) for g in grads.values()))
    assert window.overall["total_norm"] == pytest.approx(total, rel=1e-12)
    values = outputs[-1].reshape(-1).tolist()
    assert window.activations["1"]["mean"] == pytest.approx(statistics.fmean(values), rel=1e-9)
    assert window.activations["1"]["std"] == pytest.approx(statistics.pstdev(values), rel=1e-9)


@pytest.mark.filterwarnings("ignore:.*the parameters changed in place")     # the update is by hand
@pytest.mark.parametrize("scale", SCALES, ids=IDS)
def test_float64_update_ratio_keeps_the_range(scale):
    """||w_end - w_start|| / ||w_start|| over a window in which every weight grew by 1%."""
    model = _model(scale)
    start = {name: p.detach().clone() for name, p in model.named_parameters()}
    with GradientMonitor(model, weights=True, activations=False) as monitor:
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1.01)
        monitor.log(0)
    for name, p in model.named_parameters():
        expected = _norm(p.detach() - start[name]) / _norm(start[name])
        assert monitor.history[-1].weights[name]["update_ratio"] == pytest.approx(expected, rel=1e-9), name


@pytest.mark.parametrize("scale", SCALES, ids=IDS)
def test_float64_gate_norms_keep_the_range(scale):
    torch.manual_seed(0)
    lstm = nn.LSTM(3, 4).double()
    with torch.no_grad():
        for p in lstm.parameters():
            p.mul_(scale)
    optimizer = torch.optim.SGD(lstm.parameters(), lr=0.0)
    with GradientMonitor(lstm, activations=False, through_time=False) as monitor:
        grads = _set_gradients(list(lstm.parameters()), scale)
        optimizer.step()
        monitor.log(0)
    gates = monitor.history[-1].gates["weight_hh_l0"]
    grad, weight = grads[id(lstm.weight_hh_l0)], lstm.weight_hh_l0.detach()
    for k, gate in enumerate(gates):
        rows = slice(4 * k, 4 * k + 4)
        assert gates[gate]["norm"] == pytest.approx(_norm(grad[rows]), rel=1e-12), gate
        assert gates[gate]["weight_norm"] == pytest.approx(_norm(weight[rows]), rel=1e-12), gate
