"""Follows a model converted after the monitor attached: ``model.to(device)``, ``model.double()``.

``model.to("cuda")`` moves each parameter in place (the same ``Parameter``, new storage), or
swaps or replaces it (``torch.__future__.set_swap_module_params_on_conversion`` /
``set_overwrite_module_params_on_conversion``); either way the window's sums are still on the old
device. This part checks the first and last parameter's device and dtype where it matters,
cheaply (four comparisons): at the start of each training forward pass the monitor watches
(``part.Schedule.watching``), before any activation tap sees a tensor of the new device; at the
start of every training pass where non-finite or through-time hooks see every pass; at each
clipping call, before it is matched to the monitored parameters; and at each recorded or skipped
step (a compiled model's forward is not watched; ``record()`` may come without one). The
unprofiled passes of a plain loop run with no hook of the monitor: nothing of the monitor sees
their tensors before the step's check.
Parameters replaced by new tensors on another device or of another dtype (the ``overwrite``
flag) are seen there too: the model's own first parameter, looked up in its module, is compared
(not with sharded models, whose frameworks swap parameters at every pass). When something changed, the coordinator's ``follow()`` has every
part fold what it took before and, on a new device, move its sums there (``Part.move``), then
binds the parts to the parameters: the window goes on, and what it recorded before and after is
in it. Other replacements are found when an optimizer holding them steps, or at ``log()``.
"""

from __future__ import annotations

import weakref

from gradflow.monitor.part import Part, watch_forward_starts
from gradflow.monitor.steps import ALL


class Conversions(Part):
    """Notices that the monitored parameters left the device or dtype the monitor is bound to."""

    name = "conversions"

    def __init__(self, model, setup) -> None:
        super().__init__(model, setup)
        name = next(name for name, p in model.named_parameters() if p.is_floating_point())
        owner, _, self.key = name.rpartition(".")      # where the model keeps its first parameter
        self.owner = weakref.ref(model.get_submodule(owner)) if setup.sharding is None else None
        self.model = weakref.ref(model)

    def hook(self, model) -> None:
        # At every pass the hook is on for, profiled or not. Parts whose hooks take tensors at
        # every pass (non-finite, through time) have the hook on at every pass themselves
        # (``always``); otherwise the unprofiled passes are not watched (their tensors are first
        # seen at a clipping call or the step, both of which check).
        watch_forward_starts(self, model, every_pass=True)

    def check(self, mask=None) -> None:
        """Follow the parameters if the first or last of them changed device or dtype, or the
        model's first parameter is a new tensor on another device. Also the part's
        ``forward_starts``, ``record`` and ``skip`` (``mask`` unused): one call, no frame between."""
        setup = self.setup
        params, device, dtypes = setup.params, setup.device, setup.dtypes
        first, last = params[0], params[-1]
        # dtypes are singletons (torch.float32 is x.dtype): compared by identity
        if first.dtype is not dtypes[0] or last.dtype is not dtypes[-1] or first.device != device \
                or last.device != device:
            setup.follow()
            return
        owner = self.owner() if self.owner is not None else None     # _first_now, inline: at every step
        now = owner._parameters.get(self.key) if owner is not None else None
        if now is not None and now is not first and (now.device != device or now.dtype is not dtypes[0]):
            setup.follow()

    forward_starts = skip = check

    def record(self, mask=None):
        """``check`` at a step. Where it rebound the monitor to new tensors that replaced some the
        stepping optimizer's ``mask`` was found for, that optimizer holds the old ones and its step
        applies nothing to those parameters (said once): the mask without them, for the later
        parts, or False where none is left (nothing recorded). False once the monitor stopped."""
        setup = self.setup
        params = setup.params
        self.check()
        if setup.stopped is not None:
            return False                              # a change it could not follow: the monitor stopped
        if setup.params is params or mask is None:
            return None
        kept = [before is now for before, now in zip(params, setup.params)]
        if all(kept):
            return None                               # converted in place: the same tensors, the mask holds
        setup.warn("stale-optimizer", stale_optimizer("The optimizer that stepped",
                                                      [name for name, same in zip(setup.names, kept) if not same]))
        narrowed = tuple(same and (mask is ALL or held) for same, held in zip(kept, kept if mask is ALL else mask))
        return narrowed if any(narrowed) else False

    def _first_now(self):
        """The model's own first parameter as its module holds it now (None with sharded models)."""
        owner = self.owner() if self.owner is not None else None
        return owner._parameters.get(self.key) if owner is not None else None

    def check_clip(self, params) -> None:
        """A clipping call over ``params`` (interception): ``check`` first where the call is over
        this model's parameters, the ones bound or new ones that replaced them (the overwrite
        flag), so that it is matched to the parameters the monitor follows. Another model's call
        (another thread's training) never follows this one."""
        index_of = self.setup.index_of
        if any(id(p) in index_of for p in params):
            self.check()
            return
        now = self._first_now()
        model = self.model()
        if now is not None and now is not self.setup.params[0] and model is not None \
                and not {id(p) for p in params}.isdisjoint(id(p) for p in model.parameters()):
            self.check()


def stale_optimizer(optimizer: str, names: list[str]) -> str:
    """The warning for an optimizer that steps tensors the model replaced after it was made."""
    shown = ", ".join(names[:5]) + (" ..." if len(names) > 5 else "")
    return (f"{optimizer} holds tensors that are no longer the model's: {shown} were replaced by new tensors after "
            "it was made (load_state_dict(assign=True), a conversion under torch.__future__."
            "set_overwrite_module_params_on_conversion(True), module.weight = nn.Parameter(...)); its steps do not "
            "update them and are not recorded for them. Make the optimizer after replacing parameters, or give it "
            "the new ones (add_param_group)")
