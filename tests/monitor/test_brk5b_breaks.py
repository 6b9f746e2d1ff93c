"""Break tests (helper brk5b) of attaching and removing, threads and conversions, each against an
oracle: statistics taken straight from ``p.grad`` right before ``optimizer.step()``, and the
model's and optimizer's complete hook sets compared before attaching and after removing."""

from __future__ import annotations

import threading
import warnings

import pytest
import torch
from monitor_oracle import step_statistics
from torch import nn

from gradflow.monitor import GradientMonitor


def _model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))


def _captured(model: nn.Module, by_name: dict[str, list[float]]) -> None:
    """The oracle: each parameter's gradient norm, by its name now (a replaced parameter's too)."""
    for name, p in model.named_parameters():
        if p.grad is not None:
            by_name.setdefault(name, []).append(step_statistics(p.grad)["norm"])


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


@pytest.mark.parametrize("when", ["mid-window", "between-windows"])
@pytest.mark.parametrize("stepped_by", ["new-optimizer", "group-added"])
def test_one_parameter_replaced_by_a_new_one_is_followed_at_the_next_step(when, stepped_by):
    """``model[0].weight = nn.Parameter(...)`` (same shape, dtype and device: a layer
    re-initialised), then stepped by a new optimizer over ``model.parameters()`` or by the old one
    with the new weight added as a group: each step applies the new weight's gradient, so each is
    recorded (before: the optimizer held monitored parameters besides it, so the monitor never
    looked for replaced ones and dropped the new weight's steps until the next log())."""
    model = _model(1)
    x = torch.randn(16, 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    norms: dict[str, list[float]] = {}
    with GradientMonitor(model, activations=False) as monitor:
        for _ in range(2):
            optimizer.zero_grad()
            model(x).square().mean().backward()
            _captured(model, norms)
            optimizer.step()
        if when == "between-windows":
            first = monitor.log(0)
            assert first["0.weight"]["norm"] == pytest.approx(_mean(norms.pop("0.weight")), rel=1e-6)
            norms.clear()
        model[0].weight = nn.Parameter(model[0].weight.detach() * 3.0)
        if stepped_by == "new-optimizer":
            optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        else:
            optimizer.add_param_group({"params": [model[0].weight]})
        for _ in range(3):
            optimizer.zero_grad()
            model.zero_grad()
            model(x).square().mean().backward()
            _captured(model, norms)
            optimizer.step()
        rows = monitor.log(1)
    expected_steps = 5 if when == "mid-window" else 3
    for name, values in norms.items():
        assert rows[name]["steps"] == expected_steps == len(values), (name, rows[name]["steps"], len(values))
        assert rows[name]["norm"] == pytest.approx(_mean(values), rel=1e-6), name


def _optimizer_hooks(optimizer: torch.optim.Optimizer) -> dict[str, tuple]:
    """The optimizer's own hook dicts, and torch's global ones (the monitor's one dispatcher
    each, installed at the first attach and never removed, is left out)."""
    from torch.optim import optimizer as torch_optimizer

    from gradflow.monitor import steps
    ours = set(map(id, (steps._dispatch, steps._finished)))
    hooks = {name: tuple(getattr(optimizer, name)) for name in vars(optimizer) if name.startswith("_optimizer_")
             and name.endswith("_hooks")}
    for name in ("_global_optimizer_pre_hooks", "_global_optimizer_post_hooks"):
        hooks[name] = tuple(k for k, hook in getattr(torch_optimizer, name).items() if id(hook) not in ours)
    return hooks


@pytest.mark.parametrize("where", ["other-thread-in-pre-hooks", "other-thread-in-post-hooks",
                                   "own-pre-hook", "own-post-hook"])
def test_remove_during_a_step_never_breaks_that_step(where):
    """remove() while an optimizer step is iterating its hooks: from another thread (made exact:
    a step hook of the user's waits until the other thread has removed the monitor), or from
    the user's own step pre- or post-hook. Before, remove() deleted the monitor's hooks from the
    dict torch was iterating: "OrderedDict mutated during iteration" out of optimizer.step().
    Oracle: no exception, the step applied, the optimizer's hook dicts as before attaching once
    the step is over, and the steps recorded before the removal (from p.grad)."""
    model, x = _model(2), torch.randn(16, 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    inside, left, errors, armed, norms = threading.Event(), threading.Event(), [], [False], []
    own = where.startswith("own")

    def user_hook(opt, args, kwargs):
        if armed[0]:
            armed[0] = False
            if own:
                monitor.remove()
            else:
                inside.set()
                left.wait(10)

    pre = where.endswith("pre-hook") or where.endswith("pre-hooks")
    (optimizer.register_step_pre_hook if pre else optimizer.register_step_post_hook)(user_hook)
    before = _optimizer_hooks(optimizer)
    monitor = GradientMonitor(model, activations=False)

    def train():
        try:
            for step in range(3):
                armed[0] = step == 1
                optimizer.zero_grad()
                model(x).square().mean().backward()
                norms.append(model[0].weight.grad.double().norm().item())
                weight = model[0].weight.detach().clone()
                optimizer.step()
                assert not torch.equal(weight, model[0].weight)
        except Exception as error:                 # what the user's training would see
            errors.append(error)
        finally:
            inside.set()

    thread = threading.Thread(target=train)
    thread.start()
    if not own:
        inside.wait(10)
        monitor.remove()
        left.set()
    thread.join()
    assert not errors, errors
    assert _optimizer_hooks(optimizer) == before
    recorded = 1 if pre else 2                      # removed before or after the second step was recorded
    row = monitor.log(0)["0.weight"]
    assert row["steps"] == recorded
    assert row["norm"] == pytest.approx(_mean(norms[:recorded]), rel=1e-6)


class _Split(nn.Module):
    """A parametrization of two tensors (its ``right_inverse`` returns two): named
    ``fc.weight.original0`` and ``fc.weight.original1``, as weight_norm's."""

    def forward(self, a, b):
        return a + b

    def right_inverse(self, weight):
        return weight / 2, weight / 2


@pytest.mark.parametrize("parametrize", ["weight_norm", "two-tensor"])
def test_a_weight_parametrized_by_two_tensors_is_one_layer_in_its_place(parametrize):
    """weight_norm (and any parametrization of several tensors) gives ``2.weight.original0`` and
    ``2.weight.original1``: they belong to layer ``2``, in the forward order where layer 2 ran.
    Before, they were a layer ``2.weight`` of their own, put last in the forward order and so
    taken by the verdict for the output layer (layer 4 is). Oracle: the model's own layers."""
    from torch.nn.utils import parametrizations
    from torch.nn.utils import parametrize as P

    from gradflow.analysis.diagnose import diagnose_monitor
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))
    if parametrize == "weight_norm":
        parametrizations.weight_norm(model[2])
    else:
        P.register_parametrization(model[2], "weight", _Split(), unsafe=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with GradientMonitor(model, activations=False) as monitor:
        for window in range(5):
            optimizer.zero_grad()
            model(torch.randn(16, 4)).square().mean().backward()
            optimizer.step()
            monitor.log(window)
    assert monitor.forward_order == ["0.weight", "0.bias", "2.bias", "2.weight.original0", "2.weight.original1",
                                     "4.weight", "4.bias"]
    layers = diagnose_monitor(monitor, model=model).evidence["layers"]
    assert list(layers) == ["0", "2", "4"]
    assert [row["role"] for row in layers.values()] == ["hidden", "hidden", "head"]


@pytest.mark.parametrize("parametrize", ["spectral_norm", "weight_norm"])
def test_a_parametrized_weight_of_the_root_module_is_under_its_users_name(parametrize):
    """``spectral_norm(nn.Linear(4, 1))`` monitored itself: named_parameters() lists
    ``parametrizations.weight.original``, with no module before it; the user calls it ``weight``
    (weight_norm's two: ``weight.original0``, ``weight.original1``), a linear layer's. Before, the
    raw name stayed, of kind ``other``. Oracle: the name the model gives the weight, and the
    gradient norm of the tensor behind it (p.grad before the step)."""
    from torch.nn.utils import parametrizations
    torch.manual_seed(4)
    model = getattr(parametrizations, parametrize)(nn.Linear(4, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with GradientMonitor(model, activations=False) as monitor:
        optimizer.zero_grad()
        model(torch.randn(8, 4)).square().mean().backward()
        grads = {name: p.grad.double().norm().item() for name, p in model.named_parameters()}
        optimizer.step()
        rows = monitor.log(0)
    tensors = ["weight"] if parametrize == "spectral_norm" else ["weight.original0", "weight.original1"]
    assert monitor.names == ["bias", *tensors] and list(rows) == monitor.names
    assert set(monitor.kinds.values()) == {"linear"}
    for name in tensors:
        raw = "parametrizations." + name if "original" in name else "parametrizations.weight.original"
        assert rows[name]["norm"] == pytest.approx(grads[raw], rel=1e-6)


def test_an_optimizer_class_given_for_optimizer_is_a_one_line_error():
    """``optimizer=torch.optim.SGD`` (the class, not the instance) was taken, and then every
    optimizer step of the process raised AttributeError from the monitor's dispatcher (``type
    object 'SGD' has no attribute 'param_groups'``): the monitor broke training. Now a one-line
    MonitorError at attach (check_optimizer); training is untouched (oracle: the step applies)."""
    from gradflow.monitor import MonitorError
    model = _model(5)
    with pytest.raises(MonitorError, match=r"optimizer=\) must be a torch\.optim\.Optimizer") as error:
        GradientMonitor(model, optimizer=torch.optim.SGD)
    assert "\n" not in str(error.value)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(4, 4)).sum().backward()
    weight = model[0].weight.detach().clone()
    optimizer.step()
    assert not torch.equal(weight, model[0].weight)


def test_an_optimizer_holding_none_of_the_models_parameters_is_said_at_attach():
    """``optimizer=`` an optimizer of another model: nothing would ever be recorded, and log()
    blamed a hand-written update. Said when attaching."""
    model, other = _model(6), _model(7)
    with pytest.warns(UserWarning, match=r"optimizer=SGD holds none of this Sequential's parameters"):
        GradientMonitor(model, optimizer=torch.optim.SGD(other.parameters(), lr=0.1)).remove()


def test_history_length_set_later_is_checked_and_applies_at_once():
    """``monitor.history_length`` is settable: a shorter length drops the oldest windows at once,
    None keeps every later one, and a bad length is the same one-line error as at attach. Before,
    0 or -1 emptied ``history`` silently, and "10" made every later log() raise TypeError after
    writing its window but before starting the next one, so the next window counted its steps
    again. Oracle: the windows' own steps (one step each) and their order."""
    from gradflow.monitor import MonitorError
    model, x = _model(8), torch.randn(4, 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with GradientMonitor(model, activations=False, history_length=6) as monitor:
        for step in range(10):
            optimizer.zero_grad()
            model(x).sum().backward()
            optimizer.step()
            monitor.log(step)
        assert [w.step for w in monitor.history] == [4, 5, 6, 7, 8, 9]
        monitor.history_length = 3
        assert monitor.history_length == 3 and [w.step for w in monitor.history] == [7, 8, 9]
        for bad in (0, -1, 2.5, "10", True):
            with pytest.raises(MonitorError, match=r"^history_length must be a positive int or None .*, got "):
                monitor.history_length = bad
        assert monitor.history_length == 3
        optimizer.zero_grad()
        model(x).sum().backward()
        optimizer.step()
        assert monitor.log(10)["0.weight"]["steps"] == 1
        monitor.history_length = None
        optimizer.zero_grad()
        for step in range(11, 14):
            monitor.log(step)
        assert [w.step for w in monitor.history] == [8, 9, 10, 11, 12, 13]


@pytest.mark.parametrize("where", ["other-thread", "own-forward-hook"])
def test_remove_during_a_forward_pass_is_said_as_such(where):
    """remove() while a profiled forward pass runs (from another thread, made exact: a forward
    hook of the user's after the tapped tanh waits until the monitor is removed; or from that
    hook itself): the tanh output it tapped is left out, and the warning says why. Before, it
    said the pass "raised halfway", which no pass did. Oracle: no exception in the pass, and
    the output the model returns is that of the model without a monitor."""
    model, x = _model(9), torch.randn(16, 4)
    expected = model(x).detach()
    inside, left, errors, outputs = threading.Event(), threading.Event(), [], []
    monitor = GradientMonitor(model, activations_every=1)

    def hook(module, inputs, output):
        if where == "own-forward-hook":
            monitor.remove()
        else:
            inside.set()
            left.wait(10)

    model[2].register_forward_hook(hook)

    def forward():
        try:
            outputs.append(model(x).detach())
        except Exception as error:
            errors.append(error)
        finally:
            inside.set()

    with pytest.warns(UserWarning, match=r"removed while a forward pass of the model was running") as caught:
        thread = threading.Thread(target=forward)
        thread.start()
        if where == "other-thread":
            inside.wait(10)
            monitor.remove()
            left.set()
        thread.join()
    assert not errors, errors
    assert not any("raised halfway" in str(w.message) for w in caught)
    torch.testing.assert_close(outputs[0], expected)


class _SealedTanh(nn.Tanh):
    """A tanh that takes forward hooks until it is sealed (as a module handed to a framework
    that freezes its hooks), then refuses them."""

    sealed = False

    def register_forward_hook(self, *args, **kwargs):
        if self.sealed:
            raise RuntimeError("sealed: no more hooks")
        return super().register_forward_hook(*args, **kwargs)


def test_a_tap_refused_during_training_never_raises_into_the_step():
    """The activation taps come off and back on between profiled passes (activations_every=2),
    inside the step's recording. A module that took its tap at attach but refuses it later: before,
    the RuntimeError came out of optimizer.step() (the monitor broke training). Now the taps stop
    with one warning naming the cause, no false "no activation output" warning follows, the
    gradients are still recorded (oracle: p.grad before each step), and remove() leaves the hooks
    as they were."""
    torch.manual_seed(11)
    model = nn.Sequential(nn.Linear(4, 8), _SealedTanh(), nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(16, 4)
    before = {name: (tuple(m._forward_hooks), tuple(m._forward_pre_hooks)) for name, m in model.named_modules()}
    norms = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with GradientMonitor(model, activations_every=2) as monitor:
            model[1].sealed = True
            for _ in range(6):
                optimizer.zero_grad()
                model(x).square().mean().backward()
                norms.append(model[0].weight.grad.double().norm().item())
                optimizer.step()
            row = monitor.log(0)["0.weight"]
    messages = [str(w.message) for w in caught]
    assert [m for m in messages if "refused" in m] == [
        "activations: a module refused its tap during training (RuntimeError: sealed: no more hooks): activations "
        "are not recorded from here on; gradients and weights still are"], messages
    assert not any("no activation output" in m for m in messages), messages
    assert row["steps"] == 6 and row["norm"] == pytest.approx(_mean(norms), rel=1e-6)
    assert {name: (tuple(m._forward_hooks), tuple(m._forward_pre_hooks)) for name, m in model.named_modules()} == before


class _SlowTanh(nn.Tanh):
    """A tanh whose forward hooks take a while to register once armed: it waits for ``go``."""

    armed, reached, go = False, threading.Event(), threading.Event()

    def register_forward_hook(self, *args, **kwargs):
        if self.armed:
            self.armed = False
            self.reached.set()
            self.go.wait(10)
        return super().register_forward_hook(*args, **kwargs)


def test_a_monitor_removed_while_its_taps_go_back_on_leaves_no_tap():
    """The taps go back on inside a step (activations_every=2); another thread removes the
    monitor meanwhile (made exact: the tapped tanh's registration waits until it is removed).
    Before, the tap registered after remove() stayed on the model for good (1 run of 3 of a
    random churn of 3,000 monitors showed it). Oracle: the model's hook dicts as before
    attaching, and the training thread's steps raise nothing."""
    torch.manual_seed(13)
    tanh = _SlowTanh()
    model = nn.Sequential(nn.Linear(4, 8), tanh, nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(16, 4)
    before = {name: (tuple(m._forward_hooks), tuple(m._forward_pre_hooks)) for name, m in model.named_modules()}
    monitor = GradientMonitor(model, activations_every=2)
    errors = []

    def train():
        try:
            for step in range(3):
                tanh.armed = step == 1              # the second step turns the taps back on
                optimizer.zero_grad()
                model(x).square().mean().backward()
                optimizer.step()
        except Exception as error:
            errors.append(error)
        finally:
            tanh.reached.set()

    thread = threading.Thread(target=train)
    thread.start()
    tanh.reached.wait(10)
    monitor.remove()
    tanh.go.set()
    thread.join()
    assert not errors, errors
    assert {name: (tuple(m._forward_hooks), tuple(m._forward_pre_hooks)) for name, m in model.named_modules()} == before


@pytest.mark.slow
def test_monitors_churned_while_three_threads_train_break_nothing_and_leave_nothing():
    """Three threads train their models (clipping every step); two more attach monitors to them
    at random (first non-finite part on half the time) and remove them after 0-3 ms, for 4 s
    under a 1 us switch interval: removals land inside forward passes, backward and steps. No
    thread raises, no remove() fails to write what was pending (before: 1-5 of ~3,000 removals
    per 8 s said 'writing what was pending failed: RuntimeError' from the first non-finite part,
    a sum folded without its code; and a monitor removed by its churner while the other detached
    it raised KeyError from remove(), 2 runs of 6), and after one more step each no hook is left.
    ~5 s."""
    import random
    import sys
    import time

    from gradflow.monitor import MonitorError
    models = [(_model(20 + k), torch.randn(8, 4)) for k in range(3)]
    optimizers = [torch.optim.SGD(model.parameters(), lr=0.001) for model, _ in models]
    stop, errors, removed = threading.Event(), [], [0]

    def train(k):
        model, x = models[k]
        try:
            while not stop.is_set():
                optimizers[k].zero_grad()
                model(x).square().mean().backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizers[k].step()
        except Exception as error:
            errors.append(error)

    def churn(seed):
        rng = random.Random(seed)
        try:
            while not stop.is_set():
                model = rng.choice(models)[0]
                if GradientMonitor.detach(model):          # the other churner's: removed here
                    removed[0] += 1
                    continue
                try:
                    monitor = GradientMonitor(model, activations_every=rng.choice([1, 2]),
                                              nonfinite=rng.random() < 0.5)
                except MonitorError:                       # the other churner attached meanwhile
                    continue
                time.sleep(rng.random() * 0.003)
                monitor.remove()
                removed[0] += 1
        except Exception as error:
            errors.append(error)

    threads = [threading.Thread(target=train, args=(k,)) for k in range(3)]
    threads += [threading.Thread(target=churn, args=(seed,)) for seed in range(2)]
    interval = sys.getswitchinterval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sys.setswitchinterval(1e-6)
        try:
            for thread in threads:
                thread.start()
            time.sleep(4)
            stop.set()
            for thread in threads:
                thread.join()
        finally:
            sys.setswitchinterval(interval)
    assert not errors, errors[:2]
    assert removed[0] > 100
    assert not [str(w.message) for w in caught if "writing what was pending failed" in str(w.message)]
    for (model, x), optimizer in zip(models, optimizers):
        model(x).sum().backward()
        optimizer.step()
        assert not optimizer._optimizer_step_pre_hooks and not optimizer._optimizer_step_post_hooks
        assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
