"""The order in which a model's layers run: parameter names by their module's first forward call.

``named_parameters()`` lists parameters in the order modules were assigned in ``__init__``,
which need not be the order data flows through them (a head defined before the body, a tied
embedding listed once). The first training forward pass tells the real order; a forward
pre-hook on each module that owns parameters notes its first call and then removes itself.

Example (the part is the monitor's; ``GradientMonitor.forward_order`` reads it):
    >>> import torch
    >>> from torch import nn
    >>> from gradflow import GradientMonitor
    >>> class Net(nn.Module):                   # the head is assigned before the body
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.head, self.body = nn.Linear(4, 1), nn.Linear(2, 4)
    ...     def forward(self, x):
    ...         return self.head(self.body(x))
    >>> model = Net()
    >>> with GradientMonitor(model, None) as monitor:
    ...     _ = model(torch.ones(1, 2))
    ...     order = monitor.forward_order
    >>> order                                   # input side first
    ['body.weight', 'body.bias', 'head.weight', 'head.bias']
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

import torch
from torch import nn

from gradflow.monitor.kinds import parametrized_owner
from gradflow.monitor.part import Part, Setup
from gradflow.monitor.spent import LeavesCopiesAlone


class ForwardOrder(Part):
    """Notes each parameter-owning module's first call in a forward pass with grad mode on;
    its hooks go at the first optimizer step (one forward pass was enough)."""

    name = "order"

    def __init__(self, model: nn.Module, setup: Setup) -> None:
        super().__init__(model, setup)
        self._names = setup.names
        self._calls: dict[str, int] = {}

    def hook(self, model: nn.Module) -> None:
        if self.setup.options.get("compiled"):
            return      # a compiled forward is not watched, and removing hooks later would recompile it once
        for prefix, module in model.named_modules():
            if module._parameters:              # a parametrized weight's tensors: its module's (fc's) call
                owner = parametrized_owner(prefix)
                self.keep(module.register_forward_pre_hook(_FirstCall(self, prefix if owner is None else owner)))

    def record(self, mask) -> None:
        if self.handles:
            self.remove()

    def seen(self, prefix: str) -> None:
        self._calls.setdefault(prefix, len(self._calls))

    def names(self) -> list[str]:
        """Parameter names, those whose module ran first first; modules never seen keep their
        ``named_parameters()`` place after the seen ones."""
        return in_order(self._names, list(self._calls), key=_owner)

    @property
    def known(self) -> bool:
        return bool(self._calls)


def _owner(name: str) -> str:
    """The module that holds a parameter, as ``named_modules()`` names it (the root's is ``""``)."""
    return _tensor(name).rpartition(".")[0]


_ORIGINALS = re.compile(r"\.original\d+$")


def _tensor(name: str) -> str:
    """The tensor a parameter stands for: itself, or for one of a parametrization's several
    tensors (weight_norm's: ``fc.weight.original0``, ``original1``, named so by
    ``model_checks.user_name``) the parametrized weight, ``fc.weight``. (A parameter really named
    ``original0`` in a module named like a tensor would be taken for one of them.)"""
    return _ORIGINALS.sub("", name) if "original" in name else name


T = TypeVar("T")


def in_order(items: Iterable[T], order: Sequence[str] | None, key: Callable[[T], str] | None = None) -> list[T]:
    """``items`` sorted by where ``key(item)`` (default: the item) stands in ``order`` (forward
    order: first first); items it does not name keep their own order, after the named ones.
    The one forward-order sort: the monitor's ``forward_order``, the analysis's layers and the
    run tables all use it.

    Example:
        >>> in_order(["head.weight", "x", "body.weight"], ["body.weight", "head.weight"])
        ['body.weight', 'head.weight', 'x']
    """
    rank = {name: i for i, name in enumerate(order or ())}
    return sorted(items, key=lambda item: rank.get(item if key is None else key(item), len(rank)))


def layer_of(parameter: str) -> str:
    """The layer a parameter belongs to: its name less the last dotted part, or the name itself
    for a parameter of the model's root (``cls_token``). The analysis groups stacked RNN
    parameters further (``measures.group_of``).

    Example:
        >>> layer_of("dense_1.weight"), layer_of("encoder.layers.0.attn.in_proj_weight"), layer_of("cls_token")
        ('dense_1', 'encoder.layers.0.attn', 'cls_token')
        >>> layer_of("fc.weight.original1")          # weight_norm's direction of fc.weight
        'fc'
    """
    tensor = _tensor(parameter)
    return tensor.rpartition(".")[0] or tensor


class _FirstCall(LeavesCopiesAlone):
    """A forward pre-hook that notes its module's first call (training passes only). In a
    copy of the model (``deepcopy``, ``torch.save``) it becomes a hook that does nothing."""

    __slots__ = ("done", "order", "prefix")
    KIND = "pre"

    def __init__(self, order: ForwardOrder, prefix: str) -> None:
        self.order = order
        self.prefix = prefix
        self.done = False

    def __call__(self, module, inputs):
        if self.done or torch.compiler.is_compiling() or not torch.is_grad_enabled():
            return
        self.done = True
        self.order.seen(self.prefix)
        return
