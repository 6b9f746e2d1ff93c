"""An n/a activation check says why a functional activation goes unseen (friction13).

``nn.TransformerEncoderLayer`` applies ``F.relu`` (a function, not a module), so the monitor taps
no activation and ``dead-units`` read "n/a: no ReLU-type activations recorded", which a user
with a ReLU transformer reads as a bug. The oracle: the model's own modules (no activation
module) and the words of the n/a checks.
"""

from __future__ import annotations

import torch
from torch import nn

from gradflow import GradientMonitor
from gradflow.analysis.diagnose import diagnose_monitor


def test_a_functional_relu_is_named_as_unseen():
    torch.manual_seed(0)
    model = nn.Sequential(nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), 1),
                          nn.Flatten(), nn.Linear(32, 1))
    assert not any(isinstance(m, (nn.ReLU, nn.GELU, nn.Tanh)) for m in model.modules())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with GradientMonitor(model, None) as monitor:
        for epoch in range(5):
            optimizer.zero_grad()
            nn.functional.mse_loss(model(torch.randn(4, 4, 8)), torch.randn(4, 1)).backward()
            optimizer.step()
            monitor.log(epoch)
    checks = diagnose_monitor(monitor).evidence["checks"]
    for name in ("dead-units", "saturated"):
        assert not checks[name]["checked"]
        assert "functional" in checks[name]["why"] and "F.relu" in checks[name]["why"], checks[name]["why"]
