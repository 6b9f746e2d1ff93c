"""Bad arguments to GradientMonitor, record() and log() are one-line MonitorErrors that name what
was given and what is accepted, raised before anything changes, never an error from deep inside
(helper brk5a found: ``optimizer="sgd"`` raised "cannot create weak reference to 'str' object";
``record("opt")`` an AttributeError from steps.py; ``log("a")`` with a SummaryWriter a ValueError
from tensorboard's writer, and ``log(None)``, ``log(1.5)``, ``log(-1)`` were written as steps;
``monitor.history_length = -3`` emptied ``history`` at the next log). And logging twice with no
step between says nothing (it warned of a hand-written update)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from gradflow import GradientMonitor, MonitorError


def _stepped():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = GradientMonitor(model, activations=False)
    model(torch.randn(8, 3)).sum().backward()
    optimizer.step()
    return model, optimizer, monitor


def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("optimizer", ["sgd", [1], 3.0], ids=["str", "list", "float"])
def test_an_optimizer_that_is_not_one_is_refused_when_attaching(optimizer):
    model = nn.Linear(3, 1)
    with pytest.raises(MonitorError) as error:
        GradientMonitor(model, optimizer=optimizer)
    assert "optimizer" in _one_line(error) and repr(optimizer) in str(error.value)
    GradientMonitor(model).remove()                 # nothing was left attached


@pytest.mark.parametrize("what", ["opt", 5, "model", "groups"])
def test_record_of_something_that_is_not_an_optimizer_is_refused(what):
    model, optimizer, monitor = _stepped()
    given = {"opt": "opt", 5: 5, "model": model, "groups": optimizer.param_groups}[what]
    with monitor, pytest.raises(MonitorError) as error:
        monitor.record(given)
    assert "record" in _one_line(error) and type(given).__name__ in str(error.value)


@pytest.mark.parametrize("step", ["a", None, 1.5, True, -1, float("nan"), 2 ** 70],
                         ids=["str", "none", "float", "bool", "negative", "nan", "past-int64"])
def test_log_of_a_step_that_is_not_a_non_negative_int_is_refused_and_keeps_the_window(step):
    _, _, monitor = _stepped()
    with monitor:
        with pytest.raises(MonitorError) as error:
            monitor.log(step)
        assert "step" in _one_line(error) and repr(step) in str(error.value)
        assert monitor.log(0)["0.weight"]["steps"] == 1          # the window was not closed
        assert monitor.history[-1].step == 0


@pytest.mark.parametrize("step", [np.int64(3), torch.tensor(3), 0], ids=["numpy", "tensor", "zero"])
def test_log_takes_integer_steps_of_other_kinds(step):
    _, _, monitor = _stepped()
    with monitor:
        assert monitor.log(step)["0.weight"]["steps"] == 1
    assert monitor.history[-1].step == int(step) and type(monitor.history[-1].step) is int


@pytest.mark.parametrize("length", [-3, 0, "x", 2.0])
def test_history_length_set_later_is_checked(length):
    _, _, monitor = _stepped()
    with monitor:
        with pytest.raises(MonitorError) as error:
            monitor.history_length = length
        assert "history_length" in _one_line(error)
        monitor.log(0)
        assert len(monitor.history) == 1
        monitor.history_length = None
        assert monitor.history_length is None


def test_logging_twice_with_no_step_between_says_nothing():
    """The gradients left from the last recorded step are no sign of a step that was missed."""
    model, optimizer, monitor = _stepped()
    with monitor:
        assert monitor.log(0)["0.weight"]["steps"] == 1
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert monitor.log(0) == {}
            assert monitor.log(1) == {}
        model(torch.randn(8, 3)).sum().backward()             # a new gradient that no step applies
        with pytest.warns(UserWarning, match="no optimizer step was recorded"):
            monitor.log(2)


@pytest.mark.parametrize("flag", ["weights", "automatic", "nonfinite", "through_time"])
def test_a_switch_that_is_not_a_bool_is_refused(flag):
    """``automatic="no"`` was taken as True (a non-empty string)."""
    model = nn.Linear(3, 1)
    with pytest.raises(MonitorError) as error:
        GradientMonitor(model, **{flag: "no"})
    assert flag in _one_line(error) and "'no'" in str(error.value)
    GradientMonitor(model, **{flag: np.bool_(False)}).remove()     # numpy's bool is a bool


def test_record_skipped_that_is_not_a_bool_is_refused():
    _, optimizer, monitor = _stepped()
    with monitor:
        with pytest.raises(MonitorError, match="skipped"):
            monitor.record(optimizer, skipped="yes")
        assert monitor.log(0)["0.weight"]["steps"] == 1
