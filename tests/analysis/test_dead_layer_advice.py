"""A whole ReLU layer dead passes no gradient back, so every layer below it reads as vanishing:
the advice must lead with the dead layer (its cause), not with tanh-initialisation advice."""

import torch
from torch import nn

from gradflow import GradientMonitor
from gradflow.analysis.advice import ADVICE
from gradflow.analysis.diagnose import diagnose_monitor


def _trained(dead_bias: float, seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                          nn.Linear(64, 1))
    with torch.no_grad():
        model[2].bias.fill_(dead_bias)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(320, 10), torch.randn(320, 1)
    losses = []
    with GradientMonitor(model, activations_every=1) as monitor:
        for epoch in range(8):
            total = 0.0
            for b in range(0, 320, 32):
                optimizer.zero_grad()
                loss = nn.functional.mse_loss(model(x[b:b + 32]), y[b:b + 32])
                loss.backward()
                optimizer.step()
                total += loss.item()
            losses.append(total / 10)
            monitor.log(epoch)
    return diagnose_monitor(monitor, losses, model=model, optimizer=optimizer)


def test_a_dead_layer_leads_the_advice_before_the_vanishing_it_causes():
    diagnosis = _trained(dead_bias=-10.0)
    assert "dead-units" in diagnosis.verdicts, diagnosis.report()
    assert diagnosis.evidence["checks"]["dead-units"]["value"] == 1.0       # a whole layer
    dead_first = ADVICE["dead-units"].split(".")[0]
    assert diagnosis.recommendation.startswith(dead_first), diagnosis.recommendation
    if "vanishing" in diagnosis.verdicts:           # still said, after its cause
        assert diagnosis.recommendation.index(ADVICE["vanishing"].split(".")[0]) > diagnosis.recommendation.index(dead_first)


def test_a_healthy_net_is_unchanged():
    diagnosis = _trained(dead_bias=0.0)
    assert "dead-units" not in diagnosis.verdicts, diagnosis.report()
