"""How the check lines read: nn.Sequential's numeric layer names quoted, huge ratios in
scientific notation, a loss that rose said as rising, the loss's fall said once.

The oracle is a real run whose gradients vanish by construction (ten sigmoid layers with U(0, 1)
weights, as the tutorial's deep tanh, in an nn.Sequential: layers named 0, 2, ..., 20), and the
evidence the diagnosis holds for the numbers it prints.
"""

from __future__ import annotations

import re

import torch
from synthetic_windows import history
from torch import nn

from gradflow import GradientMonitor
from gradflow.analysis.diagnose import diagnose, diagnose_monitor


def deep_sigmoid(epochs: int = 12):
    torch.manual_seed(0)
    layers = []
    for i in range(10):
        lin = nn.Linear(2 if i == 0 else 16, 16)
        nn.init.uniform_(lin.weight, 0, 1)
        nn.init.zeros_(lin.bias)
        layers += [lin, nn.Sigmoid()]
    model = nn.Sequential(*layers, nn.Linear(16, 1))
    x = torch.randn(256, 2)
    y = (x[:, :1] * x[:, 1:2] > 0).float()
    optimizer, losses = torch.optim.SGD(model.parameters(), lr=0.1), []
    with GradientMonitor(model) as monitor:
        for epoch in range(epochs):
            for i in range(0, 256, 64):
                optimizer.zero_grad()
                loss = nn.functional.binary_cross_entropy_with_logits(model(x[i:i + 64]), y[i:i + 64])
                loss.backward()
                optimizer.step()
            losses.append(loss.item())
            monitor.log(epoch)
    return monitor, losses


def test_numeric_layer_names_are_quoted_and_huge_ratios_are_scientific():
    monitor, losses = deep_sigmoid()
    diagnosis = diagnose_monitor(monitor, losses)
    assert {"vanishing", "saturated", "stalled"} <= set(diagnosis.verdicts), diagnosis.report()
    layers, why = diagnosis.evidence["layers"], diagnosis.evidence["checks"]["vanishing"]["why"]
    weakest = min((name for name, row in layers.items() if row["role"] == "hidden"), key=lambda n: layers[n]["ratio_early"])
    factor = 1 / layers[weakest]["ratio_early"]
    assert factor > 1e6
    assert why.startswith(f"layer '{weakest}' gradient vs the output layer's ('20'), early on: {factor:.1e}x smaller; "
                          f"first hidden layer ('0'): {1 / layers['0']['ratio_early']:.1e}x smaller early")
    assert not re.search(r"\d,\d{3},\d{3}", diagnosis.report())       # no 24,306,318,...x
    assert re.search(r"\d+% of layer '\d+' outputs saturated", diagnosis.evidence["checks"]["saturated"]["why"])
    assert "of its weights ('20')" in diagnosis.evidence["checks"]["tiny-gradient"]["why"]


def test_the_loss_figure_is_said_once_in_the_line():
    monitor, losses = deep_sigmoid()
    line = diagnose_monitor(monitor, losses).line()
    stalled = re.search(r"loss fell (\d+\.\d%) after the early part", line)
    assert stalled and line.count(stalled.group(1)) == 1, line
    assert "and the loss stalled" in line


def test_a_loss_that_rose_is_said_to_rise():
    windows = history(sizes=(1e-5, 1e-3, 0.1), saturated=0.9)
    rising = [0.69 + 0.0001 * e for e in range(20)]
    line = diagnose(windows, rising).line()
    assert "loss rose 0.3% after the early part" in line
    assert "-0." not in line and "fell only" not in line
    falling_a_little = [0.7 * (1 - 0.01 * e) for e in range(20)]         # ~15% down: saturated, not stalled
    saturated = diagnose(windows, falling_a_little).evidence["checks"]["saturated"]
    assert saturated["fired"] and re.search(r"and the loss fell only \d+\.\d% \(< 25%\)", saturated["why"])
