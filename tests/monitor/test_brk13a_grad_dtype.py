"""Break tests of the recording core (helper brk13a): gradients whose dtype is not their
parameter's. torch lets a parameter hold gradients of another dtype (``p.grad_dtype``: a float32
weight with float64 gradients, or ``None`` and any dtype assigned). The oracle is the gradient
the step applies, ``p.grad`` read where the optimizer steps, in float64."""

from __future__ import annotations

import math

import pytest
import torch
from monitor_oracle import GradientOracle, step_statistics
from torch import nn

from gradflow import GradientMonitor

if not hasattr(torch.Tensor, "grad_dtype"):
    pytest.skip("this torch has no Tensor.grad_dtype", allow_module_level=True)


def _check(rows: dict, oracle: GradientOracle) -> None:
    for name, row in rows.items():
        for key, expected in oracle.window(name).items():
            assert math.isclose(row[key], expected, rel_tol=1e-6, abs_tol=0.0), (name, key, row[key], expected)


@pytest.mark.parametrize("dtype, scale", [(torch.float32, 1e100), (torch.float32, 1e-100), (torch.bfloat16, 1e60),
                                          (torch.float16, 1e-60)],
                         ids=["f32-param-huge", "f32-param-subnormal", "bf16-param-huge", "f16-param-tiny"])
@pytest.mark.parametrize("grad_dtype", [torch.float64, None], ids=["grad_dtype-f64", "grad_dtype-any"])
def test_a_float64_gradient_of_a_smaller_parameter_keeps_its_range(dtype, scale, grad_dtype):
    """A small parameter of ``dtype`` whose gradients are float64 (values beyond float32's
    range, or below its smallest subnormal), beside a plain float32 one: its row is the float64
    gradient's, as for a float64 parameter. Before, the step's small gradients were copied into
    one float32 tensor: finite 1e100 gradients read as inf (nonfinite 15 of 15, mean NaN), 1e-100
    ones as exact zeros (zero_fraction 1.0 where 0)."""
    torch.manual_seed(0)
    holder = nn.Module()
    holder.weight = nn.Parameter(torch.zeros(5, dtype=dtype))
    holder.weight.grad_dtype = grad_dtype
    holder.plain = nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.SGD(holder.parameters(), lr=0.0)
    oracle = GradientOracle(holder.named_parameters())
    with GradientMonitor(holder, activations=False) as monitor:
        for _ in range(3):
            holder.weight.grad = torch.randn(5, dtype=torch.float64) * scale
            holder.plain.grad = torch.randn(3)
            oracle.capture()
            optimizer.step()
        rows = monitor.log(0)
    _check(rows, oracle)
    assert rows["weight"]["nonfinite"] == 0 and rows["weight"]["zero_fraction"] == 0.0


def test_gradients_that_turn_float64_mid_window_keep_the_steps_before():
    """``grad_dtype = None``: the first steps assign float32 gradients (copied and waiting to be
    folded), later ones float64 beyond float32's range, an empty parameter's too. Every step's
    figures are the oracle's, those folded before the change included."""
    torch.manual_seed(0)
    holder = nn.Module()
    holder.weight = nn.Parameter(torch.zeros(6))
    holder.empty = nn.Parameter(torch.zeros(0))
    holder.plain = nn.Parameter(torch.zeros(3))
    for p in (holder.weight, holder.empty):
        p.grad_dtype = None
    optimizer = torch.optim.SGD(holder.parameters(), lr=0.0)
    oracle = GradientOracle((name, p) for name, p in holder.named_parameters() if p.numel())
    with GradientMonitor(holder, activations=False) as monitor:
        for step in range(5):
            wide = step >= 2
            holder.weight.grad = torch.randn(6, dtype=torch.float64) * (1e80 if wide else 1.0)
            holder.weight.grad = holder.weight.grad if wide else holder.weight.grad.float()
            holder.empty.grad = torch.zeros(0, dtype=torch.float64 if wide else torch.float32)
            holder.plain.grad = torch.randn(3)
            oracle.capture()
            optimizer.step()
        rows = monitor.log(0)
    assert rows["weight"]["steps"] == rows["plain"]["steps"] == 5
    _check({name: rows[name] for name in ("weight", "plain")}, oracle)


def test_a_sparse_float64_gradient_of_a_float32_embedding_keeps_its_range():
    """``nn.Embedding(sparse=True)`` with ``grad_dtype = torch.float64``: its sparse gradient
    takes the copy's slow path (one tensor at a time), which made it float32 too (norm inf,
    nonfinite 24 where the oracle's is 3.2e100 and 0)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4, sparse=True), nn.Linear(4, 1))
    model[0].weight.grad_dtype = torch.float64
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    oracle = GradientOracle(model.named_parameters())
    with GradientMonitor(model, activations=False) as monitor:
        for _ in range(3):
            model[1].weight.grad, model[1].bias.grad = torch.randn(1, 4), torch.randn(1)
            values = torch.randn(2, 4, dtype=torch.float64) * 1e100
            model[0].weight.grad = torch.sparse_coo_tensor(torch.tensor([[1, 3]]), values, (10, 4)).coalesce()
            oracle.steps["0.weight"].append(step_statistics(model[0].weight.grad.to_dense()))
            for name in ("1.weight", "1.bias"):
                oracle.steps[name].append(step_statistics(oracle.params[name].grad))
            optimizer.step()
        rows = monitor.log(0)
    _check(rows, oracle)
