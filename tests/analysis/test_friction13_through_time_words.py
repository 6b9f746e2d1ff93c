"""The through-time evidence of a run with one profiled window, and what the advice points at
(friction13).

A loop of 30 optimizer steps under the default ``through_time_every=50`` is profiled at its first
step only: the verdict said "late in the run (median of the last 1 window(s); 0 in the first)"
of that one window at step 0, and its advice pointed at ``monitor.history[-1].time``, which is
``{}`` there. The oracle: which windows hold a profile (``Window.time``), read off the windows.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from gradflow import GradientMonitor
from gradflow.analysis.diagnose import diagnose, diagnose_monitor
from gradflow.analysis.through_time import check_through_time
from gradflow.monitor import Window

STUCK = [0.693] * 6
VANISHED = np.logspace(-12, -1, 100)
EXPLODED = np.logspace(6, 0, 100)


def profiled_at(profile, timed):
    """Six windows of 5 steps; those in ``timed`` hold a through-time profile."""
    return [Window(i, 5, time={"rnn.l0": np.asarray(profile, dtype=float)} if i in timed else {},
                   time_cells={"rnn.l0": "RNN_TANH"} if i in timed else {}) for i in range(6)]


@pytest.mark.parametrize("profile", [VANISHED, EXPLODED], ids=["vanishing", "exploding"])
def test_one_profiled_window_is_not_called_late_in_the_run(profile):
    check = check_through_time(profiled_at(profile, {0}), {"first": 0.693, "tail": 0.693})
    assert check["fired"]
    assert "late in the run" not in check["why"] and "in the first" not in check["why"], check["why"]
    assert "in the only window profiled through time (logged at 0;" in check["why"], check["why"]


def test_several_profiled_windows_keep_the_late_median():
    check = check_through_time(profiled_at(VANISHED, {0, 3, 5}), {"first": 0.693, "tail": 0.693})
    assert "late in the run (median of the last 1 window(s); 1e-11 in the first)" in check["why"], check["why"]


def test_the_advice_points_at_windows_that_hold_a_profile():
    torch.manual_seed(0)
    rnn, head = nn.RNN(3, 8, batch_first=True), nn.Linear(8, 1)
    model = nn.ModuleDict({"rnn": rnn, "head": head})
    optimizer, losses = torch.optim.SGD(model.parameters(), lr=1e-6), []
    x, y = torch.randn(16, 200, 3), torch.randn(16, 1)
    with GradientMonitor(model) as monitor:                       # through_time_every=50: step 0 alone
        for epoch in range(6):
            for _ in range(5):
                optimizer.zero_grad()
                loss = nn.functional.mse_loss(head(rnn(x)[0][:, -1]), y)
                loss.backward()
                optimizer.step()
            losses.append(loss.item())
            monitor.log(epoch)
    timed = [w.step for w in monitor.history if w.time]
    assert timed == [0] and monitor.history[-1].time == {}
    diagnosis = diagnose_monitor(monitor, losses)
    assert "time" in " ".join(diagnosis.verdicts + [diagnosis.recommendation])
    assert "monitor.history[-1].time" not in diagnosis.recommendation, diagnosis.recommendation
    pointer = "[w.time for w in monitor.history if w.time]"
    assert pointer in diagnosis.recommendation, diagnosis.recommendation
    assert eval(pointer, {"monitor": monitor})                    # what it points at is there
    assert "monitor.history" not in diagnose(monitor.history, losses, context="run").recommendation
