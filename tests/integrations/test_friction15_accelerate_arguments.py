"""record_if_synced given the wrong objects (the model for the monitor, the arguments swapped)
refuses in one line naming what it got and what it takes; it raised AttributeError ('Sequential'
object has no attribute 'record', 'str' object has no attribute 'sync_gradients') (friction15)."""

import pytest
import torch
from torch import nn

from gradflow import GradientMonitor
from gradflow.integrations.accelerate import record_if_synced

accelerate = pytest.importorskip("accelerate")


@pytest.mark.parametrize("which, expected", [
    ("model-as-monitor", "monitor must be a GradientMonitor (attached with automatic=False), got Sequential"),
    ("swapped", "monitor must be a GradientMonitor (attached with automatic=False), got Accelerator"),
    ("string-accelerator", "accelerator must be an accelerate.Accelerator (it reads accelerator.sync_gradients), "
                           "got str"),
], ids=["model-as-monitor", "swapped", "string-accelerator"])
def test_wrong_objects_are_refused_in_one_line(which, expected):
    model = nn.Sequential(nn.Linear(2, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    accelerator = accelerate.Accelerator(cpu=True)
    with GradientMonitor(model, automatic=False) as monitor:
        args = {"model-as-monitor": (model, accelerator), "swapped": (accelerator, monitor),
                "string-accelerator": (monitor, "accelerator")}[which]
        with pytest.raises(TypeError) as raised:
            record_if_synced(*args, optimizer)
    assert str(raised.value) == f"record_if_synced(monitor, accelerator, optimizer): {expected}"
