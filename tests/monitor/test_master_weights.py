"""fp32 master weights: the optimizer steps float32 copies of a bfloat16 model's parameters and
the result is copied back. The monitor cannot see that step (it holds none of the monitored
tensors); log() must say so naming that cause, not only "an optimizer that is not a
torch.optim.Optimizer", and the remedy it gives (record() before the update) must work."""

import warnings

import torch
from torch import nn

from gradflow import GradientMonitor


def _step(model, masters, optimizer, monitor=None) -> float:
    """One master-weights step; the float64 norm of the first weight's gradient it applied."""
    model(torch.randn(4, 8, dtype=torch.bfloat16)).float().square().mean().backward()
    applied = model[0].weight.grad.double().norm().item()
    if monitor is not None:
        monitor.record()
    for p, master in zip(model.parameters(), masters):
        master.grad = p.grad.float()
    optimizer.step()
    with torch.no_grad():
        for p, master in zip(model.parameters(), masters):
            p.copy_(master)
            p.grad = None
    return applied


def _master_setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1)).to(torch.bfloat16)
    masters = [p.detach().float().clone().requires_grad_(True) for p in model.parameters()]
    return model, masters, torch.optim.AdamW(masters, lr=1e-3)


def test_master_weight_training_is_said_with_its_cause():
    model, masters, optimizer = _master_setup()
    with warnings.catch_warnings(record=True) as caught, GradientMonitor(model) as monitor:
        warnings.simplefilter("always")
        for _ in range(3):
            _step(model, masters, optimizer)
        assert monitor.log(0) == {}
    said = [str(w.message) for w in caught if "no optimizer step was recorded" in str(w.message)]
    assert len(said) == 1, [str(w.message) for w in caught]
    assert "master" in said[0] and "record()" in said[0], said[0]


def test_record_before_the_update_records_the_model_gradient():
    model, masters, optimizer = _master_setup()
    with GradientMonitor(model, automatic=False) as monitor:
        seen = [_step(model, masters, optimizer, monitor) for _ in range(3)]
        row = monitor.log(0)["0.weight"]
    assert row["steps"] == 3
    assert abs(row["norm"] - sum(seen) / 3) <= 1e-6 * max(seen)
