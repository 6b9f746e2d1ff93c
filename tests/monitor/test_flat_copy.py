"""The step's one flat copy of the small gradients (``tensors._flat_copy``), made below autograd.

Oracles: ``torch.cat`` of each tensor flattened and cast to float32; the gradients a second-order
step computes with no monitor attached; each step's ``.grad`` read as the step applies it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from gradflow import GradientMonitor
from gradflow.monitor.tensors import _flat_copy


def _oracle(tensors):
    return torch.cat([t.detach().reshape(-1).float() for t in tensors])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_flat_copy_is_the_float32_concatenation(dtype):
    torch.manual_seed(0)
    tensors = [torch.randn(5, 3, dtype=dtype).t(), torch.randn(7, dtype=dtype), torch.randn(2, 2, 2, dtype=dtype)[:, 1]]
    flat = _flat_copy(tensors)
    assert flat.dtype == torch.float32 and flat.shape == (15 + 7 + 4,)
    assert torch.equal(flat, _oracle(tensors))


def test_a_copy_of_tensors_requiring_grad_is_detached_and_leaves_their_graph_alone():
    """Weights and activations require grad: the copy joins no graph and bumps no version, and
    the model's own backward through the copied tensors gives the gradients it gives without it."""
    torch.manual_seed(1)
    w = torch.randn(4, 3, requires_grad=True)
    x = torch.randn(6, 4)
    h = (x @ w).tanh()                                       # an activation: part of a graph
    versions = (w._version, h._version)
    flat = _flat_copy([w, h])
    assert not flat.requires_grad and flat.grad_fn is None
    assert (w._version, h._version) == versions
    assert torch.equal(flat, _oracle([w, h]))
    h.sum().backward()
    twin = w.detach().clone().requires_grad_()
    (x @ twin).tanh().sum().backward()
    assert torch.equal(w.grad, twin.grad)
    kept = _oracle([w, h])
    flat.add_(1.0)                                           # the copy is its own memory
    assert torch.equal(w, twin.detach()) and torch.equal(_oracle([w, h]), kept)


@pytest.mark.parametrize("count", [1, 3])
def test_a_copy_does_not_alias_gradients_rewritten_in_place(count):
    """A lone tensor comes back from the flatten as a view of itself: the copy must not be."""
    tensors = [torch.randn(8) for _ in range(count)]
    flat = _flat_copy(tensors)
    before = flat.clone()
    for t in tensors:
        t.zero_()
    assert torch.equal(flat, before)


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")   # torch's, about the user's loop
def test_second_order_training_is_unchanged_and_recorded():
    """``backward(create_graph=True)``: the gradients require grad while the step records them.
    The monitor's copy must neither cut nor join their graph: the gradient penalty's own second
    backward gives the weights the same gradients as an unmonitored twin, and the recorded norm
    is each step's ``.grad`` norm."""
    torch.manual_seed(2)
    nets = [nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    opts = [torch.optim.SGD(net.parameters(), lr=0.05) for net in nets]
    norms, applied = [], []
    with GradientMonitor(nets[0], histograms=False, activations=False) as monitor:
        for _ in range(3):
            x = torch.randn(8, 3)
            for k, (net, opt) in enumerate(zip(nets, opts)):
                opt.zero_grad()
                loss = net(x).square().mean()
                grads = torch.autograd.grad(loss, list(net.parameters()), create_graph=True)
                (loss + sum(g.square().sum() for g in grads)).backward(create_graph=True)
                assert all(p.grad.requires_grad for p in net.parameters())
                if k == 0:
                    norms.append(nets[0][0].weight.grad.detach().double().norm().item())
                    applied.append([p.grad.detach().clone() for p in net.parameters()])
                else:
                    for mine, twin in zip(applied[-1], net.parameters()):
                        assert torch.equal(mine, twin.grad.detach())
                opt.step()
        row = monitor.log(0)["0.weight"]
    assert row["norm"] == pytest.approx(np.mean(norms), rel=1e-6)
    for a, b in zip(nets[0].parameters(), nets[1].parameters()):
        assert torch.equal(a, b)
