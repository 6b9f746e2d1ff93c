"""Break test (brk14b): the first non-finite source of a recurrent model with the gradient
through time on (the default). On a profiled step the through-time hook replaces the fused
LSTM output by its unrolled one after the first-non-finite hook had watched the fused tensors,
so dL/d(output) of the LSTM was not watched: a NaN made in backward by the code that received
the output (a custom Function, the loss) was put on the LSTM. Oracle: the plant's place; the
same run with through_time=False names it."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from gradflow import GradientMonitor
from gradflow.monitor.nonfinite import Source


class _NanBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


class _Net(nn.Module):
    """Linear -> LSTM -> (the model's own code: a NaN-backward Function) -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.rnn, self.head = nn.Linear(3, 4), nn.LSTM(4, 5, batch_first=True), nn.Linear(5, 1)

    def forward(self, x):
        out, _ = self.rnn(self.inp(x))
        return self.head(_NanBackward.apply(out)[:, -1])


def _first(model, loss_of, through_time: bool) -> Source | None:
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(2, 6, 3, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with GradientMonitor(model, histograms=False, nonfinite=True, through_time=through_time) as monitor:
            for _ in range(2):
                optimizer.zero_grad()
                loss_of(model(x)).backward()
                optimizer.step()
            monitor.log(0)
    return monitor.history[-1].first_nonfinite


def _sqrt_at_zero(out):                  # a loss whose gradient is NaN: sqrt at 0 times 0
    out = out[0] if isinstance(out, tuple) else out
    return torch.sqrt(out - out.detach()).sum()


CASES = [  # (model builder, loss, the plant's place)
    (lambda: _Net(), lambda out: out.pow(2).mean(), ""),
    (lambda: nn.LSTM(3, 4, batch_first=True), _sqrt_at_zero, "(loss)"),
]


@pytest.mark.parametrize("through_time", [False, True], ids=["fused", "profiled"])
@pytest.mark.parametrize("build,loss_of,where", CASES, ids=["code_after_lstm", "loss_of_an_lstm_model"])
def test_a_backward_nan_after_a_profiled_lstm_is_named_where_it_was_made(build, loss_of, where, through_time):
    torch.manual_seed(0)
    assert _first(build(), loss_of, through_time) == Source(where, "backward", 0)
