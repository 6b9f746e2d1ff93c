"""``with monitor:`` on a monitor that no longer records (brk15a): it is refused at ``__enter__``
with a MonitorError naming what was wrong, before the body trains unrecorded."""

import pytest
import torch
from torch import nn

from gradflow import GradientMonitor
from gradflow.monitor import MonitorError


def _removed_by_remove(model):
    monitor = GradientMonitor(model)
    monitor.remove()
    return monitor


def _removed_by_with(model):
    with GradientMonitor(model) as monitor:
        pass
    return monitor


def _removed_by_detach(model):
    monitor = GradientMonitor(model)
    GradientMonitor.detach(model)
    return monitor


@pytest.mark.parametrize("removal", [_removed_by_remove, _removed_by_with, _removed_by_detach],
                         ids=["remove", "with-exited", "detach"])
def test_entering_a_removed_monitor_is_refused(removal):
    model = nn.Linear(3, 1)
    monitor = removal(model)
    with pytest.raises(MonitorError) as error, monitor:
        raise AssertionError("the body ran")
    message = str(error.value)
    assert "\n" not in message and "removed" in message and "GradientMonitor(model)" in message
    with GradientMonitor(model) as again:            # what the message says to do works
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        model(torch.randn(4, 3)).sum().backward()
        optimizer.step()
        assert again.log(0)["weight"]["steps"] == 1


@pytest.mark.parametrize("automatic", [True, False], ids=["automatic", "manual"])
def test_entering_an_attached_monitor_works(automatic):
    model = nn.Linear(3, 1)
    monitor = GradientMonitor(model, automatic=automatic)
    with monitor as entered:
        assert entered is monitor
        model(torch.randn(4, 3)).sum().backward()
        monitor.record()
        assert monitor.log(0)["weight"]["steps"] == 1
    assert not monitor.attached
