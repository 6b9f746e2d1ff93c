"""What the monitor holds in memory: one copy of the trainable weights, nothing of frozen ones,
no layer output past its forward pass, no copy of a step's gradients beyond a fixed budget
(issue 20, item 4; benchmarks/memory.py measures the peak RSS)."""

from __future__ import annotations

import gc
import weakref
from collections import OrderedDict

import numpy as np
import pytest
import torch
from monitor_oracle import GradientOracle, assert_matches_oracle
from torch import nn

from gradflow import GradientMonitor
from gradflow.monitor import stats as S
from gradflow.monitor.activations import DIRECT_OUTPUT
from gradflow.monitor.footprint import held
from gradflow.monitor.sinks import ScalarSink, Sink
from gradflow.monitor.tensors import PENDING_ELEMENTS


class LoRA(nn.Module):
    """y = base(x) + x A^T B^T, the base frozen (Hu et al. 2021)."""

    def __init__(self, features: int, rank: int) -> None:
        super().__init__()
        self.base = nn.Linear(features, features, bias=False)
        self.base.weight.requires_grad_(False)
        self.a = nn.Parameter(torch.randn(rank, features) * 0.1)
        self.b = nn.Parameter(torch.randn(features, rank) * 0.1)

    def forward(self, x):
        return self.base(x) + x @ self.a.T @ self.b.T


def train(model, x, optimizer, steps: int) -> None:
    for _ in range(steps):
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()


def test_a_frozen_base_costs_no_copy_and_the_trainable_weights_one(reduction_path):
    """LoRA on a frozen 512 x 512 base (1 MB): what the monitor holds after each window is one
    copy of the adapter and head (the update ratios' start) plus a few KB per parameter; the
    torch-ops path (accelerators) adds its reused chunk buffers and per-element layouts."""
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(lora=LoRA(512, 4), act=nn.GELU(), head=nn.Linear(512, 1)))
    x = torch.randn(32, 512)                             # GELU output: 16,384 elements
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    base = model.lora.base.weight
    with GradientMonitor(model, activations_every=1) as monitor:
        for window in range(2):
            train(model, x, optimizer, 3)
            monitor.log(window)
            storages = held(monitor, model)
            total = sum(size for size, _ in storages)
            fixed = 5 * (S.SIGN_EXPONENT_BINS * 8 + 64) + 32 * 1024    # counts and rows per parameter, frozen too
            if reduction_path == "torch-ops":                          # an int32 chunk of the base's bins, layouts
                fixed += base.numel() * 4 + 512 * 1024
            assert total <= trainable + fixed, (total, trainable)
            floats = [size for size, dtype in storages if dtype in (torch.float32, np.float32)]
            assert max(floats) < base.numel() * 4 / 8          # nothing near a copy of the frozen base
    starts = dict(zip(monitor.names, monitor.parts["weights"].start))
    assert starts["lora.base.weight"] is None and starts["lora.a"] is not None


def test_no_layer_output_outlives_its_forward_pass(reduction_path):
    """An output of DIRECT_OUTPUT elements or more is reduced when the model's forward pass ends
    and dropped: after backward nothing keeps it alive, and the statistics match the outputs."""
    torch.manual_seed(1)
    model = nn.Sequential(OrderedDict(dense=nn.Linear(16, 256), act=nn.Tanh(), head=nn.Linear(256, 1)))
    with torch.no_grad():
        model.dense.weight.mul_(3)                         # some saturation to count
    x = torch.randn(32, 16)                                # 8,192 elements: direct, below the large path
    assert DIRECT_OUTPUT <= 32 * 256 < 1 << 16
    outputs, alive = [], []

    def keep(module, inputs, output):
        outputs.append(output.detach().clone())
        alive.append(weakref.ref(output))

    model.act.register_forward_hook(keep)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with GradientMonitor(model, activations_every=1) as monitor:
        for _ in range(3):
            optimizer.zero_grad()
            loss = model(x).square().mean()
            assert monitor.parts["activations"].pending == []      # reduced at the forward's end
            loss.backward()
            optimizer.step()
            del loss
            gc.collect()
            assert alive[-1]() is None, "the tapped output is still alive after the step"
        monitor.log(0)
    tanh = torch.cat([o.reshape(-1) for o in outputs]).double()
    got = monitor.history[0].activations["act"]
    assert got["mean"] == pytest.approx(tanh.mean().item(), abs=1e-6)
    assert got["std"] == pytest.approx(tanh.std(unbiased=False).item(), rel=1e-4)
    assert got["saturated_fraction"] == pytest.approx((tanh.abs() > 0.97).double().mean().item())
    assert 0 < got["saturated_fraction"] < 1


@pytest.mark.parametrize("kind", ["adapters", "many-small"])
def test_small_gradients_that_fill_the_budget_are_reduced_at_their_step(kind, reduction_path):
    """Small gradients of more than the pending budget a step are reduced at that step, nothing
    kept pending: two 200 x 200 weights (40,000 elements each: straight from .grad on the fused
    path, no flat copy), or five 128 x 128 layers with biases (copied flat: per-gradient calls would
    cost more). The statistics match the oracle either way."""
    torch.manual_seed(2)
    if kind == "adapters":
        model = nn.Sequential(nn.Linear(200, 200, bias=False), nn.Tanh(), nn.Linear(200, 200, bias=False), nn.Tanh(),
                              nn.Linear(200, 1, bias=False))
    else:
        model = nn.Sequential(*[m for _ in range(5) for m in (nn.Linear(128, 128), nn.ReLU())], nn.Linear(128, 1))
    inputs = model[0].in_features
    assert sum(p.numel() for p in model.parameters()) >= PENDING_ELEMENTS and \
        all(p.numel() < 1 << 16 for p in model.parameters())
    oracle = GradientOracle(model.named_parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with GradientMonitor(model) as monitor:
        gradients = monitor.parts["gradients"]
        for _ in range(3):
            optimizer.zero_grad()
            model(torch.randn(8, inputs)).square().mean().backward()
            oracle.capture()
            optimizer.step()
            assert gradients.pending_elements == 0 and not gradients.pending
        uncopied = all(not plan.small for plan in gradients._plans.values())
        assert uncopied == (kind == "adapters" and reduction_path == "fused")
        logged = monitor.log(0)
    assert_matches_oracle(logged, oracle)


class _Taps(nn.Module):
    """Twenty small tanh outputs in one forward pass (20 x 4,000 elements: past the pending
    budget within the pass), and a switch to raise after the last of them."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(20))
        self.acts = nn.ModuleList(nn.Tanh() for _ in range(20))
        self.fail = False

    def forward(self, x):
        for layer, act in zip(self.layers, self.acts):
            x = act(layer(x))
        if self.fail:
            raise RuntimeError("bad batch")
        return x


def test_the_budget_waits_for_the_end_of_a_forward_pass():
    """Small outputs past the pending budget inside one forward pass are reduced when it ends,
    not halfway: a pass that raises after them leaves nothing in the window."""
    torch.manual_seed(9)
    model = _Taps()
    outputs = []
    model.acts[0].register_forward_hook(lambda m, i, o: outputs.append(o.detach().clone()) and None)
    x = torch.randn(500, 8)
    assert 20 * x.shape[0] * 8 > PENDING_ELEMENTS and x.shape[0] * 8 < DIRECT_OUTPUT
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    with GradientMonitor(model, activations_every=1) as monitor, pytest.warns(UserWarning, match="raised halfway"):
        model.fail = True
        with pytest.raises(RuntimeError, match="bad batch"):
            model(x * 3)
        model.fail = False
        model(x).sum().backward()
        assert monitor.parts["activations"].pending_elements == 0      # reduced at the pass's end
        optimizer.step()
        monitor.log(0)
    whole = outputs[-1].double()
    row = monitor.history[-1].activations["acts.0"]
    assert row["mean"] == pytest.approx(whole.mean().item(), rel=1e-5)
    assert row["std"] == pytest.approx(whole.std(unbiased=False).item(), rel=1e-4)


class _Histograms(Sink):
    """Keeps the names of the histograms of each window."""

    def __init__(self) -> None:
        self.tags: list[set[str]] = []

    def log(self, scalars, histograms, step) -> None:
        self.tags.append(set(histograms))


def test_the_read_back_hands_counts_over_uncopied_and_they_equal_the_oracle(reduction_path):
    """On the CPU the window's float64 sums and int64 counts reach the readers as views of the
    parts' own tensors (window.read_back), not float64 copies: each window's gradient counts
    equal the oracle's bins of every step's gradient, its weight counts the bins of each weight
    at the window's end, and log()'s rows the oracle's; a window read earlier keeps its weight
    counts (made anew each window) when the next one is read. Tiny grouped parameters (head),
    LoRA factors and a frozen base."""
    torch.manual_seed(4)
    model = nn.Sequential(OrderedDict(lora=LoRA(256, 4), act=nn.GELU(), head=nn.Linear(256, 1)))
    x = torch.randn(8, 256)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    oracle = GradientOracle(model.named_parameters())
    optimizer.register_step_pre_hook(lambda *_: oracle.capture())
    drawn = _Histograms()                     # a sink that takes histograms: the weights' counts are kept
    with GradientMonitor(model, drawn) as monitor:
        reads = []
        for window in range(2):
            train(model, x, optimizer, 2)
            values = monitor._read_back()
            gradients = monitor.parts["gradients"]
            assert values["gradients/counts"].dtype == np.int64
            assert np.shares_memory(values["gradients/counts"], gradients.counts.numpy())     # no copy
            assert np.shares_memory(values["activations/counts"], monitor.parts["activations"].counts.numpy())
            np.testing.assert_array_equal(values["gradients/counts"].reshape(-1, S.SIGN_EXPONENT_BINS),
                                          np.stack([oracle.bins[name] for name in monitor.names]))
            expected = np.stack([S.sign_exponent_counts(p).numpy() for p in monitor.parts["weights"].params])
            norms = [p.detach().double().norm().item() for p in monitor.parts["weights"].params]
            np.testing.assert_array_equal(values["weights/counts"], expected)
            np.testing.assert_allclose(values["weights/rows"][:, 1], norms, rtol=1e-6)   # L2 norms
            reads.append((values, expected.copy()))
            assert_matches_oracle(monitor.log(window), oracle)
            assert not values["gradients/counts"].any()            # the view: zeroed for the next window
            oracle.reset()
    first, first_expected = reads[0]
    assert not np.array_equal(first_expected, reads[1][1])         # the weights moved between the windows
    np.testing.assert_array_equal(first["weights/counts"], first_expected)
    assert all("weight/lora/base/weight" in tags and "grad/head/weight" in tags for tags in drawn.tags)


@pytest.mark.parametrize("writer", [None, "scalars", "histograms=False"])
def test_weight_counts_are_not_made_where_no_histogram_is_written(writer, reduction_path):
    """The weights' counts feed their histograms alone: with no writer, a sink that drops
    histograms (ScalarSink) or histograms=False the weights part makes none (4 KB per parameter
    less at each log), and its rows still equal the oracle's norms and update ratios."""
    torch.manual_seed(5)
    model = nn.Sequential(OrderedDict(lora=LoRA(256, 4), act=nn.GELU(), head=nn.Linear(256, 1)))
    x = torch.randn(8, 256)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    scalars = []
    sink = ScalarSink(lambda s, step: scalars.append(s)) if writer == "scalars" else \
        _Histograms() if writer == "histograms=False" else None
    with GradientMonitor(model, sink, histograms=writer != "histograms=False") as monitor:
        start = [p.detach().double().clone() for p in model.parameters()]
        train(model, x, optimizer, 2)
        monitor.log(0)
        assert set(monitor.parts["weights"].device_tensors()) == {"rows"}     # (it renews the window's start)
    for (name, p), before in zip(model.named_parameters(), start):
        row = monitor.history[-1].weights[name]
        now = p.detach().double()
        assert row["norm"] == pytest.approx(now.norm().item(), rel=1e-6)
        assert row["l1"] == pytest.approx(now.abs().sum().item(), rel=1e-6)
        expected = ((now - before).norm() / before.norm()).item()
        assert row["update_ratio"] == pytest.approx(expected, rel=1e-5, abs=1e-12)
    assert scalars or writer != "scalars"
    if writer == "histograms=False":
        assert sink.tags == [set()]


def test_a_few_small_gradients_beside_large_ones_are_not_copied_between_steps(reduction_path):
    """A LoRA-like step: one large gradient (524,288 elements) and a small head (weight and bias).
    With the fused kernels the head joins the large one's call straight from .grad, so nothing
    waits copied between steps (gradients.JOINED_SMALL); on the torch-ops path it is copied as
    before. Either way each window equals the oracle taken at the optimizer step."""
    from gradflow.monitor.gradients import JOINED_ELEMENTS

    torch.manual_seed(8)
    model = nn.Sequential(OrderedDict(up=nn.Linear(512, 1024, bias=False), act=nn.ReLU(), head=nn.Linear(1024, 1)))
    assert model.up.weight.numel() >= 2 * JOINED_ELEMENTS
    x = torch.randn(16, 512)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    oracle = GradientOracle(model.named_parameters())
    optimizer.register_step_pre_hook(lambda *_: oracle.capture())
    with GradientMonitor(model) as monitor:
        for window in range(2):
            for _ in range(3):
                train(model, x, optimizer, 1)
                pending = monitor.parts["gradients"].pending
                assert (pending == []) == (reduction_path == "fused"), len(pending)
            assert_matches_oracle(monitor.log(window), oracle)
            oracle.reset()


def test_held_counts_memory_once_however_it_is_reached():
    """``footprint.held``: a tensor and the numpy views kept of it (``tensor.numpy()``, a row of
    it) are one piece of memory; a numpy view of the model's own parameter is the model's; an
    array of its own is counted. Oracle: the byte sizes made here."""
    model = nn.Linear(8, 4)
    sums = torch.zeros(3, 512, dtype=torch.int64)
    own = np.zeros(100)
    holder = {"sums": sums, "views": (sums.numpy(), sums.numpy()[1], sums[2].numpy()),
              "weight_view": model.weight.detach().numpy(), "own": own}
    sizes = sorted(size for size, _ in held(holder, model))
    assert sizes == sorted([sums.numel() * 8, own.nbytes])
