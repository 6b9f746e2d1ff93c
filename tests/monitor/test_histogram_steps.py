"""Which steps the gradient histograms hold (``gradients.HISTOGRAM_EVERY``), while zero_fraction
and nonfinite count every element of every step. Oracles: the gradients themselves, taken where
the optimizer steps (a step pre-hook registered before the monitor's, which runs last)."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch
from monitor_oracle import sign_exponent_bin
from torch import nn

from gradflow import GradientMonitor
from gradflow.monitor.gradients import HISTOGRAM_EVERY


def small_and_large() -> nn.Sequential:
    """dense_1.weight (70,000 values) takes the large path; the rest is copied and reduced later."""
    return nn.Sequential(OrderedDict(dense_1=nn.Linear(700, 100), tanh=nn.Tanh(), dense_2=nn.Linear(100, 1)))


def bins(values: torch.Tensor) -> np.ndarray:
    out = np.zeros(512, np.int64)
    for value in values.float().reshape(-1).tolist():
        out[sign_exponent_bin(value)] += 1
    return out


@pytest.mark.parametrize("steps", [1, 9, 10, 11, 23])
def test_zeros_and_nonfinite_count_every_step_and_histograms_every_tenth(steps, reduction_path):
    """Zeros, subnormals and a NaN put into the gradients at steps the histograms skip: the
    window's zero_fraction and nonfinite count them, and the histograms hold steps 0, 10, 20
    alone, bin by bin (the NaN of a skipped step is in none of them)."""
    torch.manual_seed(0)
    model = small_and_large()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    seen = {name: [] for name, _ in model.named_parameters()}

    def doctor_and_keep(opt, args, kwargs):
        step = len(seen["dense_1.weight"])
        for name, p in model.named_parameters():
            if step % HISTOGRAM_EVERY:                       # a step the histograms skip
                p.grad[..., : step % 7] = 0.0
                if step == 4:
                    p.grad[..., -1:] = float("nan")
                elif step % 2:
                    p.grad[..., -1:] = 1e-40                 # a subnormal: no zero
            seen[name].append(p.grad.detach().clone())

    optimizer.register_step_pre_hook(doctor_and_keep)
    # After the step: the NaN's weights made finite again, so that it stays one step's.
    optimizer.register_step_post_hook(lambda *_: [p.data.nan_to_num_(0.0) for p in model.parameters()] and None)
    with GradientMonitor(model, None) as monitor:
        for _ in range(steps):
            optimizer.zero_grad()
            model(torch.randn(8, 700)).pow(2).mean().backward()
            optimizer.step()
        gradients = monitor.parts["gradients"]
        gradients.reduce()
        counts = gradients.counts.view(-1, 512).numpy().copy()
        logged = monitor.log(0)
    for i, (name, grads) in enumerate(seen.items()):
        every = torch.stack(grads)
        assert logged[name]["zero_fraction"] == (every == 0).sum().item() / every.numel(), name
        assert logged[name]["nonfinite"] == (~torch.isfinite(every)).sum().item(), name
        histogrammed = sum((bins(g) for g in grads[::HISTOGRAM_EVERY]), np.zeros(512, np.int64))
        np.testing.assert_array_equal(counts[i], histogrammed, err_msg=name)
    assert logged["dense_1.weight"]["nonfinite"] == (100 if steps > 4 else 0)      # one per row at step 4


def test_each_expert_and_the_router_get_histograms_at_their_own_steps(reduction_path):
    """A mixture of 6 experts, 2 routed to at each of 40 steps (at random): every parameter's
    histogram holds its own 0th, 10th, ... step with a gradient, ceil(its steps / 10) of them,
    whatever the other parameters did (the router has a gradient at every step: 4 histograms)."""
    torch.manual_seed(3)
    experts = nn.ModuleList([nn.Linear(4, 4) for _ in range(6)])
    model = nn.ModuleDict({"router": nn.Linear(4, 6), "experts": experts})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    kept = {name: [] for name, _ in model.named_parameters()}

    def keep(opt, args, kwargs):
        for name, p in model.named_parameters():
            if p.grad is not None:
                kept[name].append(p.grad.clone())

    optimizer.register_step_pre_hook(keep)
    generator = torch.Generator().manual_seed(0)
    with GradientMonitor(model, None, activations=False) as monitor:
        for _ in range(40):
            optimizer.zero_grad(set_to_none=True)
            x = torch.randn(8, 4)
            chosen = torch.randperm(6, generator=generator)[:2].tolist()
            gate = model["router"](x).softmax(-1)
            out = sum(gate[:, e:e + 1] * experts[e](x) for e in chosen)
            out.pow(2).mean().backward()
            optimizer.step()
        gradients = monitor.parts["gradients"]
        gradients.reduce()
        counts = gradients.counts.view(-1, 512).numpy()
        for i, name in enumerate(monitor.names):
            expected = sum((bins(g) for g in kept[name][::HISTOGRAM_EVERY]), np.zeros(512, np.int64))
            np.testing.assert_array_equal(counts[i], expected, err_msg=name)
    assert len(kept["router.weight"]) == 40 and counts[monitor.names.index("router.weight")].sum() == 4 * 24
    assert len({len(grads) for grads in kept.values()}) > 2          # the experts' step counts differ


def test_each_optimizer_gets_histograms_at_its_own_steps(reduction_path):
    """A GAN's two optimizers step in turn: each network's parameters are histogrammed at their
    own steps 0, 10, ... with a gradient (here 0 and 10 of their 12), not at the window's steps 0
    and 10 (which would be the generator's alone)."""
    torch.manual_seed(1)
    generator, critic = nn.Linear(4, 4), nn.Linear(4, 1)
    model = nn.Sequential(OrderedDict(generator=generator, critic=critic))
    optimizers = [torch.optim.SGD(generator.parameters(), lr=0.01), torch.optim.SGD(critic.parameters(), lr=0.01)]
    kept = {"generator": [], "critic": []}
    with GradientMonitor(model, None, activations=False) as monitor:
        for step in range(24):
            who = ("generator", "critic")[step % 2]
            optimizer = optimizers[step % 2]
            model.zero_grad(set_to_none=True)
            model(torch.randn(8, 4)).pow(2).mean().backward()
            if who == "generator":
                critic.zero_grad(set_to_none=True)            # the generator's step holds its own gradients
            kept[who].append(getattr(model, who).weight.grad.clone())
            optimizer.step()
        gradients = monitor.parts["gradients"]
        gradients.reduce()
        counts = gradients.counts.view(-1, 512).numpy()
        index = {name: i for i, name in enumerate(monitor.names)}
        for who in kept:
            expected = bins(kept[who][0]) + bins(kept[who][HISTOGRAM_EVERY])
            np.testing.assert_array_equal(counts[index[f"{who}.weight"]], expected, err_msg=who)


@pytest.mark.parametrize("every, histogrammed", [(1, 13), (4, 4), (13, 1), (100, 1)])
def test_histogram_every_sets_the_steps_a_histogram_holds(every, histogrammed, reduction_path):
    """13 steps: histogram_every=N holds steps 0, N, 2N, ... of the window (ceil(13 / N) of them)."""
    torch.manual_seed(2)
    model = small_and_large()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with GradientMonitor(model, None, histogram_every=every) as monitor:
        for _ in range(13):
            optimizer.zero_grad()
            model(torch.randn(8, 700)).pow(2).mean().backward()
            optimizer.step()
        gradients = monitor.parts["gradients"]
        gradients.reduce()
        counts = gradients.counts.view(-1, 512).sum(1).tolist()
    assert counts == [histogrammed * p.numel() for p in model.parameters()]


@pytest.mark.parametrize("bad", [0, -1, 2.5, "10", None, True])
def test_bad_histogram_every_is_a_one_line_error(bad):
    from gradflow import MonitorError

    with pytest.raises(MonitorError, match=r"^histogram_every must be a positive int \(1: every step\), got ") as error:
        GradientMonitor(small_and_large(), None, histogram_every=bad)
    assert "\n" not in str(error.value)
