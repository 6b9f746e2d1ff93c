"""Layers added to or removed from the model mid-run (brk15a): a layer appended (given to the
optimizer with ``add_param_group``, or to a new optimizer), a layer deleted, a head swapped for one
of another name. Before, the monitor stopped with a warning and ``log()`` raised MonitorError: the
whole window was lost. Now the window's rows hold the parameters that stayed (equal to the
oracle: each step's gradient read in an optimizer step pre-hook, float64), one warning line names
the change, and the new set is recorded from the next window."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from gradflow import GradientMonitor


def _append(model, optimizer):
    model.append(nn.Linear(2, 1))
    optimizer.add_param_group({"params": list(model[3].parameters())})
    return optimizer


def _append_new_optimizer(model, optimizer):
    model.append(nn.Linear(2, 1))
    return torch.optim.SGD(model.parameters(), lr=0.05)


def _delete(model, optimizer):
    del model[2]                                    # 2.weight, 2.bias gone; the optimizer still holds them
    model[1] = nn.Sequential(nn.Tanh(), nn.Linear(4, 2))
    optimizer.add_param_group({"params": list(model[1][1].parameters())})
    return optimizer


def _swap_head(model, optimizer):
    del model[2]
    model.add_module("head", nn.Linear(4, 2))
    return torch.optim.SGD(model.parameters(), lr=0.05)


CHANGES = {"append-add_param_group": (_append, {"3.weight", "3.bias"}, set()),
           "append-new-optimizer": (_append_new_optimizer, {"3.weight", "3.bias"}, set()),
           "delete": (_delete, {"1.1.weight", "1.1.bias"}, {"2.weight", "2.bias"}),
           "swap-head": (_swap_head, {"head.weight", "head.bias"}, {"2.weight", "2.bias"})}


class _Oracle:
    """Each step's gradient norms, by name, read as the step applies them."""

    def __init__(self, model) -> None:
        self.model, self.steps = model, []

    def __call__(self, optimizer, args, kwargs) -> None:
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        self.steps.append({name: p.grad.double().norm().item() for name, p in self.model.named_parameters()
                           if p.grad is not None and id(p) in held})

    def rows(self, first: int, last: int) -> dict[str, tuple[int, float]]:
        """(steps, mean norm) of each parameter over steps first..last-1."""
        norms: dict[str, list[float]] = {}
        for step in self.steps[first:last]:
            for name, norm in step.items():
                norms.setdefault(name, []).append(norm)
        return {name: (len(values), sum(values) / len(values)) for name, values in norms.items()}


@pytest.mark.parametrize("change", list(CHANGES), ids=list(CHANGES))
def test_a_layer_added_or_removed_mid_window_keeps_the_window(change):
    edit, added, gone = CHANGES[change]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    oracle = _Oracle(model)
    optimizer.register_step_pre_hook(oracle)
    x = torch.randn(8, 3)
    with warnings.catch_warnings(record=True) as caught, GradientMonitor(model, activations=False) as monitor:
        warnings.simplefilter("always")
        windows = []
        for window in range(3):
            for step in range(3):
                if (window, step) == (1, 1):
                    before = set(dict(model.named_parameters()))
                    optimizer = edit(model, optimizer)
                    if not optimizer._optimizer_step_pre_hooks:
                        optimizer.register_step_pre_hook(oracle)
                optimizer.zero_grad()
                model(x).square().mean().backward()
                optimizer.step()
            windows.append(monitor.log(window))
        assert monitor.attached
    for k, rows in enumerate(windows):
        expected = oracle.rows(3 * k, 3 * k + 3)
        if k == 1:                                  # the window it changed in: the parameters that stayed
            expected = {name: row for name, row in expected.items() if name not in added}
        assert set(rows) == set(expected), (k, set(rows), set(expected))
        for name, (steps, norm) in expected.items():
            assert rows[name]["steps"] == steps, (k, name)
            assert rows[name]["norm"] == pytest.approx(norm, rel=1e-6), (k, name)
    assert added <= set(windows[2]) and not gone & set(windows[2])
    assert before - gone <= set(windows[1]) and not added & set(windows[1])
    said = [str(w.message) for w in caught if "changed" in str(w.message)]
    assert len(said) == 1 and "\n" not in said[0], said
    assert all(name in said[0] for name in sorted(added)[:3] + sorted(gone)[:3]), said
    assert not [w for w in caught if "stopped recording" in str(w.message)]


def test_a_layer_appended_between_windows_is_recorded_from_the_next():
    """Found at log() (no training step saw it): the closing window is whole, the next has it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    x = torch.randn(8, 3)
    with GradientMonitor(model, activations=False) as monitor:
        model(x).square().mean().backward()
        optimizer.step()
        model.append(nn.Linear(2, 1))
        optimizer.add_param_group({"params": list(model[3].parameters())})
        with pytest.warns(UserWarning, match="new: 3.weight, 3.bias; gone: none"):
            assert set(monitor.log(0)) == {"0.weight", "0.bias", "2.weight", "2.bias"}
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
        assert monitor.log(1)["3.weight"]["norm"] == pytest.approx(model[3].weight.grad.double().norm().item())
