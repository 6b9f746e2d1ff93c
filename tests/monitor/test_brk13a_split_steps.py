"""Break tests of the recording core (helper brk13a): one backward's gradients applied by several
optimizers, each over its own parameters, one after the other (torch.optim.Muon takes matrices
only, so its users step AdamW over the rest; a body's and a head's optimizers; an optimizer per
parameter stepping inside backward). The window's total norm per step is the norm of the
gradient a training step applies, as ``clip_grad_norm_`` over the model computes it (the
oracle, in float64, read before the first step). A GAN's steps, with a forward pass between
them, stay a step each."""

from __future__ import annotations

import math

import pytest
import torch
from test_brk10a_optimizers import _batch
from torch import nn

from gradflow import GradientMonitor


def _norm(params) -> float:
    return math.sqrt(sum(p.grad.double().square().sum().item() for p in params if p.grad is not None))


def _split(model: nn.Module, kind: str) -> list[torch.optim.Optimizer]:
    if kind == "muon-adamw":
        matrices = [p for p in model.parameters() if p.dim() == 2]
        return [torch.optim.Muon(matrices, lr=0.02), torch.optim.AdamW([p for p in model.parameters() if p.dim() != 2])]
    return [torch.optim.SGD(model[0].parameters(), lr=0.01), torch.optim.Adam(model[2].parameters(), lr=1e-3)]


@pytest.mark.parametrize("kind", ["muon-adamw", "body-head"])
@pytest.mark.parametrize("wide", [8, 16400], ids=["small", "large-body"])
@pytest.mark.parametrize("zero", ["zero-all-first", "zero-after-each-step"])
def test_optimizers_stepping_parts_of_one_backward_give_its_total_norm(kind, wide, zero):
    """Before: each optimizer's step was a step of its own, so total_norm was the mean of the
    parts' norms (0.650 where the training steps' norm was 0.953, and total_norm_before_clip in
    the same window said 0.953 with nothing clipped), total_norm_max below that mean."""
    if kind == "muon-adamw" and not hasattr(torch.optim, "Muon"):
        pytest.skip("no torch.optim.Muon here")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, wide), nn.Tanh(), nn.Linear(wide, 1))
    optimizers = _split(model, kind)
    norms = []
    with GradientMonitor(model, activations=False) as monitor:
        for i in range(5):
            if zero == "zero-all-first":
                for optimizer in optimizers:
                    optimizer.zero_grad()
            x, y = _batch(i)
            nn.functional.mse_loss(model(x), y).backward()
            norms.append(_norm(model.parameters()))
            clipped = torch.nn.utils.clip_grad_norm_(model.parameters(), 1e6)
            assert clipped.item() == pytest.approx(norms[-1], rel=1e-5)
            for optimizer in optimizers:
                optimizer.step()
                if zero == "zero-after-each-step":
                    optimizer.zero_grad()
        rows = monitor.log(0)
    overall = monitor.history[-1].overall
    assert overall["steps"] == 5 and all(row["steps"] == 5 for row in rows.values())
    assert overall["total_norm"] == pytest.approx(sum(norms) / 5, rel=1e-5)
    assert overall["total_norm_max"] == pytest.approx(max(norms), rel=1e-5)
    assert overall["total_norm_before_clip"] == pytest.approx(overall["total_norm"], rel=1e-5)


def test_an_optimizer_per_parameter_stepping_inside_backward_gives_each_iterations_norm():
    """``register_post_accumulate_grad_hook`` steps (torch's optimizer-in-backward recipe): one
    iteration's steps are one step's total norm (before: the mean of the parameters' own norms)."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    optimizers = {p: torch.optim.SGD([p], lr=0.01) for p in model.parameters()}
    squares: list[float] = []

    def step_in_backward(p):
        squares[-1] += p.grad.double().square().sum().item()
        optimizers[p].step()
        optimizers[p].zero_grad()

    handles = [p.register_post_accumulate_grad_hook(step_in_backward) for p in model.parameters()]
    try:
        with GradientMonitor(model, activations=False) as monitor:
            for _ in range(4):
                squares.append(0.0)
                model(torch.randn(8, 3)).pow(2).mean().backward()
            monitor.log(0)
    finally:
        for handle in handles:
            handle.remove()
    norms = [math.sqrt(s) for s in squares]
    overall = monitor.history[-1].overall
    assert overall["steps"] == 4
    assert overall["total_norm"] == pytest.approx(sum(norms) / 4, rel=1e-5)
    assert overall["total_norm_max"] == pytest.approx(max(norms), rel=1e-5)


@pytest.mark.parametrize("freeze", [False, True], ids=["plain", "D-frozen-for-G"])
def test_a_gans_two_steps_with_a_forward_pass_between_stay_two(freeze):
    """D's step, then G's forward pass, backward and step: two steps, each its own network's norm
    (the documented GAN reading: total_norm is the mean over the optimizers' steps)."""
    torch.manual_seed(0)
    nets = nn.ModuleDict({"G": nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 4)),
                          "D": nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))})
    opt_g = torch.optim.Adam(nets["G"].parameters(), lr=1e-3)
    opt_d = torch.optim.Adam(nets["D"].parameters(), lr=1e-3)
    norms = []
    with GradientMonitor(nets, activations=False) as monitor:
        for _ in range(3):
            real, z = torch.randn(8, 4), torch.randn(8, 2)
            opt_d.zero_grad()
            fake = nets["G"](z)
            (nn.functional.softplus(-nets["D"](real)).mean()
             + nn.functional.softplus(nets["D"](fake.detach())).mean()).backward()
            norms.append(_norm(nets["D"].parameters()))
            opt_d.step()
            nets["D"].requires_grad_(not freeze)
            opt_g.zero_grad()
            nn.functional.softplus(-nets["D"](fake)).mean().backward()
            norms.append(_norm(nets["G"].parameters()))
            opt_g.step()
            nets["D"].requires_grad_(True)
        monitor.log(0)
    overall = monitor.history[-1].overall
    assert overall["total_norm"] == pytest.approx(sum(norms) / 6, rel=1e-5)
    assert overall["total_norm_max"] == pytest.approx(max(norms), rel=1e-5)


def test_repeated_steps_are_never_read_as_a_run_from_step_zero():
    """A run of pending copies whose steps repeat (records joined into one step) with a gap
    (a step with no small gradient): not the kept ``arange`` of its length."""
    from gradflow.monitor.gradients import _steps_array

    assert _steps_array((0, 0, 2), repeats=True).tolist() == [0, 0, 2]
    assert _steps_array((0, 1, 2)).tolist() == [0, 1, 2]
