"""What the monitor's hooks become in a copy of the user's model.

The monitor's hooks sit on the user's modules, so ``copy.deepcopy(model)`` and
``torch.save(model)`` would carry them, and with them the monitor. A hook class that mixes in
``LeavesCopiesAlone`` is copied and pickled as a plain function that does nothing and removes
itself from its module on its first call: the copy is not monitored.

Example:
    >>> class Tap(LeavesCopiesAlone):
    ...     KIND = "forward"
"""

from __future__ import annotations

from collections.abc import Callable


def spent_forward_hook(module, inputs, output) -> None:
    """A monitor's forward hook in a copy of the model: removes itself, does nothing."""
    _drop(module._forward_hooks, spent_forward_hook)


def spent_forward_kwargs_hook(module, args, kwargs, output) -> None:
    """A monitor's forward hook registered ``with_kwargs``, in a copy of the model: removes itself."""
    _drop(module._forward_hooks, spent_forward_kwargs_hook)


def spent_pre_hook(module, inputs) -> None:
    """A monitor's forward pre-hook in a copy of the model: removes itself, does nothing."""
    _drop(module._forward_pre_hooks, spent_pre_hook)


def spent_pre_kwargs_hook(module, args, kwargs=None) -> None:
    """A monitor's forward pre-hook registered ``with_kwargs``, in a copy of the model: removes itself."""
    _drop(module._forward_pre_hooks, spent_pre_kwargs_hook)


def _drop(hooks: dict, hook: Callable) -> None:
    # torch calls a snapshot of the hooks, so removing one while it runs is safe.
    for key, value in list(hooks.items()):
        if value is hook:
            del hooks[key]


SPENT = {"forward": spent_forward_hook, "forward_kwargs": spent_forward_kwargs_hook, "pre": spent_pre_hook,
         "pre_kwargs": spent_pre_kwargs_hook}


def spent(kind: str) -> Callable:
    """What a pickled hook of ``kind`` loads as."""
    return SPENT[kind]


class LeavesCopiesAlone:
    """Mixin for hooks on the user's modules: copies and pickles become ``SPENT[KIND]``."""

    __slots__ = ()
    KIND = "forward"

    def __reduce__(self):
        return spent, (self.KIND,)

    def __deepcopy__(self, memo):
        return SPENT[self.KIND]

    def __copy__(self):
        return SPENT[self.KIND]
