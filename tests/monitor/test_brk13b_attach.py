"""Break tests of attaching (brk13b): models the monitor cannot hook are refused at attach, in one
line, with nothing left on them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradflow.monitor import GradientMonitor, MonitorError


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("how", ["trace", "script"])
def test_a_torchscript_model_is_refused_at_attach(how):
    """A model made with torch.jit.trace or torch.jit.script: its forward runs as a TorchScript
    graph. Before, a traced model attached and the monitor's forward pre-hook then raised
    AttributeError ('OrderedDictWrapper' object has no attribute 'get') out of the first training
    forward pass; a scripted one raised torch's RuntimeError (get_submodule is not supported on
    ScriptModules) from inside the monitor. Now both are a one-line MonitorError at attach that
    says what to attach instead, nothing is left on the model, and the eager model attaches."""
    base = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    scripted = torch.jit.trace(base, torch.randn(3, 4)) if how == "trace" else torch.jit.script(base)
    with pytest.raises(MonitorError, match="TorchScript") as raised:
        GradientMonitor(scripted)
    assert "\n" not in str(raised.value) and "eager" in str(raised.value)
    assert _hooks(base) == 0
    optimizer = torch.optim.SGD(scripted.parameters(), lr=0.1)
    scripted(torch.randn(3, 4)).sum().backward()       # the model trains as before
    optimizer.step()
    with GradientMonitor(base) as monitor:
        optimizer = torch.optim.SGD(base.parameters(), lr=0.1)
        base(torch.randn(3, 4)).sum().backward()
        optimizer.step()
        assert list(monitor.log(0)) == ["0.weight", "0.bias", "2.weight", "2.bias"]


@pytest.mark.parametrize("where", [0, 2], ids=["first-layer", "last-layer"])
def test_a_model_with_a_torchscript_module_inside_is_refused_at_attach(where):
    """An eager model holding a scripted layer: before, attaching raised torch's RuntimeError
    (register_forward_pre_hook is not supported on ScriptModules) from inside the monitor. Now a
    one-line MonitorError names the layer, and nothing is left on the model."""
    layers = [nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)]
    layers[where] = torch.jit.script(layers[where])
    model = nn.Sequential(*layers)
    with pytest.raises(MonitorError, match=rf"^module {where} is a TorchScript module") as raised:
        GradientMonitor(model)
    assert "\n" not in str(raised.value)
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()
               if not isinstance(m, torch.jit.ScriptModule)) == 0


def test_a_parameter_free_torchscript_module_inside_is_left_alone():
    """A scripted activation (no parameters) takes no monitor hook: the model attaches and its
    gradients are recorded, as before."""
    model = nn.Sequential(nn.Linear(4, 8), torch.jit.script(nn.ReLU()), nn.Linear(8, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with GradientMonitor(model) as monitor:
        model(torch.randn(3, 4)).sum().backward()
        optimizer.step()
        assert list(monitor.log(0)) == ["0.weight", "0.bias", "2.weight", "2.bias"]
