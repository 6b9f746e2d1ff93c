"""Which GradientMonitor is attached to which module: one at a time per module.

A monitor claims its module before it adds a hook and gives the claim up when it is removed.
Claims are made under one lock: two threads that attach to one module at the same moment both
pass ``check_attach``'s look, and the second to claim is refused here, before it adds a hook;
``remove()`` and ``detach()`` of one monitor in two threads delete its entry once. Entries are
weak: a module that is garbage collected leaves no entry.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Mapping
from typing import Any

from torch import nn

from gradflow.monitor.model_checks import already_attached, attached_elsewhere

_ATTACHED: weakref.WeakKeyDictionary[nn.Module, Any] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def attached() -> Mapping[nn.Module, Any]:
    """Each module's monitor (read only: ``claim`` and ``release`` change it)."""
    return _ATTACHED


def monitor_of(model: nn.Module) -> Any:
    """The monitor attached to ``model`` (the user's module, ``unwrap``), or None."""
    return _ATTACHED.get(model)


def claim(model: nn.Module, monitor: Any) -> None:
    """Enter ``monitor`` as ``model``'s and mark it attaching (``monitor.attaching``: its hooks
    are being added; the caller clears it).

    Raises:
        MonitorError: another monitor is attached to ``model``, or attaching now.
    """
    with _LOCK:
        if attached_elsewhere(model, _ATTACHED, monitor):
            raise already_attached(model)
        _ATTACHED[model] = monitor
        monitor.attaching = True


def release(model: nn.Module | None, monitor: Any) -> None:
    """Drop ``model``'s entry if it is ``monitor``'s (None: the module was collected)."""
    with _LOCK:
        if model is not None and _ATTACHED.get(model) is monitor:
            del _ATTACHED[model]
