"""Break tests of the activation taps (brk13b): modules whose output is not one tensor. Oracle:
what the module returned, seen by a forward hook of the test's own."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from gradflow.monitor import GradientMonitor


class _Tuple(nn.Module):
    """A block returning (output, None), as Hugging Face layers and nn.LSTM return tuples."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return torch.tanh(self.fc(x)), None


class ReLUGate(nn.Module):
    """Tapped by its name (no parameters, "relu" in it); returns a dict."""

    def forward(self, x):
        return {"out": torch.relu(x)}


class ReLUInPlace(nn.Module):
    """Tapped by its name; changes its input in place and returns None."""

    def forward(self, x):
        x.relu_()


class ComplexReLU(nn.Module):
    """Tapped by its name; returns a complex tensor."""

    def forward(self, x):
        return torch.complex(torch.relu(x), torch.relu(-x))


class _Net(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.fc = nn.Linear(4, 4)
        self.odd = {"tuple": _Tuple, "dict": ReLUGate, "none": ReLUInPlace, "complex": ComplexReLU}[kind]()
        self.act = nn.Tanh()

    def forward(self, x):
        h = self.fc(x) * 1.0
        if self.kind == "tuple":
            h = self.odd(h)[0]
        elif self.kind == "dict":
            h = self.odd(h)["out"]
        elif self.kind == "complex":
            h = self.odd(h).real
        else:
            self.odd(h)
        return self.act(h)


def _messages(kind: str, others: bool) -> tuple[list[str], dict]:
    torch.manual_seed(0)
    model = _Net(kind)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    chosen = (lambda name, m: name in ("odd", "act")) if others else (lambda name, m: name == "odd")
    returned = []
    model.odd.register_forward_hook(lambda m, i, out: returned.append(type(out).__name__))
    with warnings.catch_warnings(record=True) as caught, GradientMonitor(model, activations=chosen,
                                                                         activations_every=1) as monitor:
        warnings.simplefilter("always")
        for _ in range(2):
            optimizer.zero_grad()
            model(torch.randn(8, 4)).square().mean().backward()
            optimizer.step()
        monitor.log(0)
    assert len(returned) == 2                                     # the module ran in both passes
    return [str(w.message) for w in caught], monitor.history[-1].activations


@pytest.mark.parametrize("kind, type_name", [("tuple", "a tuple"), ("dict", "a dict"), ("none", "None"),
                                             ("complex", "a complex tensor")], ids=["tuple", "dict", "None", "complex"])
@pytest.mark.parametrize("others", [True, False], ids=["beside-a-tensor-tap", "alone"])
def test_a_tap_whose_module_returns_no_tensor_is_said_with_that_cause(kind, type_name, others):
    """A tapped module that ran in every training pass but returned a tuple, a dict or None (a
    block chosen with activations=fn, an activation known by its name): the tap has nothing to
    read, and log() says so naming what it returned. Before, the warning said the module did
    not run, the model computing its activations with functions (F.gelu) instead: untrue. A
    complex output was read as its real part, with torch's own warning that casting discards
    the imaginary part; it is now said the same way (complex parameters are not recorded either)."""
    messages, rows = _messages(kind, others)
    assert "odd" not in rows and ("act" in rows) == others
    said = [m for m in messages if "odd" in m]
    assert len(said) == 1, messages
    assert f"returned {type_name}, not a real tensor" in said[0], said[0]
    assert "with functions" not in said[0] and "did not run" not in said[0], said[0]


class _SharedReLU(nn.Module):
    """One nn.ReLU after two layers of ``widths``; the second layer's units all dead."""

    def __init__(self, widths: tuple[int, int]):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, widths[0]), nn.Linear(widths[0], widths[1])
        self.act = nn.ReLU()
        self.head = nn.Linear(widths[1], 1)
        with torch.no_grad():
            self.fc2.bias.fill_(-100.0)

    def forward(self, x):
        return self.head(self.act(self.fc2(self.act(self.fc1(x)))))


@pytest.mark.parametrize("batch", [32, 512], ids=["pending-outputs", "direct-outputs"])
@pytest.mark.parametrize("widths", [(8, 16), (16, 8)], ids=["wider-second", "narrower-second"])
def test_a_rectifier_shared_by_layers_of_other_widths_says_what_its_dead_fraction_leaves_out(widths, batch):
    """One nn.ReLU run after layers of different widths: its dead_fraction counts the units of
    the first width it saw (its mean and std every output). The other layer's outputs, here all
    dead, were left out of it in silence (dead_fraction 0.0 where 16 of 24 units were dead); now
    log() says so. Oracle: the outputs of the first width, from a forward hook of the test's."""
    torch.manual_seed(0)
    model = _SharedReLU(widths)
    outputs = []
    model.act.register_forward_hook(lambda m, i, out: outputs.append(out.detach().clone()))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    with warnings.catch_warnings(record=True) as caught, GradientMonitor(model, activations_every=1) as monitor:
        warnings.simplefilter("always")
        for _ in range(2):
            optimizer.zero_grad()
            model(torch.randn(batch, 4)).square().mean().backward()
            optimizer.step()
        monitor.log(0)
    first = torch.cat([out for out in outputs if out.shape[1] == widths[0]])
    expected = (first > 0).any(dim=0).logical_not().double().mean().item()
    assert monitor.history[-1].activations["act"]["dead_fraction"] == pytest.approx(expected)
    said = [str(w.message) for w in caught if "dead_fraction" in str(w.message)]
    assert len(said) == 1 and "act" in said[0] and f"{widths[0]} units" in said[0], [str(w.message) for w in caught]


def _validated(every: int, train_mode: bool = True):
    """A tanh MLP: each step, then a validation pass in eval mode with grad on (no no_grad: the
    loss computed as in training) on inputs 100x larger, which saturate the tanh."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    training = []
    model[1].register_forward_hook(lambda m, i, out: training.append(out.detach().clone()) if m.training else None)
    x = torch.randn(16, 4)
    with warnings.catch_warnings(record=True) as caught, GradientMonitor(model, activations_every=every) as monitor:
        warnings.simplefilter("always")
        for _ in range(every * 2):
            model.train(train_mode)
            optimizer.zero_grad()
            model(x).square().mean().backward()
            optimizer.step()
            model.eval()
            model(x * 100).square().mean()
        monitor.log(0)
    return monitor.history[-1].activations, training, [str(w.message) for w in caught]


@pytest.mark.parametrize("every", [1, 10], ids=["every-step", "every-10th"])
def test_eval_mode_passes_with_grad_on_are_not_in_the_window(every):
    """Validation passes run after model.eval() but without no_grad: evaluation passes, not
    training ones. Before, their outputs were tapped with the training passes' (saturated_fraction
    0.48 where the training passes had 0.0). Oracle (every step tapped): the outputs of the passes
    in training mode."""
    rows, training, _ = _validated(every)
    if every == 1:
        values = torch.cat(training).double()
        assert rows["1"]["mean"] == pytest.approx(values.mean().item())
        assert rows["1"]["std"] == pytest.approx(values.std(unbiased=False).item())
    assert rows["1"]["saturated_fraction"] == 0.0 and torch.cat(training).abs().max() < 0.97


def test_a_model_run_only_in_eval_mode_is_said():
    """Every pass in eval mode, training ones too: no activation row, and log() says why."""
    rows, _, messages = _validated(1, train_mode=False)
    assert rows == {}
    said = [m for m in messages if "no activation output" in m]
    assert len(said) == 1 and "eval mode" in said[0], messages


class _ScaledReLU(nn.Module):
    """A float64 layer whose ReLU outputs lie ``scale`` from 1: past float32's range (1e45) or
    below its smallest value (1e-50)."""

    def __init__(self, units: int, scale: float):
        super().__init__()
        self.fc = nn.Linear(4, units).double()
        self.act = nn.ReLU()
        self.scale = scale

    def forward(self, x):
        return self.act(self.fc(x) * self.scale)


@pytest.mark.parametrize("scale", [1e45, 1e-50], ids=["beyond-float32", "below-float32"])
@pytest.mark.parametrize("units", [6, 1000], ids=["pending-outputs", "direct-outputs"])
def test_float64_activations_keep_their_range(units, scale):
    """float64 activation outputs beyond float32's range were converted to float32 before they
    were summed: mean inf and std nan where the outputs' were 1.9e44 and 2.5e44; below its range,
    positive outputs became zeros and their units were counted dead (dead_fraction 1.0 for a
    layer with every unit alive). Gradients of float64 keep their range; activations now too.
    Oracle: the outputs, from a forward hook of the test's, in float64."""
    torch.manual_seed(0)
    model = _ScaledReLU(units, scale)
    outputs = []
    model.act.register_forward_hook(lambda m, i, out: outputs.append(out.detach().clone()))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    with GradientMonitor(model, activations_every=1) as monitor:
        for _ in range(2):
            optimizer.zero_grad()
            (model(torch.randn(8, 4, dtype=torch.float64)) / scale).square().mean().backward()
            optimizer.step()
        monitor.log(0)
    values = torch.cat(outputs)
    row = monitor.history[-1].activations["act"]
    assert row["mean"] == pytest.approx(values.mean().item(), rel=1e-9, abs=0)
    assert row["std"] == pytest.approx(values.std(unbiased=False).item(), rel=1e-6, abs=0)
    assert row["dead_fraction"] == pytest.approx((values > 0).any(dim=0).logical_not().double().mean().item())
