"""write_custom_scalars / custom_scalars_layout given something that is not a list of parameter
names refuse it in one line naming what was accepted; the model itself raised AttributeError:
'Linear' object has no attribute 'rpartition' from deep inside (friction15)."""

import pytest
import torch
from torch import nn

from gradflow.monitor.sinks import custom_scalars_layout, write_custom_scalars
from gradflow.monitor.tensors import MonitorError

MODEL = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1))


class _Writer:
    def add_custom_scalars(self, layout):
        self.layout = layout


@pytest.mark.parametrize("parameters, got", [
    (MODEL, "got Sequential holding Linear"),
    (list(MODEL.named_parameters()), "got list holding tuple"),
    ("0.weight", "got str"),
    (None, "got NoneType"),
    (torch.ones(2), "got Tensor holding Tensor"),
], ids=["the-model", "named-parameters-pairs", "one-string", "none", "a-tensor"])
def test_what_is_not_parameter_names_is_refused_in_one_line(parameters, got):
    with pytest.raises(MonitorError) as raised:
        write_custom_scalars(_Writer(), parameters)
    message = str(raised.value)
    assert "\n" not in message and message.endswith(got)
    assert message.startswith("parameters must be a list of parameter names (monitor.names, or "
                              "[name for name, _ in model.named_parameters()])")


@pytest.mark.parametrize("parameters", [
    ["0.weight", "0.bias", "2.weight"], ("0.weight", "0.bias", "2.weight"),
    dict.fromkeys(["0.weight", "0.bias", "2.weight"]).keys(), (n for n, _ in MODEL.named_parameters()),
], ids=["list", "tuple", "dict-keys", "generator"])
def test_any_iterable_of_names_gives_the_same_layout(parameters):
    assert custom_scalars_layout(parameters) == custom_scalars_layout(["0.weight", "0.bias", "2.weight"])
