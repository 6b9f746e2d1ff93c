"""Break tests of issue 20's attach and remove (brk10b): a failed attach leaves the model, its
optimizer and torch's global state as they were; ``remove()`` never raises. Oracle: a snapshot
of every hook dict of every module and parameter, the optimizer's hook dicts, torch's global
module and optimizer hooks, and the identities of the functions the monitor wraps."""

from __future__ import annotations

import glob
import os
import warnings

import pytest
import torch
import torch.nn.modules.module as torch_module
import torch.optim.optimizer as torch_optimizer
from torch import nn
from torch.amp.grad_scaler import GradScaler

from gradflow.monitor import GradientMonitor
from gradflow.monitor.sinks import Sink, TeeSink

_WRAPPED = ("clip_grad_norm_", "clip_grad_value_", "clip_grads_with_norm_", "get_total_norm")


def _state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Every hook the monitor could leave behind, by identity."""
    state = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for attribute, value in vars(module).items():
            if "hook" in attribute and isinstance(value, dict):
                state[name, attribute] = (id(value), tuple((k, id(v)) for k, v in value.items()))
        for pname, p in module._parameters.items():
            if p is not None:
                state[name, pname] = (id(p), dict(p._backward_hooks or {}), tuple(p._post_accumulate_grad_hooks or {}))
    for attribute, value in vars(optimizer).items():
        if "hook" in attribute:
            state["optimizer", attribute] = tuple(value)
    for where in (torch_module, torch_optimizer):
        for attribute in dir(where):
            if attribute.startswith("_global") and "hook" in attribute and isinstance(getattr(where, attribute), dict):
                state[where.__name__, attribute] = tuple(getattr(where, attribute))
    state["functions"] = tuple(id(getattr(torch.nn.utils, f, None)) for f in _WRAPPED) + (id(GradScaler.step),)
    return state


class _Net(nn.Module):
    def __init__(self, refuse: str = ""):
        super().__init__()
        self.fc1, self.act, self.lstm, self.fc2 = nn.Linear(4, 8), nn.Tanh(), nn.LSTM(8, 8, batch_first=True), nn.Linear(8, 1)
        if refuse:                      # one module that refuses hooks of this kind (a sealed third-party module)
            module = getattr(self, refuse.split(":")[0])
            method = refuse.split(":")[1]

            def refused(*args, **kwargs):
                raise RuntimeError(f"{method} refused")
            module.__class__ = type(f"Sealed{type(module).__name__}", (type(module),), {method: refused})

    def forward(self, x):
        return self.fc2(self.lstm(self.act(self.fc1(x)))[0])


def test_a_failed_first_attach_leaves_torch_s_global_optimizer_hooks_as_they_were():
    """The first monitor of a process installs torch global optimizer step hooks (the dispatcher,
    kept once a monitor attached). An attach that failed (a module refusing its hook: the tap, the
    through-time hook on an LSTM, the forward-order pre-hook) left them installed; now it leaves
    every hook as it was, retried too, and a later attach works. Run in a fresh process: the
    dispatcher is installed once per process."""
    import subprocess
    import sys
    code = """
import torch
from tests.monitor.test_brk10b_attach import _Net, _state
from gradflow.monitor import GradientMonitor
for refuse in ("act:register_forward_hook", "lstm:register_forward_hook", "fc2:register_forward_pre_hook"):
    model = _Net(refuse); optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = _state(model, optimizer)
    for kwargs in (dict(), dict(nonfinite=True, through_time_every=1), dict()):
        try:
            GradientMonitor(model, **kwargs).remove()
            raise AssertionError(f"attached: {refuse}")
        except RuntimeError as error:
            assert "refused" in str(error), error
        after = _state(model, optimizer)
        assert after == before, (refuse, {k: (before.get(k), after.get(k)) for k in set(before) | set(after)
                                          if before.get(k) != after.get(k)})
model = _Net(); optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
with GradientMonitor(model) as monitor:
    optimizer.zero_grad(); model(torch.randn(2, 3, 4)).sum().backward(); optimizer.step()
    assert monitor.log(0)['fc2.weight']['steps'] == 1
print('ok')
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert done.stdout.strip().endswith("ok"), done.stderr[-2000:]


class _ClosedRun(Sink):
    """A user's sink whose release raises (a logger whose run was already finished)."""

    def log(self, scalars, histograms, step):
        pass

    def release(self):
        raise RuntimeError("run already finished")


@pytest.mark.parametrize("tee", [False, True])
def test_remove_never_raises_when_a_user_sink_s_release_raises(tmp_path, tee):
    """Leaving ``with GradientMonitor(...)`` called the user's ``Sink.release`` unguarded: its error
    came out of remove() (and out of the with block). Now a warning names it; with a TeeSink the
    TensorBoard writer beside it still lets go of its event file."""
    from torch.utils.tensorboard import SummaryWriter

    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    writer = SummaryWriter(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with GradientMonitor(model, TeeSink(_ClosedRun(), writer) if tee else _ClosedRun()) as monitor:
            model(torch.randn(2, 3)).sum().backward()
            optimizer.step()
            monitor.log(0)
        monitor.remove()                                       # twice
    said = [str(w.message) for w in caught if "release()" in str(w.message)]
    assert len(said) == 2 and "run already finished" in said[0], [str(w.message) for w in caught]
    assert not monitor.attached
    if tee:
        (path,) = glob.glob(str(tmp_path / "events.*"))
        fds = os.listdir("/proc/self/fd")
        assert sum(os.path.realpath(f"/proc/self/fd/{fd}") == os.path.realpath(path) for fd in fds) <= 1   # the writer's own
    writer.close()
