"""Through time (gradflow/monitor/through_time.py) against an oracle: the same weights unrolled
cell by cell with hand-written formulas (PyTorch's nn.RNN/LSTM/GRU docs), each h_t kept with
``retain_grad``, so that ``h_t.grad`` is the total derivative dL/dh_t."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from gradflow.monitor import GradientMonitor
from gradflow.monitor.through_time import ThroughTime, horizon, reach

CASES = [  # (class, kwargs)
    (nn.RNN, {"nonlinearity": "tanh"}),
    (nn.RNN, {"nonlinearity": "relu"}),
    (nn.LSTM, {}),
    (nn.GRU, {}),
    (nn.LSTM, {"proj_size": 3}),
]
IDS = ["rnn_tanh", "rnn_relu", "lstm", "gru", "lstm_proj"]


def _oracle_step(module, mode, x, h, c, suffix):
    w_ih, w_hh = getattr(module, "weight_ih" + suffix), getattr(module, "weight_hh" + suffix)
    b_ih, b_hh = getattr(module, "bias_ih" + suffix), getattr(module, "bias_hh" + suffix)
    if mode == "LSTM":
        i, f, g, o = (x @ w_ih.T + b_ih + h @ w_hh.T + b_hh).chunk(4, 1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        if module.proj_size:
            h = h @ getattr(module, "weight_hr" + suffix).T
        return h, c
    if mode == "GRU":
        r_i, z_i, n_i = (x @ w_ih.T + b_ih).chunk(3, 1)
        r_h, z_h, n_h = (h @ w_hh.T + b_hh).chunk(3, 1)
        r, z = torch.sigmoid(r_i + r_h), torch.sigmoid(z_i + z_h)
        n = torch.tanh(n_i + r * n_h)
        return (1 - z) * n + z * h, None
    pre = x @ w_ih.T + b_ih + h @ w_hh.T + b_hh
    return (torch.tanh(pre) if mode == "RNN_TANH" else torch.relu(pre)), None


def oracle(module, x, loss_of):
    """(key -> ||dL/dh_t|| per t, parameter grads) by hand unrolling; x batch-first or not per module."""
    xs = x.transpose(0, 1) if module.batch_first else x
    T, N = xs.shape[:2]
    D = 2 if module.bidirectional else 1
    H, Hout = module.hidden_size, module.proj_size if getattr(module, "proj_size", 0) else module.hidden_size
    kept, layer_in, h_last = {}, xs, []
    for layer in range(module.num_layers):
        outs = []
        for d in range(D):
            suffix = f"_l{layer}{'_reverse' if d else ''}"
            h, c = xs.new_zeros(N, Hout), xs.new_zeros(N, H)
            seq = [None] * T
            for t in (range(T - 1, -1, -1) if d else range(T)):
                h, c = _oracle_step(module, module.mode, layer_in[t], h, c, suffix)
                h.retain_grad()
                kept[(f"l{layer}{'_reverse' if d else ''}", t)] = h
                seq[t] = h
            outs.append(torch.stack(seq))
            h_last.append(h)
        layer_in = torch.cat(outs, 2)
    out = layer_in.transpose(0, 1) if module.batch_first else layer_in
    module.zero_grad()
    loss_of(out, torch.stack(h_last)).backward()
    norms = {}
    for (key, t), h in kept.items():
        norms.setdefault(key, np.zeros(T))[t] = 0.0 if h.grad is None else h.grad.norm().item()
    return norms, {n: p.grad.clone() for n, p in module.named_parameters()}


def _loss(out, h_n):
    # the last output (a long-range read-out), every output a little, and the final state
    return out[:, -1].pow(2).sum() + 0.1 * out.sum() + h_n.sum() if out.dim() == 3 else out.sum()


@pytest.mark.parametrize("layers", [1, 2], ids=["1layer", "2layers"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["time_first", "batch_first"])
@pytest.mark.parametrize("cls,kwargs", CASES, ids=IDS)
def test_profile_matches_hand_unrolled_oracle(cls, kwargs, layers, bidirectional, batch_first):
    torch.manual_seed(0)
    module = cls(3, 5, num_layers=layers, bidirectional=bidirectional, batch_first=batch_first, **kwargs).double()
    x = torch.randn(4, 6, 3, dtype=torch.float64)              # (N, T, I) or (T, N, I)
    T = x.shape[1] if batch_first else x.shape[0]

    def loss_of(out, h_n):
        last = out[:, -1] if batch_first else out[-1]
        return last.pow(2).sum() + 0.1 * out.sum() + h_n.sum()

    expected, expected_grads = oracle(module, x, loss_of)
    # the fused path's parameter gradients
    module.zero_grad()
    out, h_n = module(x)
    h_n = h_n[0] if isinstance(h_n, tuple) else h_n
    loss_of(out, h_n).backward()
    fused = {n: p.grad.clone() for n, p in module.named_parameters()}
    for name, grad in expected_grads.items():
        torch.testing.assert_close(fused[name], grad, rtol=1e-6, atol=1e-9)

    recorder = ThroughTime(module)
    module.zero_grad()
    out, h_n = module(x)
    h_n = h_n[0] if isinstance(h_n, tuple) else h_n
    loss_of(out, h_n).backward()
    recorder.record()
    got = recorder.read()
    recorder.remove()
    assert sorted(got) == sorted(expected)
    for key, profile in expected.items():
        assert got[key].dtype == np.float64 and got[key].shape == (T,)
        np.testing.assert_allclose(got[key], profile, rtol=1e-3, atol=1e-12, err_msg=key)
    for name, p in module.named_parameters():   # the recomputed path trains exactly as the fused one
        torch.testing.assert_close(p.grad, fused[name], rtol=1e-6, atol=1e-9)


def test_float32_profile_and_mean_over_passes():
    torch.manual_seed(1)
    lstm = nn.LSTM(2, 8, batch_first=True)
    recorder = ThroughTime(lstm)
    xs = [torch.randn(3, 10, 2) for _ in range(2)]
    for x in xs:
        out, _ = lstm(x)
        out[:, -1].sum().backward()
    recorder.record()
    got = recorder.read()["l0"]
    recorder.active = False
    expected = np.mean([oracle(lstm.double(), x.double(), lambda o, h: o[:, -1].sum())[0]["l0"] for x in xs], axis=0)
    np.testing.assert_allclose(got, expected, rtol=1e-3)
    recorder.remove()


def test_packed_sequence_is_skipped_with_a_warning():
    lstm = nn.LSTM(2, 4)
    recorder = ThroughTime(lstm)
    packed = nn.utils.rnn.pack_padded_sequence(torch.randn(5, 2, 2), [5, 3])
    with pytest.warns(UserWarning, match="PackedSequence"):
        out, _ = lstm(packed)
    out.data.sum().backward()
    recorder.record()
    assert recorder.read() == {}
    recorder.remove()


def test_cells_are_said_not_covered():
    with pytest.warns(UserWarning, match="LSTMCell"):
        ThroughTime(nn.Sequential(nn.LSTMCell(2, 3))).remove()


def test_other_length_in_a_window_is_skipped_with_a_warning():
    rnn = nn.RNN(2, 4)
    recorder = ThroughTime(rnn)
    rnn(torch.randn(5, 1, 2))[0].sum().backward()
    with pytest.warns(UserWarning, match="sequences of 7 steps after 5"):
        rnn(torch.randn(7, 1, 2))[0].sum().backward()
    recorder.record()
    assert recorder.read()["l0"].shape == (5,)
    recorder.reset()
    rnn(torch.randn(7, 1, 2))[0].sum().backward()
    recorder.record()
    assert recorder.read()["l0"].shape == (7,)
    recorder.remove()


def test_unbatched_input():
    torch.manual_seed(2)
    gru = nn.GRU(2, 3).double()
    x = torch.randn(6, 2, dtype=torch.float64)
    expected = oracle(gru, x.unsqueeze(1), lambda o, h: o[-1].sum())[0]["l0"]
    recorder = ThroughTime(gru)
    out, h = gru(x)
    assert out.shape == (6, 3) and h.shape == (1, 3)
    out[-1].sum().backward()
    recorder.record()
    np.testing.assert_allclose(recorder.read()["l0"], expected, rtol=1e-3)
    recorder.remove()


def test_removed_hooks_leave_the_fused_path():
    rnn = nn.RNN(2, 3)
    recorder = ThroughTime(rnn)
    recorder.remove()
    recorder.remove()
    assert not rnn._forward_hooks
    assert recorder.read() == {}


def test_horizon_and_reach():
    profile = np.array([1e-12, 1e-6, 1e-3, 0.1, 1.0])
    assert horizon(profile) == 3 and horizon(profile, 1e-6) == 4 and horizon(np.zeros(3)) == 0
    assert reach(profile) == pytest.approx(1e-12)
    assert reach(profile[::-1], "lstm.l0_reverse") == pytest.approx(1e-12)


class _Reader(nn.Module):
    """Embedding-free long-range read-out: LSTM -> last output -> linear."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(2, 6, num_layers=2, batch_first=True)
        self.head = nn.Linear(6, 1)

    def forward(self, x):
        return self.head(self.lstm(x)[0][:, -1])


def test_monitor_window_time_is_the_mean_over_profiled_steps():
    torch.manual_seed(3)
    model = _Reader().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)      # lr 0: every step sees the same weights
    xs = [torch.randn(4, 9, 2, dtype=torch.float64) for _ in range(4)]
    with GradientMonitor(model, through_time_every=2, activations=False) as monitor:
        for x in xs:
            opt.zero_grad()
            model(x).sum().backward()
            opt.step()
        monitor.log(0)
    window = monitor.history[-1]
    assert sorted(window.time) == ["lstm.l0", "lstm.l1"]
    assert window.time_cells == {"lstm.l0": "LSTM", "lstm.l1": "LSTM"}
    # profiled: the forward passes of steps 0 and 2 (on after steps 0, 2: every 2nd)
    expected = [oracle(model.lstm, xs[i], lambda o, h, i=i: model.head(o[:, -1]).sum())[0] for i in (0, 2)]
    for key in window.time:
        np.testing.assert_allclose(window.time[key], np.mean([e[key[5:]] for e in expected], axis=0), rtol=1e-3)


def test_monitor_without_recurrent_modules_has_no_time_and_options_are_checked():
    model = nn.Sequential(nn.Linear(2, 2))
    with GradientMonitor(model) as monitor:
        model(torch.randn(3, 2)).sum().backward()
        monitor.record()
        monitor.log(0)
    assert monitor.history[-1].time == {}
    from gradflow.monitor import MonitorError
    with pytest.raises(MonitorError, match="through_time_every"):
        GradientMonitor(model, through_time_every=0)
    rnn = nn.RNN(2, 2)
    with GradientMonitor(rnn, through_time=False):
        assert not rnn._forward_hooks
    assert not rnn._forward_hooks


def test_a_copy_of_a_monitored_model_is_not_profiled():
    import copy

    model = _Reader()
    with GradientMonitor(model, activations=False) as monitor:
        twin = copy.deepcopy(model)
        twin(torch.randn(2, 5, 2)).sum().backward()           # its spent hook removes itself
        assert not twin.lstm._forward_hooks
        assert "time" in monitor.parts and model.lstm._forward_hooks
    assert not model.lstm._forward_hooks
