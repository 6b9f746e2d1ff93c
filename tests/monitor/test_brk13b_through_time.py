"""Break tests of the through-time part (brk13b): validation passes in eval mode with grad on.
Oracle: the same training run without the validation passes."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from gradflow.monitor import GradientMonitor


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(3, 8, batch_first=True)
        self.head = nn.Linear(8, 1)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


def _profiles(validate: str | None):
    """Two windows of two steps on sequences of 12; ``validate``: a validation pass in eval
    mode with grad on (a loss computed without no_grad) on sequences of 5, "first" or "last" in
    each window."""
    torch.manual_seed(0)
    model = _Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x, x_val = torch.randn(4, 12, 3), torch.randn(4, 5, 3)

    def validation():
        model.eval()
        model(x_val).square().mean()
        model.train()

    profiles = []
    with warnings.catch_warnings(record=True) as caught, GradientMonitor(model, through_time_every=1) as monitor:
        warnings.simplefilter("always")
        for window in range(2):
            if validate == "first":
                validation()
            for _ in range(2):
                optimizer.zero_grad()
                model(x).square().mean().backward()
                optimizer.step()
            if validate == "last":
                validation()
            monitor.log(window)
            profiles.append(monitor.history[-1].time)
    return profiles, [str(w.message) for w in caught]


@pytest.mark.parametrize("validate", ["first", "last"], ids=["validation-first", "validation-last"])
def test_validation_passes_in_eval_mode_are_not_profiled(validate):
    """Before, a validation pass in eval mode with grad on was profiled as a training pass: run
    before the training steps it fixed the window's sequence length, so the training passes
    (another length) were left out and every window's profile was empty, with a warning about
    lengths; run after them it gave that same warning, untrue of the training. Now eval-mode
    passes are not profiled: the profiles are the run's without validation, and nothing is said."""
    expected, _ = _profiles(None)
    profiles, messages = _profiles(validate)
    assert all(p.keys() == e.keys() == {"rnn.l0"} for p, e in zip(profiles, expected))
    for p, e in zip(profiles, expected):
        np.testing.assert_allclose(p["rnn.l0"], e["rnn.l0"], rtol=1e-12)
    assert not [m for m in messages if "through time" in m], messages
