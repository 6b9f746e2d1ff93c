"""A model with no parameters to monitor is refused in one line that says what to attach to: the
commonest cause, layers kept in a plain Python list (not registered), is named with its fix; it
said only 'Net has no floating-point parameters to monitor' (friction15)."""

import pytest
from torch import nn

from gradflow import GradientMonitor
from gradflow.monitor.tensors import MonitorError


class ListNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = [nn.Linear(2, 4), nn.Linear(4, 1)]   # a plain list: torch registers neither


@pytest.mark.parametrize("model, name", [(nn.ReLU(), "ReLU"), (ListNet(), "ListNet"), (nn.Sequential(), "Sequential")],
                         ids=["an-activation", "layers-in-a-plain-list", "empty-sequential"])
def test_no_parameters_names_the_model_and_what_to_attach(model, name):
    with pytest.raises(MonitorError) as raised:
        GradientMonitor(model)
    assert str(raised.value) == (f"{name} has no floating-point parameters to monitor; attach to the model that "
                                 "owns the trainable weights (layers kept in a plain list or dict are not "
                                 "registered: use nn.ModuleList / nn.ModuleDict)")
