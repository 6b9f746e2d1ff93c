"""Break tests of the first non-finite source (nonfinite.py), helper brk11b.

Oracle: the plant. A NaN put into the batch at step 2 is the input's (``"(input)"``), whichever
argument of the model's forward carried it; the tests check the module, the pass and the step."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from gradflow.monitor import GradientMonitor
from gradflow.monitor.nonfinite import INPUT, Source


class _TokensAndFeatures(nn.Module):
    """A forward whose first argument is integer tokens and whose second is float features."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.fc, self.out = nn.Embedding(10, 4), nn.Linear(4, 4), nn.Linear(4, 1)

    def forward(self, tokens, feats=None):
        return self.out(self.fc(self.emb(tokens) + feats)).sum()


def _first_source(call, steps=4, plant_at=2):
    torch.manual_seed(0)
    model = _TokensAndFeatures()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    tokens = torch.randint(0, 10, (8,))
    with GradientMonitor(model, nonfinite=True, activations=False) as monitor:
        for step in range(steps):
            feats = torch.randn(8, 4)
            if step == plant_at:
                feats[3, 1] = float("nan")
            optimizer.zero_grad()
            call(model, tokens, feats).backward()
            optimizer.step()
        monitor.log(0)
    return monitor.history[-1].first_nonfinite


@pytest.mark.parametrize("call", [
    lambda m, t, f: m(t, f),                      # the second positional argument
    lambda m, t, f: m(t, feats=f),                # by keyword
    lambda m, t, f: m(tokens=t, feats=f),         # everything by keyword (model(**batch))
], ids=["positional", "keyword", "all_keywords"])
def test_a_nan_in_any_argument_of_the_batch_is_the_input(call):
    """Only the first argument was checked: a NaN in another one was put on the model's own
    code (module "") as if its forward had made it."""
    assert _first_source(call) == Source(INPUT, "forward", 2)


def test_a_copy_of_the_model_keeps_no_live_keyword_hook():
    """The keyword pre-hook on the model becomes a spent hook in a copy: a NaN fed to the copy
    reaches nothing in the monitor (the window of a clean step says None), and the spent hook
    removes itself; leaving the monitor takes the model's hook off."""
    torch.manual_seed(0)
    model = _TokensAndFeatures()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    tokens, feats = torch.randint(0, 10, (8,)), torch.randn(8, 4)
    with GradientMonitor(model, nonfinite=True, activations=False) as monitor:
        twin = copy.deepcopy(model)
        poisoned = feats.clone()
        poisoned[0, 0] = float("nan")
        twin(tokens=tokens, feats=poisoned)
        assert not twin._forward_pre_hooks
        optimizer.zero_grad()
        model(tokens, feats=feats).backward()
        optimizer.step()
        monitor.log(0)
    assert monitor.history[-1].first_nonfinite is None
    assert not model._forward_pre_hooks


class _NanInBackward(torch.autograd.Function):
    """Identity forward (finite); its backward makes the gradient NaN."""

    @staticmethod
    def forward(ctx, x):
        return x * 1.0

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


class _Block(nn.Module):
    def __init__(self, poison: bool) -> None:
        super().__init__()
        self.fc1, self.fc2, self.poison = nn.Linear(4, 4), nn.Linear(4, 4), poison

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(_NanInBackward.apply(h) if self.poison else h)


class _Outer(nn.Module):
    """A LSTM (whose c_n the loss never uses), a block, functional code of the model's own."""

    def __init__(self, where: str) -> None:
        super().__init__()
        self.lstm, self.block, self.head, self.where = nn.LSTM(4, 4), _Block(where == "block"), nn.Linear(4, 1), where

    def forward(self, x):
        _, (h, _) = self.lstm(x)
        h = self.block(h[-1])
        return self.head(_NanInBackward.apply(h) if self.where == "" else h).sum()


@pytest.mark.parametrize("where", ["", "block"], ids=["model_code", "block_code"])
def test_a_nan_made_in_backward_by_code_between_two_children_is_that_codes(where):
    """A custom Function between two children, in the model's or a block's own code, whose
    backward makes NaN: it was put on the child before it (``block``, ``block.fc1``), whose
    input gradient was the first non-finite one watched; the gradient with respect to that
    child's output is now watched and put on the code that received the output."""
    torch.manual_seed(0)
    model = _Outer(where)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    with GradientMonitor(model, nonfinite=True, activations=False) as monitor:
        for _ in range(2):
            optimizer.zero_grad()
            model(torch.randn(5, 2, 4)).backward()
            optimizer.step()
        monitor.log(0)
    assert monitor.history[-1].first_nonfinite == Source(where, "backward", 0)
