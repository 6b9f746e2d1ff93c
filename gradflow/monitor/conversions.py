"""Follows a model converted after the monitor attached: ``model.to(device)``, ``model.double()``.

``model.to("cuda")`` moves each parameter in place (the same ``Parameter``, new storage), or
swaps or replaces it (``torch.__future__.set_swap_module_params_on_conversion`` /
``set_overwrite_module_params_on_conversion``); either way the window's sums are still on the old
device. This part checks the first and last parameter's device and dtype where it matters,
cheaply (four comparisons): at the start of each training forward pass, before any activation
tap, non-finite hook or clipping call sees a tensor of the new device, and at each recorded or
skipped step (a compiled model's forward is not watched; ``record()`` may come without one).
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


class Conversions(Part):
    """Notices that the monitored parameters left the device or dtype the monitor is bound to."""

    name = "conversions"

    def __init__(self, model, setup) -> None:
        super().__init__(model, setup)
        name = next(name for name, p in model.named_parameters() if p.is_floating_point())
        owner, _, self.key = name.rpartition(".")      # where the model keeps its first parameter
        self.owner = weakref.ref(model.get_submodule(owner)) if setup.sharding is None else None

    def hook(self, model) -> None:
        # Every pass, profiled or not: a clipping call between that pass's backward and its step
        # would otherwise see parameters the monitor does not know yet (replaced ones), and the
        # non-finite part's hooks (nonfinite=True) see every pass.
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
        owner = self.owner() if self.owner is not None else None
        now = owner._parameters.get(self.key) if owner is not None else None
        if now is not None and now is not first and (now.device != device or now.dtype is not dtypes[0]):
            setup.follow()

    forward_starts = record = skip = check
