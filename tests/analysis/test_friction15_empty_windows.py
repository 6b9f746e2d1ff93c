"""A window that recorded no step (``log()`` before the first step, or twice in a row) is no
evidence: it counted toward the verdict's 5-window floor, so 4 windows of training and one
``log(0)`` before it read ``healthy`` where 4 alone read ``insufficient`` (friction15). A run
directory's tables never hold such a window, so the live verdict now agrees with the saved one."""

import pytest
import torch
from torch import nn

from gradflow import GradientMonitor
from gradflow.analysis.diagnose import diagnose_monitor


def _train(empty_logs: str, trained: int):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    losses, step = [], 0
    with GradientMonitor(model, histograms=False) as monitor:
        if empty_logs == "before":
            monitor.log(step)
            step += 1
        for _ in range(trained):
            x = torch.randn(16, 2)
            loss = nn.functional.mse_loss(model(x), x.sum(1, keepdim=True))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
            monitor.log(step)
            step += 1
            if empty_logs == "twice":
                monitor.log(step)
                step += 1
    return diagnose_monitor(monitor, losses)


@pytest.mark.parametrize("empty_logs, trained, insufficient, note", [
    ("none", 4, True, "only 4 windows recorded, at least 5"),
    ("before", 4, True, "only 4 windows recorded (1 more with no step recorded, not counted), at least 5"),
    ("twice", 4, True, "only 4 windows recorded (4 more with no step recorded, not counted), at least 5"),
    ("none", 5, False, "5 windows (at least 5 needed)"),
    ("before", 5, False, "5 windows (1 more with no step recorded, not counted) (at least 5 needed)"),
], ids=["4-trained", "log-before-the-first-step", "log-twice-each-time", "5-trained", "5-trained-and-one-empty"])
def test_windows_with_no_step_do_not_count_toward_the_floor(empty_logs, trained, insufficient, note):
    diagnosis = _train(empty_logs, trained)
    assert ("insufficient" in diagnosis.verdicts) is insufficient
    assert note in diagnosis.evidence["checks"]["insufficient"]["why"]
    assert diagnosis.evidence["checks"]["insufficient"]["value"] == trained
