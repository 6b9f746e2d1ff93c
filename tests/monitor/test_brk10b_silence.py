"""Break tests of issue 20's silence (brk10b): training the monitor cannot see is said with its
true cause. Oracles: what the loop did (an update through ``.data``, ``torch.func``), and which
activation modules ran in a training pass (hooks of the test's own)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from gradflow.monitor import GradientMonitor


def _caught(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn()
    return out, [str(w.message) for w in caught]


@pytest.mark.parametrize("weights", [True, False])
@pytest.mark.parametrize("update", ["data-then-none", "autograd-grad-then-data"])
def test_an_update_through_data_is_not_blamed_on_torch_func(update, weights):
    """``p.data -= lr * p.grad; p.grad = None`` (the oldest hand-written loop) and
    ``torch.autograd.grad`` + ``p.data.sub_``: torch counts no change through ``.data``, so the
    version counters stay; the weights moved all the same. Before, the warning named torch.func
    training alone; now it names the update through .data (from the distance the weights moved),
    or both causes where the weights are not recorded."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    with GradientMonitor(model, weights=weights) as monitor:
        for _ in range(3):
            loss = model(torch.randn(8, 3)).square().mean()
            if update == "data-then-none":
                loss.backward()
                for p in model.parameters():
                    p.data -= 0.1 * p.grad
                    p.grad = None
            else:
                for p, g in zip(model.parameters(), torch.autograd.grad(loss, list(model.parameters()))):
                    p.data.sub_(0.1 * g)
        rows, messages = _caught(lambda: monitor.log(0))
    assert rows == {}
    said = [m for m in messages if "no optimizer step was recorded" in m]
    assert len(said) == 1, messages
    assert "through .data" in said[0] and "record()" in said[0], said
    if weights:
        assert "torch.func" not in said[0], said
