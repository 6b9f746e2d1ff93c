"""The window's read path has a fast way and a general way for the same rows; both must give the
same numbers bit for bit (and ints stay ints): the gradient rows' table in Python floats (up to
``gradients.PYTHON_ROWS`` slots) or in numpy, and the weights' rows straight from the fused
kernel where one tiny group holds every parameter (``Weights._whole``) or scattered a group at a
time."""

from __future__ import annotations

import math

import torch
from torch import nn

from gradflow import GradientMonitor
from gradflow.monitor import gradients
from gradflow.monitor.sinks import Sink


class _Recording(Sink):
    def __init__(self) -> None:
        self.windows = []

    def log(self, scalars, histograms, step):
        self.windows.append((dict(scalars), {tag: (h.limits, h.counts, h.min, h.max, h.num, h.sum, h.sum_squares)
                                             for tag, h in histograms.items()}))


def _same(a, b) -> bool:
    """Equal as the monitor's output must be: the same keys in order, the same types, NaN == NaN."""
    if isinstance(a, dict):
        return type(b) is dict and list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return type(a) is type(b) and a == b


def _run(model_seed: int, monitor_setup=lambda monitor: None) -> tuple[list, list]:
    """Three windows of a deep narrow MLP (81 parameters, one frozen bias, a second optimizer that
    steps every other time, a NaN in one step): log()'s returns and what the sink got."""
    torch.manual_seed(model_seed)
    layers = []
    for _ in range(40):
        layers += [nn.Linear(6, 6), nn.Tanh()]
    model = nn.Sequential(*layers, nn.Linear(6, 1))
    model[0].bias.requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    first, second = torch.optim.SGD(trainable[:50], lr=0.01), torch.optim.SGD(trainable[50:], lr=0.01)
    sink = _Recording()
    returns = []
    with GradientMonitor(model, sink) as monitor:
        monitor_setup(monitor)
        for window in range(3):
            for step in range(4):
                x = torch.randn(4, 6)
                if window == 1 and step == 2:
                    x[0, 0] = float("nan")
                first.zero_grad()
                second.zero_grad()
                model(x).pow(2).mean().backward()
                first.step()
                if step % 2 == 0:
                    second.step()
            returns.append(monitor.log(window))
    return returns, sink.windows


def test_the_python_and_the_numpy_row_tables_give_the_same_rows(monkeypatch):
    monkeypatch.setattr(gradients, "PYTHON_ROWS", 10**6)
    python_rows, python_sink = _run(0)
    monkeypatch.setattr(gradients, "PYTHON_ROWS", 0)
    numpy_rows, numpy_sink = _run(0)
    assert _same(python_rows, numpy_rows) and _same(python_sink, numpy_sink)
    row = python_rows[1]["80.weight"]
    assert type(row["nonfinite"]) is int and type(row["steps"]) is int and row["steps"] == 2
    assert math.isnan(row["mean"]) and row["nonfinite"] > 0           # the NaN step is averaged in
    assert python_rows[0]["0.weight"]["steps"] == 4 and "0.bias" not in python_rows[0]   # frozen: no row


def test_the_weights_of_one_tiny_group_are_read_as_a_group_at_a_time_would():
    def run(whole: bool):
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(5, 5), nn.ReLU(), nn.Linear(5, 5), nn.ReLU(), nn.Linear(5, 1))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        sink = _Recording()
        out = []
        with GradientMonitor(model, sink) as monitor:
            weights = monitor.parts["weights"]
            assert weights._whole                   # every parameter is tiny: one group, in order
            weights._whole = whole
            for window in range(3):
                for _ in range(4):
                    optimizer.zero_grad()
                    model(torch.randn(8, 5)).pow(2).mean().backward()
                    optimizer.step()
                out.append((monitor.log(window), {name: dict(row) for name, row in monitor.history[-1].weights.items()}))
        return out, sink.windows

    fast, general = run(True), run(False)
    assert _same(fast, general)
    rows, weights = fast[0][2]
    assert rows["4.weight"]["weight_norm"] == weights["4.weight"]["norm"] > 0 and weights["2.bias"]["update_ratio"] > 0
    assert any(tag.startswith("weight/") for tag in fast[1][2][1])        # the weights' histograms were drawn
