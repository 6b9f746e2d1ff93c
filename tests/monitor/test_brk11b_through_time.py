"""Break tests of the gradient through time (through_time.py), helper brk11b.

Oracle: the same weights unrolled by hand (``oracle`` of test_through_time.py: ``retain_grad``
on every h_t, so ``h_t.grad`` is the total dL/dh_t, summed over every backward call as
autograd sums it)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from gradflow.monitor import GradientMonitor
from gradflow.monitor.through_time import ThroughTime
from tests.monitor.test_through_time import oracle


def test_two_backward_calls_through_one_pass_add_their_gradients_before_the_norm():
    """Two losses backpropagated one after the other (retain_graph=True) through one forward:
    dL/dh_t is the sum of both calls' gradients (as p.grad is), and its norm is not the sum of
    two norms (that was 14% off here)."""
    torch.manual_seed(0)
    rnn = nn.RNN(3, 4, num_layers=2).double()
    recorder = ThroughTime(rnn)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    out, _ = rnn(x)
    out[-1].sum().backward(retain_graph=True)
    out[-2].pow(2).sum().backward()
    recorder.record()
    expected = oracle(rnn, x, lambda o, h: o[-1].sum() + o[-2].pow(2).sum())[0]
    assert recorder.passes() == {"l0": 1, "l1": 1}
    for key in ("l0", "l1"):
        np.testing.assert_allclose(recorder.read()[key], expected[key], rtol=1e-6)


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU])
def test_a_recurrent_layer_inside_a_non_reentrant_checkpoint_trains_and_is_said_unprofiled(cls):
    """torch.utils.checkpoint(use_reentrant=False) recomputes the fused module in backward and
    checks that it saves as many tensors as the forward did: the unrolled forward made training
    fail with CheckpointError. The pass stays fused, the gradients are the fused ones, and the
    monitor says that nothing was profiled."""
    torch.manual_seed(0)
    model = nn.Sequential()
    model.rnn, model.head = cls(3, 4, num_layers=2), nn.Linear(4, 1)
    reference = cls(3, 4, num_layers=2)
    reference.load_state_dict(model.rnn.state_dict())
    x = torch.randn(6, 2, 3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with GradientMonitor(model, through_time_every=1, activations=False) as monitor:
            out, _ = checkpoint(model.rnn, x, use_reentrant=False)
            model.head(out[-1]).sum().backward()
            torch.optim.SGD(model.parameters(), lr=0.0).step()
            monitor.log(0)
    assert monitor.history[-1].time == {}
    said = " | ".join(str(w.message) for w in caught)
    assert "torch.utils.checkpoint" in said and "not profiled" in said
    ref_out, _ = reference(x)
    model.head(ref_out[-1]).sum().backward()
    for (name, p), q in zip(model.rnn.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)



def test_a_checkpointed_pass_does_not_fix_the_windows_sequence_length():
    """A checkpointed pass (not profiled) of 8 steps, then a plain pass of 5 in the same window:
    the plain one is profiled against the oracle; the checkpointed one fixed the window's length
    before, and the plain pass was refused as 'another length'."""
    torch.manual_seed(0)
    rnn = nn.RNN(3, 4).double()
    recorder = ThroughTime(rnn)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, _ = checkpoint(rnn, torch.randn(8, 2, 3, dtype=torch.float64), use_reentrant=False)
        out[-1].sum().backward()
        x = torch.randn(5, 2, 3, dtype=torch.float64)
        out, _ = rnn(x)
        out[-1].sum().backward()
    recorder.record()
    assert not [w for w in caught if "sequences of" in str(w.message)]
    assert recorder.passes() == {"l0": 1}
    np.testing.assert_allclose(recorder.read()["l0"], oracle(rnn, x, lambda o, h: o[-1].sum())[0]["l0"], rtol=1e-6)

def _cell_like(module: nn.RNNBase) -> nn.Module:
    """A one-layer module's weights in the matching nn.GRUCell / nn.LSTMCell (a second oracle:
    torch's own cell, stepped by hand)."""
    cell = (nn.LSTMCell if module.mode == "LSTM" else nn.GRUCell)(module.input_size, module.hidden_size)
    cell.load_state_dict({k.replace("_l0", ""): v for k, v in module.state_dict().items()})
    return cell.to(next(module.parameters()).dtype)


def test_an_encoder_states_profile_includes_the_gradient_through_the_decoder():
    """Encoder-decoder: the decoder starts from the encoder's h_n; the encoder's dL/dh_t is what
    reaches it through the decoder. Oracle: nn.GRUCell stepped by hand, torch.autograd.grad."""
    torch.manual_seed(0)
    enc, dec, head = nn.GRU(3, 4).double(), nn.GRU(2, 4).double(), nn.Linear(4, 1).double()
    x, y = torch.randn(5, 2, 3, dtype=torch.float64), torch.randn(3, 2, 2, dtype=torch.float64)
    recorder = ThroughTime(nn.ModuleDict({"enc": enc, "dec": dec}))
    _, h = enc(x)
    out, _ = dec(y, h)
    head(out).sum().backward()
    recorder.record()
    hs, h = [], torch.zeros(2, 4, dtype=torch.float64)
    for cell, seq in ((_cell_like(enc), x), (_cell_like(dec), y)):
        for t in range(seq.shape[0]):
            h = cell(seq[t], h)
            hs.append(h)
    grads = torch.autograd.grad(head(torch.stack(hs[5:])).sum(), hs)
    norms = np.array([g.norm().item() for g in grads])
    np.testing.assert_allclose(recorder.read()["enc.l0"], norms[:5], rtol=1e-9)
    np.testing.assert_allclose(recorder.read()["dec.l0"], norms[5:], rtol=1e-9)


def test_truncated_bptt_with_a_detached_carried_state_is_the_mean_over_chunks():
    """Truncated BPTT: chunks of 4 steps, (h, c) carried detached between optimizer steps, a
    loss at every step. Each window entry is the mean over the chunks of dL/dh_t within one."""
    torch.manual_seed(1)
    lstm, head = nn.LSTM(3, 4, batch_first=True).double(), nn.Linear(4, 1).double()
    model = nn.ModuleDict({"lstm": lstm, "head": head})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    xs = torch.randn(2, 12, 3, dtype=torch.float64)
    with GradientMonitor(model, through_time_every=1, activations=False) as monitor:
        state = None
        for k in range(3):
            optimizer.zero_grad()
            out, state = lstm(xs[:, 4 * k:4 * k + 4], state)
            head(out).sum().backward()
            optimizer.step()
            state = tuple(s.detach() for s in state)
        monitor.log(0)
    cell, state, per_chunk = _cell_like(lstm), (torch.zeros(2, 4, dtype=torch.float64),) * 2, []
    for k in range(3):
        hs = []
        for t in range(4):
            state = cell(xs[:, 4 * k + t], state)
            hs.append(state[0])
        per_chunk.append([g.norm().item() for g in torch.autograd.grad(head(torch.stack(hs)).sum(), hs)])
        state = tuple(s.detach() for s in state)
    np.testing.assert_allclose(monitor.history[-1].time["lstm.l0"], np.mean(per_chunk, axis=0), rtol=1e-9)


def test_a_bfloat16_module_is_profiled_within_bfloat16_rounding():
    """A GRU converted to bfloat16 (2 layers, bidirectional): the profile against the float64
    oracle on the same (rounded) weights, within bfloat16's rounding (measured <= 1.1%)."""
    torch.manual_seed(0)
    rnn = nn.GRU(3, 8, num_layers=2, bidirectional=True).to(torch.bfloat16)
    reference = nn.GRU(3, 8, num_layers=2, bidirectional=True).double()
    reference.load_state_dict({k: v.double() for k, v in rnn.state_dict().items()})
    recorder = ThroughTime(rnn)
    x = torch.randn(6, 2, 3)
    out, _ = rnn(x.bfloat16())
    out[-1].float().sum().backward()
    recorder.record()
    expected = oracle(reference, x.double(), lambda o, h: o[-1].sum())[0]
    for key, profile in expected.items():
        np.testing.assert_allclose(recorder.read()[key], profile, rtol=0.05, atol=1e-3 * profile.max())
