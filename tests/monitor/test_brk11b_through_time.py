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
