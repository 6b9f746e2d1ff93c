"""Which parameters an optimizer step applies a gradient to, and when that gradient is final.

The monitor records once per optimizer step, the gradient that step applies:

- ``optimizer.step()``: the step pre-hook runs after backward, accumulation, the DDP
  all-reduce and ``GradScaler.unscale_``: ``.grad`` is final there.
- ``optimizer.step(closure)`` (Lightning's default, LBFGS): the pre-hook runs *before* the
  closure's forward and backward, so ``.grad`` still holds the previous step's gradient. The
  pre-hook hands the optimizer a wrapped closure that records right after the closure's first
  call in the step (LBFGS calls it again for its line search; the first call's gradient is the
  one its step starts from).
- Only the parameters in the stepping optimizer's ``param_groups`` are recorded (a GAN's two
  optimizers each record their own network), re-read whenever the groups change
  (``add_param_group`` after the first step).

Example:
    >>> import torch
    >>> body, head = torch.nn.Linear(2, 2), torch.nn.Linear(2, 1)
    >>> index = {id(p): i for i, p in enumerate([*body.parameters(), *head.parameters()])}
    >>> masks = OptimizerMasks(len(index), lambda: index, lambda: False)   # id(param) -> monitor's index
    >>> masks.mask(torch.optim.SGD(head.parameters(), lr=0.1))   # a tuple of bools, ALL, or None
    (False, False, True, True)
    >>> masks.mask(torch.optim.SGD([*body.parameters(), *head.parameters()], lr=0.1))
    'all'
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from typing import Any

import torch

ALL = "all"      # OptimizerMasks.mask: the optimizer steps every monitored parameter


class OptimizerMasks:
    """Per optimizer: which of the monitor's parameters its ``param_groups`` hold, cached until
    the groups change (a group added, a list replaced or resized). On a miss that finds none of
    them, ``refresh()`` may rebind the monitor to replaced parameters (True if it did): checked
    once per change of the groups, not at every step."""

    def __init__(self, count: int, index_of: Callable[[], dict[int, int]], refresh: Callable[[], bool]) -> None:
        self._count = count
        self._index_of = index_of            # called afresh: the monitor may rebind parameters
        self._refresh = refresh
        self._cache: weakref.WeakKeyDictionary[torch.optim.Optimizer, tuple] = weakref.WeakKeyDictionary()

    def mask(self, optimizer: torch.optim.Optimizer) -> tuple[bool, ...] | str | None:
        """The optimizer's parameters as a mask over the monitor's; ``ALL`` if it holds every one
        (the common case, which records without a mask), None if it holds none."""
        key = _groups_key(optimizer)
        cached = self._cache.get(optimizer)
        if cached is not None and cached[0] == key:
            return cached[1]
        mask = self.compute(optimizer)
        if mask is None and self._refresh():     # its parameters may have replaced the monitored ones
            mask = self.compute(optimizer)
        self._cache[optimizer] = (key, mask)
        return mask

    def compute(self, optimizer: torch.optim.Optimizer) -> tuple[bool, ...] | None:
        index_of = self._index_of()
        flags = [False] * self._count
        for group in optimizer.param_groups:
            for p in group["params"]:
                index = index_of.get(id(p))
                if index is not None:
                    flags[index] = True
        if all(flags):
            return ALL
        return tuple(flags) if any(flags) else None

    def forget(self) -> None:
        self._cache.clear()


def _groups_key(optimizer: torch.optim.Optimizer) -> tuple:
    # The groups' count and each group's list identity and length: cheap, and any change to
    # which parameters an optimizer holds changes one of them (add_param_group, a new list).
    return tuple((id(g["params"]), len(g["params"])) for g in optimizer.param_groups)


def closure_of(args: tuple, kwargs: dict) -> tuple[Callable | None, bool]:
    """The closure passed to ``optimizer.step`` (positional or keyword) and whether by keyword.
    A step pre-hook's ``args`` start with the optimizer itself (torch/optim/optimizer.py)."""
    if kwargs and kwargs.get("closure") is not None:
        return kwargs["closure"], True
    if len(args) > 1 and callable(args[1]):
        return args[1], False
    return None, False


def recording_closure(closure: Callable, record: Callable[[], Any]) -> Callable:
    """The closure that records after its first call (one record per step)."""
    called = False

    @functools.wraps(closure)
    def wrapped(*a, **k):
        nonlocal called
        result = closure(*a, **k)
        if not called:
            called = True
            record()
        return result

    return wrapped


def replace_closure(args: tuple, kwargs: dict, closure: Callable, by_keyword: bool) -> tuple[tuple, dict]:
    if by_keyword:
        return args, {**kwargs, "closure": closure}
    return (args[0], closure, *args[2:]), kwargs
