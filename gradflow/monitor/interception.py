"""Watches the two torch calls that decide what a step applies but offer no hook of their own.

- ``GradScaler.step`` skips ``optimizer.step()`` when a gradient overflowed (so no optimizer
  hook runs on exactly the step an AMP user needs to see);
- ``torch.nn.utils.clip_grad_norm_`` returns the total norm before clipping, which the
  gradient that the optimizer then applies no longer shows.

While at least one monitor is attached, both are wrapped: the wrapper calls torch's own
function unchanged and then tells each attached monitor what happened. The last monitor to
detach restores torch's functions. Nothing is added to the user's model, optimizer or scaler.

Code that imported ``clip_grad_norm_`` by name before a monitor attached (``from
torch.nn.utils import clip_grad_norm_`` at import time) keeps torch's original and is not
seen; Lightning, accelerate and the Hugging Face Trainer look it up at call time.

Example:
    >>> watch(monitor)          # done by GradientMonitor on attach
    >>> unwatch(monitor)        # done by remove()
"""

from __future__ import annotations

import functools
import weakref
from typing import Any, Iterable

import torch
import torch.nn.utils
import torch.nn.utils.clip_grad
from torch.amp.grad_scaler import GradScaler

from gradflow.monitor.stats import wide_dtype

_WATCHERS: "weakref.WeakSet[Any]" = weakref.WeakSet()
_ORIGINAL: dict[str, Any] = {}


def watch(monitor: Any) -> None:
    """Start telling ``monitor`` about clipping (``_on_clip``) and skipped steps (``_on_skipped``)."""
    _WATCHERS.add(monitor)
    if not _ORIGINAL:
        _install()


def unwatch(monitor: Any) -> None:
    """Stop telling ``monitor``; restore torch's functions when no monitor is left."""
    _WATCHERS.discard(monitor)
    if not _WATCHERS and _ORIGINAL:
        _uninstall()


def found_inf(scaler: GradScaler | None, optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``scaler`` found an inf/NaN in ``optimizer``'s gradients this iteration (so it
    will skip, or skipped, the step). False without a scaler, a disabled one, or before
    ``unscale_``. Reads one flag per device back to the host (``GradScaler.step`` does too)."""
    if scaler is None or not scaler.is_enabled():
        return False
    state = scaler._per_optimizer_states.get(id(optimizer), {})
    return bool(sum(v.item() for v in state.get("found_inf_per_device", {}).values()))


class ClipTally:
    """A window's clip_grad_norm_ calls: how many, and on the device the sum of the norms they
    found and how many of them clipped (torch clips when max_norm / (total + 1e-6) < 1,
    torch/nn/utils/clip_grad.py)."""

    def __init__(self) -> None:
        self.calls = 0
        self.sums: torch.Tensor | None = None      # [sum of norms before clipping, clipped calls]

    def add(self, total: torch.Tensor, max_norm: float) -> None:
        total = total.detach()
        if hasattr(total, "full_tensor"):          # a DTensor norm of sharded gradients: its full value,
            total = total.full_tensor()            # one collective, inside a clip call every rank makes
        if self.sums is None or self.sums.device != total.device:
            self.sums = torch.zeros(2, device=total.device, dtype=wide_dtype(total.device))
        self.sums.add_(torch.stack([total, total + 1e-6 > max_norm]).to(self.sums.dtype))
        self.calls += 1


def _install() -> None:
    _ORIGINAL["clip"] = torch.nn.utils.clip_grad_norm_
    _ORIGINAL["step"] = GradScaler.__dict__["step"]
    torch.nn.utils.clip_grad_norm_ = torch.nn.utils.clip_grad.clip_grad_norm_ = _clip_grad_norm_
    GradScaler.step = _scaler_step


def _uninstall() -> None:
    # Only put back what is still ours: someone else may have wrapped it after us.
    if torch.nn.utils.clip_grad_norm_ is _clip_grad_norm_:
        torch.nn.utils.clip_grad_norm_ = _ORIGINAL["clip"]
    if torch.nn.utils.clip_grad.clip_grad_norm_ is _clip_grad_norm_:
        torch.nn.utils.clip_grad.clip_grad_norm_ = _ORIGINAL["clip"]
    if GradScaler.__dict__.get("step") is _scaler_step:
        GradScaler.step = _ORIGINAL["step"]
    _ORIGINAL.clear()


def _clip_grad_norm_(parameters: torch.Tensor | Iterable[torch.Tensor], max_norm: float, *args, **kwargs):
    params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    total = _ORIGINAL["clip"](params, max_norm, *args, **kwargs)
    for monitor in list(_WATCHERS):
        monitor._on_clip(params, total, float(max_norm))
    return total


_clip_grad_norm_ = functools.wraps(torch.nn.utils.clip_grad.clip_grad_norm_)(_clip_grad_norm_)


def _scaler_step(self: GradScaler, optimizer: torch.optim.Optimizer, *args, **kwargs):
    result = _ORIGINAL["step"](self, optimizer, *args, **kwargs)
    if self.is_enabled() and _WATCHERS and found_inf(self, optimizer):
        for monitor in list(_WATCHERS):
            monitor._on_skipped(optimizer)
    return result
