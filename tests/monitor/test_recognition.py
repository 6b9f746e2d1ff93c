"""What the monitor taps and in which order layers run: activation modules by what they are,
the user's own choice, and the forward order of parameters."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from gradflow import GradientMonitor, MonitorError
from gradflow.monitor import is_activation

transformers_activations = pytest.importorskip("transformers.activations")


@pytest.mark.parametrize("name", ["GELUActivation", "NewGELUActivation", "FastGELUActivation",
                                  "QuickGELUActivation", "SiLUActivation", "MishActivation", "ClippedGELUActivation"])
def test_hugging_face_activations_are_tapped(name):
    cls = getattr(transformers_activations, name, None)
    if cls is None:
        pytest.skip(f"this transformers has no {name}")
    module = cls(-10.0, 10.0) if name == "ClippedGELUActivation" else cls()
    assert is_activation(module)


def test_modules_that_are_not_activations_are_not_tapped():
    class LinearActivation(nn.Module):
        def forward(self, x):
            return x

    class GeluBlock(nn.Module):                       # named like one, but has children
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(2, 2)

    assert not any(is_activation(m) for m in (LinearActivation(), GeluBlock(), nn.Linear(2, 2), nn.Identity()))


def test_a_gpt2_block_gets_activation_statistics():
    from transformers import GPT2Config, GPT2Model

    from gradflow.monitor.sinks import Sink

    class Keep(Sink):
        def log(self, scalars, histograms, step):
            self.histograms = histograms

    model = GPT2Model(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=16))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    sink = Keep()
    with GradientMonitor(model, sink) as monitor:
        ids = torch.randint(0, 50, (2, 8))
        model(ids).last_hidden_state.pow(2).mean().backward()
        optimizer.step()
        monitor.log(0)
    acts = monitor.history[0].activations
    assert {"h.0.mlp.act", "h.1.mlp.act"} <= set(acts)
    assert acts["h.0.mlp.act"]["std"] > 0
    assert sink.histograms["activation/h/0/mlp/act"].num == 2 * 8 * 64     # batch x tokens x 4 * n_embd


def test_the_users_own_activation_choice():
    class Squash(nn.Module):
        def forward(self, x):
            return x / (1 + x.abs())

    model = nn.Sequential(nn.Linear(3, 4), Squash(), nn.Linear(4, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with GradientMonitor(model, activations=lambda name, m: isinstance(m, Squash)) as monitor:
        x = torch.randn(5, 3)
        expected = Squash()(model[0](x)).detach()
        model(x).sum().backward()
        optimizer.step()
        monitor.log(0)
    assert monitor.history[0].activations["1"]["mean"] == pytest.approx(expected.mean().item(), rel=1e-5)
    with pytest.raises(MonitorError, match="activations must be True, False or a callable"):
        GradientMonitor(model, activations="tanh")


def test_forward_order_follows_the_data_not_the_definition():
    class HeadFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(4, 1)
            self.body = nn.Linear(3, 4)

        def forward(self, x):
            return self.head(torch.relu(self.body(x)))

    model = HeadFirst()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with GradientMonitor(model) as monitor:
        assert monitor.forward_order == ["head.weight", "head.bias", "body.weight", "body.bias"]
        with torch.no_grad():
            model(torch.randn(2, 3))                  # evaluation passes do not count
        model(torch.randn(2, 3)).sum().backward()
        optimizer.step()
        assert monitor.forward_order == ["body.weight", "body.bias", "head.weight", "head.bias"]
        assert not model.body._forward_pre_hooks      # the order hooks left after the first step
        assert copy.deepcopy(model) is not None


@pytest.mark.parametrize("every", [1, 3, 10])
def test_activations_are_tapped_on_their_schedule_and_gradients_every_step(every):
    torch.manual_seed(11)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    tapped = []
    with GradientMonitor(model, activations_every=every) as monitor:
        for step in range(7):
            x = torch.randn(4, 3)
            if step % every == 0:                             # the forward passes of steps 0, N, 2N, ...
                tapped.append(torch.tanh(model[0](x)).detach())
            optimizer.zero_grad()
            model(x).sum().backward()
            optimizer.step()
        monitor.log(0)
    window = monitor.history[0]
    expected = torch.cat(tapped)
    assert window.steps == 7 and all(row["steps"] == 7 for row in window.gradients.values())
    assert window.activations["1"]["mean"] == pytest.approx(expected.mean().item(), rel=1e-5)
    assert window.activations["1"]["std"] == pytest.approx(expected.std(unbiased=False).item(), rel=1e-4)


def test_a_window_without_a_tapped_step_does_not_warn():
    model = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with GradientMonitor(model, activations_every=4) as monitor:
        for step in range(4):
            model(torch.randn(4, 3)).sum().backward()
            optimizer.step()
            optimizer.zero_grad()
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                monitor.log(step)
    assert [bool(w.activations) for w in monitor.history] == [True, False, False, False]
    with pytest.raises(MonitorError, match="activations_every must be a positive int"):
        GradientMonitor(model, activations_every=0)
