"""Keeping a monitor's parts on the model's current parameter tensors.

A model can change its parameters under an attached monitor: ``.double()`` or ``.to(device)``
(in place, or new tensors under torch's overwrite and swap flags), ``load_state_dict(...,
assign=True)``, ``module.weight = nn.Parameter(...)``. ``Follower.follow`` finds such a change
(``model_checks.replaced_parameters``), has every part fold what it took from the old tensors
(on another device: move its sums there, ``Part.move``) and binds the parts to the new ones, so
the window goes on. The ``Conversions`` part calls it from inside training (a forward pass, a
step, a clipping call), ``log()`` before reading, and the optimizer masks (``steps.OptimizerMasks``)
when an optimizer's groups hold tensors the monitor does not know.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

from gradflow.monitor.conversions import stale_optimizer
from gradflow.monitor.model_checks import replaced_parameters
from gradflow.monitor.part import Part, Setup
from gradflow.monitor.steps import OptimizerMasks, entry_ref
from gradflow.monitor.tensors import MonitorError


class Follower:
    """Follows one monitor's model. ``masks`` is set once the monitor made them (they call
    ``refresh``); ``unhook`` removes the monitor's hooks when a change cannot be followed."""

    def __init__(self, model: weakref.ref, names: list[str], setup: Setup, parts: dict[str, Part],
                 sharding, warn: Callable[[str, str], None], unhook: Callable[[], None]) -> None:
        self._model, self.names, self.setup, self.parts = model, names, setup, parts
        self.sharding, self._warn, self._unhook = sharding, warn, unhook
        self.masks: OptimizerMasks | None = None
        # id(tensor) -> (weak reference to it, name): monitored tensors the model replaced, which
        # an optimizer made before may still step (refresh says so)
        self.replaced: dict[int, tuple[weakref.ref, str]] = {}

    def follow(self) -> bool:
        """Follow the model's parameters if they were replaced, converted or moved; True if so.
        What is pending is folded first (on another device: the sums move there, Part.move).

        Raises:
            MonitorError: the parameters changed in a way a window cannot follow (another shape
                or count, a complex dtype, several devices): ``replaced_parameters``'s message.
        """
        model, setup = self._model(), self.setup
        new = None if model is None else replaced_parameters(model, self.names, setup.params, setup.device, setup.dtypes)
        if new is None:
            return False
        moved_to = new[0].device if new[0].device != setup.device else None
        for part in self.parts.values():        # what is pending was taken from the old tensors
            part.fold() if moved_to is None else part.move(moved_to)     # move: fold, then carry the sums there
        if self.sharding is not None and moved_to is not None:
            self.sharding.move(moved_to)
        self._keep_replaced(setup.params, new)
        setup.rebind(new)
        for part in self.parts.values():
            part.bind(new)
        self.masks.forget()
        return True

    def _keep_replaced(self, old: list, new: list) -> None:
        """Remember, weakly, the monitored tensors that new ones replaced (the overwrite flag,
        ``load_state_dict(assign=True)``, ``module.weight = nn.Parameter(...)``): an optimizer made
        before still holds them, and its steps then apply nothing to the model (``refresh``)."""
        replaced = self.replaced
        for name, before, now in zip(self.names, old, new):
            if before is not now:
                replaced[id(before)] = (entry_ref(replaced, id(before), before), name)

    def in_training(self) -> bool:
        """``follow`` from a hook inside the user's training (``Setup.follow``): a change the
        monitor cannot follow (another shape, a complex dtype, several devices) stops the
        monitor with a warning, never an exception out of the user's forward or step; ``log()``
        raises it (MonitorError). False then, and ``Setup.stopped`` says so."""
        try:
            return self.follow()
        except MonitorError as error:
            self.setup.stopped = error
            self._unhook()
            self._warn("unfollowable", f"GradientMonitor stopped recording during training: {error} "
                       "(log() raises this)")
            return False

    def refresh(self, optimizer) -> bool:
        """An optimizer's groups hold none of the monitored tensors, or some that are not monitored
        (``steps.OptimizerMasks``, once per change of its groups): follow the model if its
        parameters were replaced (True); else say once if that optimizer holds tensors the model
        replaced."""
        if self.in_training():
            return True
        if self.setup.stopped is not None or not self.replaced:
            return False
        replaced = self.replaced
        names = [entry[1] for group in optimizer.param_groups for p in group["params"]
                 if (entry := replaced.get(id(p))) is not None and entry[0]() is p]
        if names:
            self._warn("stale-optimizer", stale_optimizer(type(optimizer).__name__, names))
        return False
