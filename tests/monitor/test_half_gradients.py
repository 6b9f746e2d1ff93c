"""bfloat16 and float16 gradients on the CPU are folded by the fused kernels a piece at a time:
the statistics equal the float64 oracle of the very values, and no float32 copy of a whole
gradient is made."""

import numpy as np
import pytest
import torch
from torch import nn

from gradflow import GradientMonitor
from gradflow.monitor import gradients as G


class Stacked(nn.Module):
    """``members`` two-layer MLPs trained as one: each weight stacked on a leading dimension."""

    def __init__(self, members: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.hidden = nn.Parameter(torch.randn(members, 300, 256, dtype=dtype) / 20)
        self.out = nn.Parameter(torch.randn(members, 256, 1, dtype=dtype) / 20)

    def forward(self, x):                     # x: (members, batch, 300)
        return torch.bmm(torch.bmm(x, self.hidden).relu(), self.out)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("members", [1, 2])
def test_half_gradients_match_the_oracle_across_pieces(dtype, members, monkeypatch):
    monkeypatch.setattr(G, "CONVERTED_PIECE", 1000)           # several pieces per gradient, one short
    torch.manual_seed(0)
    model = Stacked(members, dtype)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    start = [p.detach().clone() for p in model.parameters()]
    monitor = GradientMonitor(model, None, members=members, activations=False, weights=False,
                              histogram_every=1)
    seen = {name: [] for name, _ in model.named_parameters()}
    for step in range(3):
        optimizer.zero_grad()
        model(torch.randn(members, 8, 300, dtype=dtype)).float().pow(2).mean().backward()
        with torch.no_grad():
            model.hidden.grad[:, 0, :7] = 0                   # exact zeros
            if step == 1:
                model.hidden.grad[:, 1, 3] = float("inf")     # a non-finite value, counted and in the max
        for name, p in model.named_parameters():
            seen[name].append(p.grad.double().reshape(members, -1).clone())
        optimizer.step()
        with torch.no_grad():                                 # the weights stay finite after the Inf
            for p, first in zip(model.parameters(), start):
                p.copy_(first)
    logged = monitor.log(0)
    for name, grads in seen.items():
        for member in range(members):
            row = (logged[member] if members > 1 else logged)[name]
            values = [g[member] for g in grads]
            assert row["steps"] == 3
            assert row["nonfinite"] == sum(int((~torch.isfinite(v)).sum()) for v in values)
            assert row["zero_fraction"] == pytest.approx(sum(int((v == 0).sum()) for v in values)
                                                         / sum(v.numel() for v in values), abs=1e-12)
            assert row["max_abs"] == pytest.approx(np.mean([v.abs().max().item() for v in values]), rel=1e-12)
            assert row["mean"] == pytest.approx(np.mean([v.mean().item() for v in values]), rel=1e-9)
            if name == "out":                                 # no Inf: the norms are finite
                assert row["norm"] == pytest.approx(np.mean([v.norm().item() for v in values]), rel=1e-9)
                assert row["mean_abs"] == pytest.approx(np.mean([v.abs().mean().item() for v in values]), rel=1e-9)
    monitor.remove()


def test_a_half_gradient_is_not_copied_whole_to_float32(monkeypatch):
    """The buffer the conversion uses is one piece long, whatever the gradient's size, and is
    not held between steps: after the step the monitor holds its sums and counts, no float32
    buffer (``footprint.held``)."""
    from gradflow.monitor.footprint import held
    monkeypatch.setattr(G, "CONVERTED_PIECE", 4096)
    buffers = []
    fold = G._fold_converted
    monkeypatch.setattr(G, "_fold_converted", lambda *args: buffers.append(args[-1].numel()) or fold(*args))
    model = nn.Linear(512, 512).to(torch.bfloat16)            # 262,144 weights: large
    monitor = GradientMonitor(model, None, activations=False, weights=False)
    model(torch.randn(4, 512, dtype=torch.bfloat16)).float().sum().backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert buffers == [4096, 4096]                            # the weight and the bias (large as the weight's buffer)
    assert not [size for size, dtype in held(monitor.parts["gradients"], model) if dtype == torch.float32]
    assert monitor.log(0)["weight"]["steps"] == 1
    monitor.remove()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("members", [1, 2])
def test_half_weights_match_the_oracle_across_pieces(dtype, members, monkeypatch):
    """bfloat16 and float16 weights folded a piece at a time (``weights.CONVERTED_PIECE``, set
    short here: several pieces per member, one short) give the float64 oracle's rows and
    histogram counts of the very values, over two windows (the start renewed between them)."""
    from gradflow.monitor import stats as S
    from gradflow.monitor import weights as W
    monkeypatch.setattr(W, "CONVERTED_PIECE", 1000)
    torch.manual_seed(1)
    model = Stacked(members, dtype)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    monitor = GradientMonitor(model, None, members=members, activations=False)
    part = monitor.parts["weights"]
    for _ in range(2):
        start = {name: p.detach().double().reshape(members, -1).clone() for name, p in model.named_parameters()}
        for _ in range(2):
            optimizer.zero_grad()
            model(torch.randn(members, 8, 300, dtype=dtype)).float().pow(2).mean().backward()
            optimizer.step()
        part.counted = True                      # the histogram counts too, as with a writer that draws
        rows, counts = part.summary()
        for i, (name, p) in enumerate(model.named_parameters()):
            now = p.detach().double().reshape(members, -1)
            for m in range(members):
                slot = i * members + m
                w, s = now[m], start[name][m]
                expected = [w.abs().sum(), w.square().sum().sqrt(), (w - s).square().sum().sqrt(), s.square().sum().sqrt()]
                assert rows[slot].tolist() == pytest.approx([e.item() for e in expected], rel=1e-12)
                bins = S.sign_exponent_bins(p.detach().reshape(members, -1)[m].float()).long().bincount(minlength=512)
                assert torch.equal(counts[slot], bins)
    monitor.remove()


def test_half_weights_are_folded_a_piece_at_a_time(monkeypatch):
    """The weights' fold of a half-precision parameter hands the fused kernel float32 pieces of
    ``weights.CONVERTED_PIECE`` values (the last one shorter), never the whole parameter."""
    from gradflow.monitor import kernels
    from gradflow.monitor import weights as W
    monkeypatch.setattr(W, "CONVERTED_PIECE", 4096)
    sizes, own = [], kernels.fold_weights

    def fold_weights(values, start, lengths, **options):
        sizes.append((values.dtype, values.size))
        return own(values, start, lengths, **options)

    monkeypatch.setattr(kernels, "fold_weights", fold_weights)
    model = nn.Linear(500, 100).to(torch.bfloat16)            # 50,000 weights: 12 full pieces and one of 848
    monitor = GradientMonitor(model, None, activations=False)
    model(torch.randn(4, 500, dtype=torch.bfloat16)).float().sum().backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert monitor.log(0)["weight"]["weight_update_ratio"] > 0
    assert [size for dtype, size in sizes if dtype == np.float32 and size != 100] == [4096] * 12 + [848]
    monitor.remove()
