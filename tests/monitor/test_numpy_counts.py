"""Counts given as numpy integers (read from an array or a config) are taken as the ints they
are, by the monitor and by the callbacks; bools and floats are still refused in one line."""

import numpy as np
import pytest
import torch
from torch import nn

from gradflow import GradientMonitor, MonitorError
from gradflow.integrations.recorder import Recorder


def test_numpy_integer_counts_are_taken_as_ints():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with GradientMonitor(model, None, activations_every=np.int64(2), histogram_every=np.int32(3),
                         through_time_every=np.int64(5), history_length=np.int64(4)) as monitor:
        assert type(monitor.history_length) is int and monitor.history_length == 4
        assert type(monitor.activations_every) is int
        for step in range(6):
            for _ in range(2):
                optimizer.zero_grad()
                model(torch.randn(5, 3)).sum().backward()
                optimizer.step()
            monitor.log(np.int64(step))
        assert len(monitor.history) == 4
        assert monitor.history[-1].gradients["0.weight"]["steps"] == 2
        monitor.history_length = np.int16(2)
        assert len(monitor.history) == 2 and type(monitor.history_length) is int


@pytest.mark.parametrize("name, value", [("histogram_every", True), ("activations_every", 2.0),
                                         ("history_length", np.float64(3)), ("histogram_every", np.int64(0))])
def test_bools_floats_and_non_positive_counts_are_refused(name, value):
    with pytest.raises(MonitorError, match=rf"^{name} must be a positive int"):
        GradientMonitor(nn.Linear(2, 1), None, **{name: value})


def test_the_recorder_takes_a_numpy_histogram_every():
    assert Recorder(histogram_every=np.int64(5)).options["histogram_every"] == 5
    with pytest.raises(ValueError, match="^histogram_every must be a positive int"):
        Recorder(histogram_every=np.float32(5))
