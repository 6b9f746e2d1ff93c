"""Break tests of issue 20's kinds (brk10b): parametrized weights in the verdict, conversions a
kept optimizer does not follow, mixed dtypes with subnormals. Oracles: statistics taken from
``p.grad`` in a step pre-hook registered after the monitor attached, and the verdict of the same
model without parametrizations."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.utils.parametrize as parametrize
from torch import nn

from gradflow.analysis.diagnose import diagnose_monitor
from gradflow.monitor import GradientMonitor


class _Identity(nn.Module):
    """A user's own parametrization: the weight as it is (the verdict must not change)."""

    def forward(self, x):
        return x


def _verdict(parametrized: bool, with_model: bool):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(100, 16), nn.LayerNorm(16, bias=False), nn.Linear(16, 16), nn.Tanh(),
                          nn.Linear(16, 1))
    if parametrized:
        parametrize.register_parametrization(model[0], "weight", _Identity())
        parametrize.register_parametrization(model[1], "weight", _Identity())
        parametrize.register_parametrization(model[1], "weight", _Identity())     # two stacked
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with GradientMonitor(model) as monitor:
        for window in range(10):
            for _ in range(3):
                optimizer.zero_grad()
                model(torch.randint(0, 100, (4,))).square().mean().backward()
                optimizer.step()
            monitor.log(window)
    diagnosis = diagnose_monitor(monitor, model=model if with_model else None)
    return diagnosis.verdicts, {k: (v["kind"], v["role"]) for k, v in diagnosis.evidence["layers"].items()}


@pytest.mark.parametrize("with_model", [True, False], ids=["model=", "recorded-kinds"])
def test_parametrized_embedding_and_norm_keep_their_kind_in_the_verdict(with_model):
    """An embedding and a LayerNorm whose weights are parametrized (a user's own parametrization,
    two stacked on the norm): the verdict, given the model or not, reads them as the same model
    unparametrized does. Before, ``diagnose(model=...)`` looked their kinds up under torch's names
    (``0.parametrizations.weight.original``) while the windows hold ``0.weight``: both were judged
    as hidden weight layers and the embedding, with few rows hit, was called ``vanishing``."""
    plain = _verdict(parametrized=False, with_model=with_model)
    assert plain[1]["0"] == ("embedding", "embedding") and plain[1]["1"] == ("norm", "norm")
    assert _verdict(parametrized=True, with_model=with_model) == plain


def _applied(optimizer, names):
    """The oracle: per step, the names of the parameters whose gradient the step applies (those
    of its groups with a gradient), seen by a step pre-hook registered after the monitor's."""
    steps = []
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: steps.append(
        [names[id(p)] for group in opt.param_groups for p in group["params"] if p.grad is not None]))
    return steps


@pytest.mark.parametrize("replace", ["overwrite-double", "assign", "new-parameter"])
def test_an_optimizer_kept_after_the_model_replaced_its_parameters_is_said_and_records_nothing(replace):
    """The model's parameters replaced by new tensors mid-window while the optimizer made before
    is kept (a conversion under set_overwrite_module_params_on_conversion, load_state_dict(...,
    assign=True), ``model[0].weight = nn.Parameter(...)``): that optimizer steps the old tensors,
    which get no gradient, so its steps apply nothing to those parameters. Before: under the
    overwrite flag the first step after the conversion recorded the new tensors' gradients (3
    steps where 2 were applied), and nothing ever said why training stopped. Now each parameter's
    steps are the steps that applied its gradient, and one warning names the replaced ones (at
    the step that found the conversion, or at the first step of the next window)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))
    x = torch.randn(5, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    applied = _applied(optimizer, names)
    previous = torch.__future__.get_overwrite_module_params_on_conversion()
    torch.__future__.set_overwrite_module_params_on_conversion(replace == "overwrite-double")
    messages = []
    try:
        with warnings.catch_warnings(record=True) as caught, GradientMonitor(model, activations=False) as monitor:
            warnings.simplefilter("always")
            for window in range(2):
                for step in range(3):
                    if window == 0 and step == 2:
                        if replace == "overwrite-double":
                            model.double()
                            x = x.double()
                        elif replace == "assign":
                            model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
                        else:
                            model[0].weight = nn.Parameter(model[0].weight.detach().clone())
                    optimizer.zero_grad()
                    model(x).square().mean().backward()
                    optimizer.step()
                rows = monitor.log(window)
                for name in names.values():
                    expected = sum(name in step for step in applied[3 * window:3 * window + 3])
                    assert rows.get(name, {}).get("steps", 0) == expected, (window, name, rows.get(name))
            messages = [str(w.message) for w in caught]
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(previous)
    said = [m for m in messages if "no longer the model's" in m]
    replaced = "0.weight were" if replace == "new-parameter" else "0.weight, 0.bias, 2.weight, 2.bias were"
    assert len(said) == 1 and replaced in said[0], messages


@pytest.mark.parametrize("change, cause", [
    ("complex-all", "0.weight, 0.bias, 2.weight, 2.bias became torch.complex64"),
    ("complex-head", "2.weight, 2.bias became torch.complex64"),
    ("wider-layer", "0.weight was replaced by a tensor of another shape"),
])
def test_a_change_the_monitor_cannot_follow_never_raises_inside_training(change, cause):
    """A conversion or replacement the window's sums cannot follow, found by a hook inside the
    user's training: ``model.to(torch.complex64)`` (complex parameters are not recorded), one
    submodule made complex, a layer replaced by a wider one with a new optimizer. Before, the
    MonitorError came out of the user's forward pass or optimizer.step() (for the complex ones
    saying 'parameters changed (now 0, were 4)'). Now the monitor stops with one warning naming
    the cause, training goes on, and log() raises the same MonitorError."""
    from gradflow.monitor import MonitorError

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    x = torch.randn(8, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    monitor = GradientMonitor(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(4):
            if step == 2:
                if change == "complex-all":
                    model.to(torch.complex64)
                    x = x.to(torch.complex64)
                elif change == "complex-head":
                    model[2].to(torch.complex64)
                    model[1] = nn.Sequential(nn.Tanh(), _ToComplex())
                else:
                    model[0], model[2] = nn.Linear(3, 6), nn.Linear(6, 1)
                optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
            optimizer.zero_grad()
            model(x).abs().square().mean().backward()
            optimizer.step()                                  # training goes on: nothing raised
    said = [str(w.message) for w in caught if "stopped recording" in str(w.message)]
    assert len(said) == 1 and cause in said[0], [str(w.message) for w in caught]
    with pytest.raises(MonitorError, match=cause):
        monitor.log(0)
    assert not monitor.attached
    monitor.remove()


class _ToComplex(nn.Module):
    def forward(self, x):
        return x.to(torch.complex64)


class _Double(nn.Module):
    def forward(self, x):
        return 2 * x


@pytest.mark.parametrize("optimizer_made", ["before", "after"])
def test_a_parametrization_registered_after_attaching_is_followed(optimizer_made):
    """``register_parametrization(model[0], "weight", ...)`` after attaching keeps the same tensor
    (now ``0.parametrizations.weight.original``, the user's ``0.weight``) but lists it after
    ``0.bias``: log() raised 'the model's parameters changed (now 4, were 4)'. The same parameters
    in another order are followed; each row against the gradient each step applied."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    x = torch.randn(8, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    names = {id(p): n for n, p in model.named_parameters()}          # the user's names, before
    norms: dict[str, list[float]] = {}

    def applied(opt, args, kwargs):
        for group in opt.param_groups:
            for p in group["params"]:
                norms.setdefault(names[id(p)], []).append(p.grad.double().norm().item())

    optimizer.register_step_pre_hook(applied)
    with GradientMonitor(model, activations=False) as monitor:
        for window in range(2):
            for step in range(2):
                if window == 0 and step == 1:
                    parametrize.register_parametrization(model[0], "weight", _Double())
                    if optimizer_made == "after":
                        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
                        optimizer.register_step_pre_hook(applied)
                optimizer.zero_grad()
                model(x).square().mean().backward()
                optimizer.step()
            rows = monitor.log(window)
            assert sorted(rows) == sorted(names.values())
            for name, values in norms.items():
                assert rows[name]["norm"] == pytest.approx(sum(values) / len(values), rel=1e-6), name
            norms.clear()


class _Scaled(nn.Module):
    """A scale of its own (the model's first parameter) before two Linear layers."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(3))
        self.fc1, self.fc2 = nn.Linear(3, 4), nn.Linear(4, 1)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x * self.scale.float())))


def test_one_parameter_replaced_on_another_dtype_under_a_kept_optimizer_keeps_the_others_steps():
    """``model.scale = nn.Parameter(scale.double())`` (the model's first parameter, now float64)
    while the optimizer made before is kept: the step that finds it applies the gradients of
    fc1 and fc2 and nothing to the new scale. Each parameter's steps are those that applied its
    gradient (oracle: the step pre-hook); the replaced one is named."""
    torch.manual_seed(0)
    model = _Scaled()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    applied = _applied(optimizer, names)
    with warnings.catch_warnings(record=True) as caught, GradientMonitor(model, activations=False) as monitor:
        warnings.simplefilter("always")
        for step in range(4):
            if step == 2:
                model.scale = nn.Parameter(model.scale.detach().double())
            optimizer.zero_grad()
            model(torch.randn(8, 3)).square().mean().backward()
            optimizer.step()
        rows = monitor.log(0)
    for name in names.values():
        assert rows[name]["steps"] == sum(name in step for step in applied), (name, rows[name], applied)
    said = [str(w.message) for w in caught if "no longer the model's" in str(w.message)]
    assert len(said) == 1 and ": scale were replaced" in said[0], [str(w.message) for w in caught]
