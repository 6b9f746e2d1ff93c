"""Keeping a monitor's parts on the model's current parameter tensors.

A model can change its parameters under an attached monitor: ``.double()`` or ``.to(device)``
(in place, or new tensors under torch's overwrite and swap flags), ``load_state_dict(...,
assign=True)``, ``module.weight = nn.Parameter(...)``; layers can be added or removed (the window
goes on with the parameters that stayed, and the coordinator attaches to the new set when it
closes: ``Follower.relayout``). ``Follower.follow`` finds such a change
(``model_checks.replaced_parameters``), has every part fold what it took from the old tensors
(on another device: move its sums there, ``Part.move``) and binds the parts to the new ones, so
the window goes on. The ``Conversions`` part calls it from inside training (a forward pass, a
step, a clipping call), ``log()`` before reading, and the optimizer masks (``steps.OptimizerMasks``)
when an optimizer's groups hold tensors the monitor does not know.
"""

from __future__ import annotations

import operator
import weakref
from collections.abc import Callable

from gradflow.monitor.conversions import stale_optimizer
from gradflow.monitor.model_checks import LayersChanged, _one_device, check_members, replaced_parameters
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
        # the model's parameters once layers were added or removed: the coordinator attaches its
        # parts to them when the window closes (None: no such change)
        self.relayout: list | None = None

    def follow(self) -> bool:
        """Follow the model's parameters if they were replaced, converted or moved; True if so.
        What is pending is folded first (on another device: the sums move there, Part.move).

        Parameters added or removed (a layer appended or deleted, ``add_param_group`` with a new
        one): the window goes on with those that stayed (``_layers_changed``).

        Raises:
            MonitorError: the parameters changed in a way a window cannot follow (another shape,
                a complex dtype, several devices, none left): ``replaced_parameters``'s message.
        """
        model, setup = self._model(), self.setup
        try:
            new = None if model is None else replaced_parameters(model, self.names, setup.params, setup.device,
                                                                 setup.dtypes)
        except LayersChanged as change:
            new = self._layers_changed(change)
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

    def _layers_changed(self, change: LayersChanged) -> list | None:
        """Layers added or removed: the new set is kept for the next window (``relayout``, said
        once), and this one goes on with the parameters that stayed, each now the model's tensor
        of its name (those gone stay bound: they get no gradient). The tensors to rebind, or None.

        Raises:
            LayersChanged: no parameter is left, or the parameters are sharded (the collectives
                are planned at attach).
            MonitorError: a stayed parameter has another shape, or the model is on several devices.
        """
        setup = self.setup
        if not change.current or self.sharding is not None:
            raise change
        _one_device(change.current, setup.device)
        check_members(change.current, setup.members)          # a new layer of a batched model: stacked too
        if self.relayout is None or [n for n, _ in self.relayout] != [n for n, _ in change.current]:
            self._warn(f"layers-changed {change.changes()}",
                       f"GradientMonitor: the model's parameters changed during the window ({change.changes()}): "
                       "this window records those that stayed; the new set is recorded from the next window on")
        self.relayout = change.current
        now = dict(change.current)
        new = [now.get(name, p) for name, p in zip(self.names, setup.params)]
        for name, before, after in zip(self.names, setup.params, new):
            if after.shape != before.shape:
                raise MonitorError(f"{name} was replaced by a tensor of another shape ({tuple(before.shape)} -> "
                                   f"{tuple(after.shape)}); remove() this monitor and attach a new one")
        same = all(map(operator.is_, new, setup.params)) and [p.dtype for p in new] == setup.dtypes
        return None if same else new

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
