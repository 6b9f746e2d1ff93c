"""diagnose_monitor given something that is not a monitor (the model, the losses first) says so in
one line, naming what it got and what it takes; it raised AttributeError: 'Linear' object has no
attribute 'history' (friction15)."""

import pytest
import torch
from torch import nn

from gradflow.analysis.diagnose import diagnose_monitor


@pytest.mark.parametrize("not_a_monitor, name", [
    (nn.Linear(2, 1), "Linear"),
    ([0.5, 0.4, 0.3], "list"),
    (None, "NoneType"),
    (torch.ones(3), "Tensor"),
], ids=["the-model", "the-losses", "none", "a-tensor"])
def test_diagnose_monitor_refuses_what_is_not_a_monitor_in_one_line(not_a_monitor, name):
    with pytest.raises(TypeError) as raised:
        diagnose_monitor(not_a_monitor, [1.0, 0.9])
    message = str(raised.value)
    assert "\n" not in message
    assert f"takes the GradientMonitor you called log() on, got {name};" in message
    assert "diagnose_run(RUN_DIR)" in message
