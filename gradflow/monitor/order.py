"""The order in which a model's layers run: parameter names by their module's first forward call.

``named_parameters()`` lists parameters in the order modules were assigned in ``__init__``,
which need not be the order data flows through them (a head defined before the body, a tied
embedding listed once). The first training forward pass tells the real order; a forward
pre-hook on each module that owns parameters notes its first call and then removes itself.

Example:
    >>> order = ForwardOrder(model, setup); order.hook(model)    # a part of the monitor
    >>> model(x)
    >>> order.names()                           # input side first
"""

from __future__ import annotations

import torch
from torch import nn

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
        for prefix, module in model.named_modules():
            if module._parameters:
                self.keep(module.register_forward_pre_hook(_FirstCall(self, prefix)))

    def record(self, mask) -> None:
        if self.handles:
            self.remove()

    def seen(self, prefix: str) -> None:
        self._calls.setdefault(prefix, len(self._calls))

    def names(self) -> list[str]:
        """Parameter names, those whose module ran first first; modules never seen keep their
        ``named_parameters()`` place after the seen ones."""
        unseen = len(self._calls)
        return sorted(self._names, key=lambda name: (self._calls.get(_owner(name), unseen),
                                                     self._names.index(name)))

    @property
    def known(self) -> bool:
        return bool(self._calls)


def _owner(name: str) -> str:
    return name.rpartition(".")[0]


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
