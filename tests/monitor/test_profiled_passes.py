"""The model's root carries the monitor's hooks for the profiled passes only: every training pass
is counted by one forward pre-hook, and the parts are called (the pass's end hooked) only when the
schedule profiles it. Oracles: the hook dictionaries of the model itself, and pass counts made by
the test's own loop."""

from __future__ import annotations

import warnings

import pytest
import torch
from small_models import relu_mlp, sgd_step

from gradflow import GradientMonitor


def test_the_root_carries_the_pass_end_hook_on_profiled_passes_only():
    model = relu_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = []

    def note(module, inputs, output):          # the user's own hook on the root, after the monitor's
        seen.append((len(model._forward_pre_hooks), len(model._forward_hooks), len(model[1]._forward_hooks)))

    with GradientMonitor(model, activations_every=3) as monitor:
        model.register_forward_hook(note)
        for _ in range(7):
            sgd_step(model, optimizer)
        monitor.log(0)
    # passes 1, 4, 7 are profiled (the first, then the one after every 3rd step): the pass end and the
    # ReLU's tap are hooked there; the other passes carry the counting pre-hook and the user's hook alone
    profiled = [(1, 2, 1)]
    plain = [(1, 1, 0)]
    assert seen == profiled + plain * 2 + profiled + plain * 2 + profiled
    assert not model._forward_pre_hooks and len(model._forward_hooks) == 1 and not model[1]._forward_hooks


def test_every_training_pass_is_counted_per_window():
    """torch.func training (no .grad, no step): the warning names the window's training passes,
    profiled or not, and no evaluation pass."""
    from torch.func import functional_call, grad
    model = relu_mlp()
    params = {k: v.detach() for k, v in model.named_parameters()}
    x = torch.randn(8, 3)

    def loss(p):
        return functional_call(model, p, (x,)).square().mean()

    def train(passes: int) -> None:
        nonlocal params
        for _ in range(passes):
            g = grad(loss)(params)
            params = {k: v - 0.1 * g[k] for k, v in params.items()}
        with torch.no_grad():
            model(x)                               # an evaluation pass: not a training one

    with GradientMonitor(model, activations_every=2) as monitor:
        said = []
        for window, passes in enumerate([5, 3]):
            train(passes)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                monitor.log(window)
            said += [str(w.message) for w in caught if "torch.func" in str(w.message)]
            monitor._warnings.said.discard("unrecorded")      # said once per monitor: hear it again
    assert [m.split(" training forward passes")[0].split()[-1] for m in said] == ["5", "3"]


def test_a_clip_after_an_unprofiled_pass_of_a_replaced_model_is_counted():
    """``model.double()`` under ``set_overwrite_module_params_on_conversion`` (new tensors, a new
    optimizer for them) on a pass that is not profiled: the monitor follows at that pass's start,
    so the clipping calls between its backward and its step are of parameters it knows. Oracle:
    the norms ``clip_grad_norm_`` itself returned."""
    flag = torch.__future__.get_overwrite_module_params_on_conversion()
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        model = relu_mlp()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        with GradientMonitor(model, activations_every=10) as monitor:
            for _ in range(2):
                sgd_step(model, optimizer)
            model.double()
            optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
            norms = []
            for _ in range(3):
                optimizer.zero_grad()
                model(torch.randn(8, 3, dtype=torch.float64)).square().mean().backward()
                norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1e-3).item())
                optimizer.step()
            monitor.log(0)
        overall = monitor.history[-1].overall
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(flag)
    assert overall["steps"] == 5 and overall["clip_calls"] == 3 and overall["clipped_steps"] == 3
    assert overall["total_norm_before_clip"] == pytest.approx(sum(norms) / 3, rel=1e-6)
