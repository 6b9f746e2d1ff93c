"""Break test of the through-time part (through_time.py) on calls the stock modules accept
that the first tests did not make: the initial state given (``hx``) by position or by keyword,
the input by keyword. Oracle: the fused module itself, split at each time step t (h_t made a
leaf that is both output t and the initial state of the rest of the sequence), so that
``torch.autograd.grad`` of the loss with respect to that leaf is the total derivative dL/dh_t;
and the fused module's own output, which a profiled pass must return unchanged."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from gradflow.monitor.through_time import ThroughTime


def _loss(out):                       # time first: the last output, every output, a middle one
    return out[-1].pow(2).sum() + 0.1 * out.sum() + out[len(out) // 2].sin().sum()


def _split_oracle(module, x, hx):
    """||dL/dh_t|| for t = 0..T-1 of a 1-layer unidirectional module, time-first ``x``."""
    lstm, norms = module.mode == "LSTM", []
    for t in range(x.shape[0]):
        prefix, state = module(x[: t + 1], hx)
        h_t = (state[0] if lstm else state)[0].detach().requires_grad_()
        rest = x.new_zeros(0, *h_t.shape)
        if t + 1 < x.shape[0]:
            rest = module(x[t + 1:], (h_t[None], state[1].detach()) if lstm else h_t[None])[0]
        grad, = torch.autograd.grad(_loss(torch.cat([prefix[:t].detach(), h_t[None], rest])), h_t)
        norms.append(grad.norm().item())
    return np.array(norms)


def _case(cls, kwargs):
    torch.manual_seed(0)
    module = cls(3, 5, **kwargs)
    x = torch.randn(6, 4, 3)
    out_size = kwargs.get("proj_size", 5)
    h0 = torch.randn(1, 4, out_size)
    return module, x, ((h0, torch.randn(1, 4, 5)) if cls is nn.LSTM else h0)


CASES = [(nn.RNN, {}), (nn.GRU, {}), (nn.LSTM, {}), (nn.LSTM, {"proj_size": 2})]
IDS = ["rnn", "gru", "lstm", "lstm_proj"]


@pytest.mark.parametrize("call", ["hx_by_position", "hx_by_keyword", "all_by_keyword"])
@pytest.mark.parametrize("cls,kwargs", CASES, ids=IDS)
def test_a_given_initial_state_is_used_however_it_is_passed(cls, kwargs, call):
    """``rnn(x, hx=h0)`` on a profiled pass returned the output of a zero initial state (the
    model's output changed by up to 1.8 and the profile was off by 1-4%); ``rnn(input=x)``
    raised IndexError out of the user's forward."""
    module, x, hx = _case(cls, kwargs)
    want = _split_oracle(module, x, hx)
    fused = module(x, hx)[0].detach()
    recorder = ThroughTime(module)
    try:
        out = {"hx_by_position": lambda: module(x, hx), "hx_by_keyword": lambda: module(x, hx=hx),
               "all_by_keyword": lambda: module(input=x, hx=hx)}[call]()[0]
        _loss(out).backward()
        recorder.record()
        got = recorder.read()["l0"]
    finally:
        recorder.remove()
    torch.testing.assert_close(out.detach(), fused, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-6)


def test_a_copy_of_a_hooked_module_runs_without_the_hook():
    module, x, hx = _case(nn.GRU, {})
    recorder = ThroughTime(module)
    try:
        twin = copy.deepcopy(module)
        twin(x, hx=hx)[0].sum().backward()             # the spent hook removes itself
        assert not twin._forward_hooks
    finally:
        recorder.remove()


class _CellLoop(nn.Module):
    def __init__(self):
        super().__init__()
        self.cell, self.head = nn.GRUCell(3, 5), nn.Linear(5, 1)

    def forward(self, x):
        h = x.new_zeros(x.shape[1], 5)
        for t in range(x.shape[0]):
            h = self.cell(x[t], h)
        return self.head(h)


def test_a_model_of_looped_cells_only_is_said_not_profiled_by_the_monitor():
    """The docs promise a warning at attach for nn.RNNCell/LSTMCell/GRUCell; a model with cells
    and no nn.RNN/LSTM/GRU got none (the part was never made), and an empty ``time``."""
    from gradflow import GradientMonitor

    model = _CellLoop()
    with pytest.warns(UserWarning, match="cell is a Python-looped cell"):
        monitor = GradientMonitor(model, histograms=False)
    with monitor:
        model(torch.randn(4, 2, 3)).sum().backward()
        torch.optim.SGD(model.parameters(), lr=0.1).step()
        monitor.log(0)
    assert monitor.history[-1].time == {}


@pytest.mark.parametrize("cls", [nn.LSTM, nn.RNN, nn.GRU], ids=["lstm", "rnn", "gru"])
def test_a_profiled_pass_under_autocast_keeps_the_fused_dtypes(cls):
    """Under CPU autocast (bfloat16) a fused LSTM returns bfloat16 output, h_n and c_n; the
    profiled pass returned float32 (the unrolled cell state promotes), so one step in N changed
    the model's dtypes. Oracle: the fused pass itself."""
    torch.manual_seed(0)
    module, x = cls(3, 5, num_layers=2), torch.randn(6, 4, 3)
    flat = lambda out: [out[0], *(out[1] if isinstance(out[1], tuple) else (out[1],))]   # noqa: E731
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = flat(module(x))
        recorder = ThroughTime(module)
        try:
            profiled = flat(module(x))
        finally:
            recorder.remove()
    assert [t.dtype for t in profiled] == [t.dtype for t in fused]
    for got, want in zip(profiled, fused):
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


class _Reader(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn, self.head = nn.GRU(3, 5, batch_first=True), nn.Linear(5, 1)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


@pytest.mark.parametrize("when", ["before_attach", "after_attach"])
def test_a_compiled_recurrent_model_is_said_not_profiled(when):
    """Under torch.compile the hook does nothing (docs: "said out loud"); Window.time was {}
    with no word."""
    from gradflow import GradientMonitor

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _Reader()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    compiled = torch.compile(model, backend="eager")
    monitor = GradientMonitor(compiled if when == "before_attach" else model, histograms=False, through_time_every=1)
    with pytest.warns(UserWarning, match="2 step.s. were to be profiled, but no forward pass of rnn was profiled"), \
            monitor:
        for _ in range(2):
            optimizer.zero_grad()
            compiled(torch.randn(4, 6, 3)).sum().backward()
            optimizer.step()
        monitor.log(0)
    assert monitor.history[-1].time == {}
