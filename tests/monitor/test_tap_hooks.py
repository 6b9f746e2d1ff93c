"""The taps come and go with the profiled passes: registered once, then put back into the
module's hook dict under their handle. Oracles: the module's own hook dicts and the order in
which its hooks run, seen from the user's hooks, and the outputs those hooks capture."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from small_models import relu_mlp, sgd_step
from torch import nn

from gradflow import GradientMonitor


def test_a_tap_put_back_runs_first_and_the_users_hooks_keep_their_order():
    model = relu_mlp()
    relu = model[1]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ran = []

    def before(module, inputs, output):        # the user's, added before the monitor: notes the hooks running
        ran.append([getattr(h, "__name__", type(h).__name__) for h in module._forward_hooks.values()])

    relu.register_forward_hook(before)
    with GradientMonitor(model, activations_every=2) as monitor:
        after = relu.register_forward_hook(lambda m, i, o: None)
        for _ in range(6):
            sgd_step(model, optimizer)
        monitor.log(0)
    after.remove()
    # passes 1, 3, 5 are profiled: the tap first, then the user's hooks in the order they were added
    assert ran == [["_Tap", "before", "<lambda>"], ["before", "<lambda>"]] * 3
    assert list(relu._forward_hooks.values()) == [before]
    assert not relu._forward_hooks_always_called and not model._forward_hooks_always_called
    assert not model._forward_hooks and not model._forward_pre_hooks


class CountingReLU(nn.ReLU):
    """A module whose class registers hooks its own way (here: counting them)."""

    registered = 0

    def register_forward_hook(self, hook, **kwargs):
        CountingReLU.registered += 1
        return super().register_forward_hook(hook, **kwargs)


@pytest.mark.parametrize("replace_dict", [False, True])
def test_a_tap_is_registered_again_where_it_cannot_be_put_back(replace_dict):
    """A module whose class has its own register_forward_hook is asked at every profiled pass; a
    module whose hook dict was replaced gets the tap registered into the new one. Either way the
    tap still reads the outputs (the oracle: the outputs of the profiled passes, captured)."""
    model = relu_mlp()
    if not replace_dict:
        model[1] = CountingReLU()
    CountingReLU.registered = 0
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    outputs = []
    with GradientMonitor(model, activations_every=2) as monitor:
        for step in range(6):
            if replace_dict and step == 1:
                model[1]._forward_hooks = OrderedDict()    # the tap is off now: the old dict is empty
            capture = model[1].register_forward_hook(lambda m, i, o: outputs.append(o.detach().clone()))
            sgd_step(model, optimizer)
            capture.remove()
            if step % 2:
                outputs.pop()                              # an unprofiled pass
        monitor.log(0)
        assert monitor.history[0].activations["1"]["mean"] == pytest.approx(torch.cat(outputs).double().mean().item())
    # the tap at passes 1, 3, 5 and for the 7th, after the 6th step; the test's 6 hooks
    assert CountingReLU.registered == (0 if replace_dict else 4 + 6)
    assert not model[1]._forward_hooks
