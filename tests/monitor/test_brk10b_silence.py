"""Break tests of issue 20's silence (brk10b): training the monitor cannot see is said with its
true cause. Oracles: what the loop did (an update through ``.data``, ``torch.func``), and which
activation modules ran in a training pass (hooks of the test's own)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from gradflow.monitor import GradientMonitor


def _caught(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn()
    return out, [str(w.message) for w in caught]


@pytest.mark.parametrize("weights", [True, False])
@pytest.mark.parametrize("update", ["data-then-none", "autograd-grad-then-data"])
def test_an_update_through_data_is_not_blamed_on_torch_func(update, weights):
    """``p.data -= lr * p.grad; p.grad = None`` (the oldest hand-written loop) and
    ``torch.autograd.grad`` + ``p.data.sub_``: torch counts no change through ``.data``, so the
    version counters stay; the weights moved all the same. Before, the warning named torch.func
    training alone; now it names the update through .data (from the distance the weights moved),
    or both causes where the weights are not recorded."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    with GradientMonitor(model, weights=weights) as monitor:
        for _ in range(3):
            loss = model(torch.randn(8, 3)).square().mean()
            if update == "data-then-none":
                loss.backward()
                for p in model.parameters():
                    p.data -= 0.1 * p.grad
                    p.grad = None
            else:
                for p, g in zip(model.parameters(), torch.autograd.grad(loss, list(model.parameters()))):
                    p.data.sub_(0.1 * g)
        rows, messages = _caught(lambda: monitor.log(0))
    assert rows == {}
    said = [m for m in messages if "no optimizer step was recorded" in m]
    assert len(said) == 1, messages
    assert "through .data" in said[0] and "record()" in said[0], said
    if weights:
        assert "torch.func" not in said[0], said


class _PartlyUntapped(nn.Module):
    """A Tanh that runs as a module, plus one activation module the monitor cannot tap, as asked:
    an nn.GELU the forward replaces by F.gelu (a Hugging Face-style layer), or a ReLU block under
    reentrant checkpointing (its forward runs under no_grad, then again inside backward)."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.fc1, self.tanh, self.fc2, self.gelu, self.fc3 = (nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.GELU(),
                                                              nn.Linear(8, 1))
        self.block = nn.Sequential(nn.Linear(8, 8), nn.ReLU())

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint
        h = self.tanh(self.fc1(x))
        if self.how == "function":
            h = self.block(torch.nn.functional.gelu(self.fc2(h)))
        else:
            h = checkpoint(self.block, self.gelu(self.fc2(h)), use_reentrant=self.how == "reentrant")
        return self.fc3(h)


@pytest.mark.parametrize("how, missing, cause", [
    ("function", "gelu", "computes these activations with functions"),
    ("reentrant", "block.1", "reentrant activation checkpointing"),
    ("non-reentrant", None, None),
])
def test_activation_modules_the_monitor_cannot_tap_are_named_with_their_cause(how, missing, cause):
    """Some activation modules tapped, one not: its row is missing, and one warning names it and
    why (before: silently absent; the cause was said only when no module at all gave output).
    Oracle: the modules that ran in a training forward pass, seen by the test's own forward hooks
    (grad mode on, outside backward)."""
    torch.manual_seed(0)
    model = _PartlyUntapped(how)
    ran = set()
    for name, module in model.named_modules():
        if isinstance(module, (nn.Tanh, nn.GELU, nn.ReLU)):
            module.register_forward_hook(lambda m, i, o, name=name: ran.add(name) if torch.is_grad_enabled()
                                         and torch._C._current_graph_task_id() == -1 else None)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with GradientMonitor(model, activations_every=1) as monitor:
        for _ in range(2):
            optimizer.zero_grad()
            model(torch.randn(8, 4, requires_grad=True)).square().mean().backward()
            optimizer.step()
        _, messages = _caught(lambda: monitor.log(0))
    assert sorted(monitor.history[-1].activations) == sorted(ran)
    said = [m for m in messages if "activation modules gave no output" in m]
    if missing is None:
        assert not said and ran == {"tanh", "gelu", "block.1"}, messages
        return
    assert ran == {"tanh", "gelu", "block.1"} - {missing}
    assert len(said) == 1 and f": {missing} " in said[0] and cause in said[0] and "torch.compile" not in said[0], said
