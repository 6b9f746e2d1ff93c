"""A window's start (the parts' ``reset()``, called by ``log()``): every sum the next window adds
to starts from zero, whichever way it is zeroed (the fused kernels' numpy views on the CPU, or
``torch._foreach_zero_``), skipped steps and a bounded activation's linear bins included.

Oracle: a twin monitor attached, on an identical copy of the model, right before the window that
is compared: what it sums over the same steps is what a window that started from nothing holds.
"""

from __future__ import annotations

import copy
from collections import OrderedDict

import pytest
import torch
from torch import nn

from gradflow.monitor import GradientMonitor


def _model() -> nn.Module:
    """A tanh (bounded: linear bins) and a ReLU tap."""
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(dense_1=nn.Linear(3, 6), tanh=nn.Tanh(), dense_2=nn.Linear(6, 6),
                                     relu=nn.ReLU(), dense_3=nn.Linear(6, 1)))


def _steps(model, optimizer, monitor, batches, skip: bool) -> None:
    for i, x in enumerate(batches):
        optimizer.zero_grad()
        model(x).square().mean().backward()
        if skip and i == 1:                        # an AMP overflow: counted apart, with its non-finite values
            model.dense_1.weight.grad[0, 0] = float("nan")
            monitor.record(skipped=True)
            continue
        optimizer.step()


def _sums(monitor) -> dict[str, torch.Tensor]:
    out = {}
    for name, part in monitor.parts.items():
        part.fold()
        out.update({f"{name}/{key}": reduced.tensor.clone() for key, reduced in part.device_tensors().items()})
    out["gradients/skipped"] = torch.from_numpy(monitor.parts["gradients"].skipped.copy())
    out["activations/elements"] = torch.from_numpy(monitor.parts["activations"].elements.copy())
    return out


@pytest.mark.parametrize("skip_before, views", [(True, True), (False, True), (True, False)],
                         ids=["skipped-step-views", "no-skip-views", "skipped-step-torch-zero"])
def test_a_window_after_log_sums_what_a_new_monitor_sums(skip_before, views):
    """Two windows (the second with a skipped step, or not), then a third, whose sums are compared
    with a twin's attached just before it: every device sum, the skipped counts and the tapped
    elements equal, exactly. ``views=False``: the activations' numpy views are dropped before
    each log() (as a move or a new unit drops them), so their sums are zeroed by torch."""
    torch.manual_seed(1)
    batches = [torch.randn(8, 3) for _ in range(9)]
    model = _model()
    twin = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    with GradientMonitor(model, activations_every=1) as monitor:
        for window in range(2):
            _steps(model, optimizer, monitor, batches[3 * window:3 * window + 3], skip=skip_before and window == 1)
            held = _sums(monitor)
            if window == 1:        # what the reset has to clear was there: linear bins, skipped steps
                assert held["activations/linear"].any() and held["activations/counts"].any()
                assert held["gradients/skipped_nonfinite"].any() == skip_before == bool(held["gradients/skipped"].any())
            if not views:
                monitor.parts["activations"]._host = None
            monitor.log(window)
            for key, tensor in _sums(monitor).items():       # the weights' rows are read from the weights
                assert key.startswith("weights/") or not tensor.any(), f"{key} not zero after log()"
        twin_optimizer = torch.optim.SGD(twin.parameters(), lr=0.05)
        twin.load_state_dict(model.state_dict())
        twin_optimizer.load_state_dict(optimizer.state_dict())
        with GradientMonitor(twin, activations_every=1) as fresh:
            _steps(model, optimizer, monitor, batches[6:], skip=True)
            _steps(twin, twin_optimizer, fresh, batches[6:], skip=True)
            ours, theirs = _sums(monitor), _sums(fresh)
            assert ours.keys() == theirs.keys()
            for key in theirs:
                assert torch.equal(ours[key], theirs[key]), key
            assert monitor.log(2) == fresh.log(2)
