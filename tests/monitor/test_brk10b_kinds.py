"""Break tests of issue 20's kinds (brk10b): parametrized weights in the verdict, conversions a
kept optimizer does not follow, mixed dtypes with subnormals. Oracles: statistics taken from
``p.grad`` in a step pre-hook registered after the monitor attached, and the verdict of the same
model without parametrizations."""

from __future__ import annotations

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
