"""Two threads attaching a monitor to one model at the same moment: both pass check_attach's
look at the registry before either is registered; the second to claim the model is refused
before it adds a hook, and the first works as if alone."""

import threading

import torch
from torch import nn

from gradflow import GradientMonitor, MonitorError


def hook_counts(model: nn.Module) -> list[int]:
    """Every module's hooks, each kind apart."""
    return [len(getattr(m, kind)) for m in model.modules()
            for kind in ("_forward_pre_hooks", "_forward_hooks", "_backward_hooks", "_backward_pre_hooks")]


class SlowToList(nn.Sequential):
    """A model whose first named_parameters() call in a chosen thread waits for an event: that
    thread's monitor stops between check_attach and claiming the model."""

    def __init__(self, *layers):
        super().__init__(*layers)
        self.hold = None            # (thread ident, event to wait on, event to set on arrival)

    def named_parameters(self, *args, **kwargs):
        hold = self.hold
        if hold is not None and threading.get_ident() == hold[0]:
            self.hold = None
            hold[2].set()
            hold[1].wait(10)
        return super().named_parameters(*args, **kwargs)


def test_second_of_two_simultaneous_attaches_is_refused_and_leaves_no_hook():
    model = SlowToList(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    before = hook_counts(model)
    release, arrived = threading.Event(), threading.Event()
    outcome = {}

    def slow():
        model.hold = (threading.get_ident(), release, arrived)
        try:
            outcome["slow"] = GradientMonitor(model, None)
        except MonitorError as error:
            outcome["slow"] = error

    thread = threading.Thread(target=slow)
    thread.start()
    assert arrived.wait(10)                      # the slow thread passed the check and waits
    fast = GradientMonitor(model, None)          # attaches meanwhile
    release.set()
    thread.join(10)
    assert isinstance(outcome["slow"], MonitorError)
    assert "already has a GradientMonitor attached" in str(outcome["slow"])
    assert fast.attached
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.ones(2, 3)
    model(x).sum().backward()
    expected = model[0].weight.grad.norm().item()
    optimizer.step()
    assert abs(fast.log(0)["0.weight"]["norm"] - expected) < 1e-6
    fast.remove()
    assert hook_counts(model) == before
    GradientMonitor(model, None).remove()        # the model is free again
