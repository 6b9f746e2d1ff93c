"""A monitor's side of ``interception``: what it does when told of a torch call that has no hook.

``interception`` wraps ``GradScaler.step``/``unscale_`` and the clipping functions while a
monitor is attached, and tells each attached monitor's ``Intercepted`` what happened: a clipping
call's scope and norm (the ``Clipping`` part keeps them; the ``Conversions`` part follows a model
converted since the last step first), a scaled step about to be unscaled, a step that GradScaler
skipped (every part counts it, ``Part.skip``).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch

from gradflow.monitor.part import Part
from gradflow.monitor.steps import OptimizerMasks, steps_for


class Intercepted:
    """One monitor's receiver. ``automatic``: the monitor records at each step (skipped steps are
    counted only then; with ``automatic=False`` the caller's ``record(skipped=True)`` does it);
    ``only``: a weak reference to the one optimizer the monitor watches (``optimizer=``), or None."""

    def __init__(self, parts: dict[str, Part], masks: OptimizerMasks, automatic: bool,
                 only: weakref.ref | None, skip: Callable[[object], None]) -> None:
        self._parts, self._masks, self._automatic, self._only, self._skip = parts, masks, automatic, only, skip

    def skipped(self, optimizer: torch.optim.Optimizer) -> None:
        """GradScaler skipped ``optimizer``'s step."""
        if not self._automatic or (self._only is not None and not steps_for(self._only(), optimizer)):
            return
        mask = self._masks.mask(optimizer)
        if mask is not None:
            self._skip(mask)

    def scaled_step(self, optimizer: torch.optim.Optimizer, scale: torch.Tensor) -> None:
        """``GradScaler.step(optimizer)`` is about to unscale the gradients: a clipping call of
        this step saw them multiplied by ``scale``."""
        self._parts["clipping"].unscale(scale, optimizer)

    def clip_scope(self, params: list[torch.Tensor], ids: set[int]) -> list[torch.Tensor] | None:
        """Before a clipping call over ``params`` (``ids``: theirs): where the call also clips
        gradients this monitor does not watch, its own parameters with a gradient there (perhaps
        none); else None. A model converted since the last step is followed first (its
        parameters are new tensors)."""
        self._parts["conversions"].check_clip(params)
        return self._parts["clipping"].scope(params, ids)

    def mixed_meshes(self) -> None:
        """Calls sharing one total_norm, some over other gradients too: said once."""
        self._parts["clipping"].mixed_meshes()

    def clip(self, params: list[torch.Tensor], total: torch.Tensor, clipped: torch.Tensor,
             ids: set[int] | None = None) -> bool:
        """A clipping call over ``params`` (``ids``: theirs, if made already) found the norm
        ``total`` before clipping and ``clipped`` (after ``clip_scope``); whether it was counted
        (it clipped some of this monitor's parameters)."""
        return self._parts["clipping"].add(params, total, clipped, ids)
