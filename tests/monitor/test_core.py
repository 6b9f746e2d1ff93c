"""The recording core in the loops that break naive monitors: optimizer hooks, wrappers,
threads, compiled steps, fused AMP, attaching and removing. Each test compares with an oracle
taken from p.grad at the moment the optimizer step applies it."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn
from torch.optim.optimizer import _global_optimizer_pre_hooks
from wrapped_optimizers import Lookahead

from gradflow.monitor import GradientMonitor
from gradflow.monitor.sinks import Sink
from gradflow.monitor.steps import _dispatch


def _model(seed=0, width=8):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, width), nn.Tanh(), nn.Linear(width, 1))


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, 4, generator=g), torch.randn(16, 1, generator=g)


class Applied:
    """The oracle: each parameter's gradient norm at the moment ``optimizer.step`` applies it,
    taken by wrapping the step function itself (after every pre-hook)."""

    def __init__(self, optimizer, model):
        self.norms = {name: [] for name, _ in model.named_parameters()}
        self.named = list(model.named_parameters())
        original = type(optimizer).step.__wrapped__    # the step below torch's hook wrapper
        recorder = self

        def step(self_, *args, **kwargs):
            if self_ is optimizer:
                for name, p in recorder.named:
                    if p.grad is not None:
                        recorder.norms[name].append(p.grad.double().norm().item())
            return original(self_, *args, **kwargs)

        self._patched = (type(optimizer), type(optimizer).step)
        type(optimizer).step = torch.optim.Optimizer.profile_hook_step(step)   # hooks still run around it

    def close(self):
        cls, step = self._patched
        cls.step = step

    def mean(self, name):
        return sum(self.norms[name]) / len(self.norms[name])


def _train(model, optimizer, steps, seed=0):
    x, y = _batch(seed)
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()


@pytest.mark.parametrize("when", ["before-first-step", "after-first-step"])
@pytest.mark.parametrize("optimizer_class", [torch.optim.SGD, torch.optim.Adam, torch.optim.RMSprop])
def test_records_after_the_optimizers_own_pre_hooks(when, optimizer_class):
    """A user's step pre-hook that rescales .grad runs before the monitor records, whenever it
    was registered: the monitor reports the gradient the step applied (3x backward's)."""
    model = _model()
    optimizer = optimizer_class(model.parameters(), lr=1e-3)

    def triple(opt, args, kwargs):
        for p in model.parameters():
            p.grad.mul_(3.0)

    oracle = Applied(optimizer, model)
    try:
        with GradientMonitor(model, activations=False) as monitor:
            if when == "before-first-step":
                optimizer.register_step_pre_hook(triple)
                _train(model, optimizer, 3)
            else:
                _train(model, optimizer, 1)
                optimizer.register_step_pre_hook(triple)
                _train(model, optimizer, 2)
            rows = monitor.log(0)
    finally:
        oracle.close()
    for name in monitor.names:
        assert rows[name]["steps"] == 3
        assert rows[name]["norm"] == pytest.approx(oracle.mean(name), rel=1e-5)


def _zero(params):
    import tempfile

    import torch.distributed as dist
    from torch.distributed.optim import ZeroRedundancyOptimizer
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    if not dist.is_initialized():
        store = tempfile.NamedTemporaryFile(delete=False)  # noqa: SIM115 - the group's file store, for the process
        dist.init_process_group("gloo", init_method=f"file://{store.name}", rank=0, world_size=1)
    return ZeroRedundancyOptimizer(params, optimizer_class=torch.optim.SGD, lr=0.01)


@pytest.mark.parametrize("wrapper", ["zero", "lookahead", "lookahead-of-adam"])
def test_one_count_per_training_step_through_wrappers(wrapper):
    """A wrapper's step and its inner optimizer's step are one training step: 3 steps count 3,
    with the statistics of the gradient applied (oracle: the model's .grad before each step)."""
    model = _model(1)
    if wrapper == "zero":
        optimizer = _zero(model.parameters())
    elif wrapper == "lookahead":
        optimizer = Lookahead(torch.optim.SGD(model.parameters(), lr=0.01))
    else:
        optimizer = Lookahead(torch.optim.Adam(model.parameters(), lr=0.01))
    x, y = _batch(1)
    norms = []
    with GradientMonitor(model, activations=False) as monitor:
        for _ in range(3):
            optimizer.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            norms.append(model[0].weight.grad.double().norm().item())
            optimizer.step()
        rows = monitor.log(0)
    assert rows["0.weight"]["steps"] == 3 and monitor.history[-1].overall["steps"] == 3
    assert rows["0.weight"]["norm"] == pytest.approx(sum(norms) / 3, rel=1e-5)


def test_threads_keep_their_monitors_apart_and_never_break_training():
    """A long run in one thread, short monitored trials attaching and removing in another: no
    exception reaches either thread's optimizer.step(), and each monitor counts only its own
    model's steps."""
    errors, counts = [], []
    stop = threading.Event()

    def long_run():
        model = _model(2)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        try:
            with GradientMonitor(model, activations=False) as monitor:
                steps = 0
                while not stop.is_set() and steps < 3000:
                    _train(model, optimizer, 1)
                    steps += 1
                counts.append(("long", steps, monitor.log(0)["0.weight"]["steps"]))
        except Exception as error:
            errors.append(error)

    def trials():
        try:
            for seed in range(30):
                model = _model(seed)
                optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
                with GradientMonitor(model, activations=False) as monitor:
                    _train(model, optimizer, 2)
                    counts.append(("trial", 2, monitor.log(0)["0.weight"]["steps"]))
        except Exception as error:
            errors.append(error)
        finally:
            stop.set()

    threads = [threading.Thread(target=long_run), threading.Thread(target=trials)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(counts) == 31 and all(expected == got for _, expected, got in counts), counts


def test_compiled_optimizer_step_does_not_recompile():
    """torch.compile(opt.step): the monitor's hooks run outside the traced region, so steps
    after the first few compile nothing new, and every step is recorded."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    model = _model(3)
    optimizer = torch.optim.Adam(model.parameters(), lr=torch.tensor(0.01))
    torch._dynamo.reset()
    counters.clear()
    step = torch.compile(optimizer.step, backend="eager")
    x, y = _batch(3)
    norms = []
    with GradientMonitor(model, activations=False) as monitor:
        for i in range(8):
            optimizer.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            norms.append(model[0].weight.grad.double().norm().item())
            step()
            if i == 2:
                after_warmup = counters["stats"]["unique_graphs"]
        rows = monitor.log(0)
    assert counters["stats"]["unique_graphs"] == after_warmup, dict(counters["stats"])
    assert rows["0.weight"]["steps"] == 8
    assert rows["0.weight"]["norm"] == pytest.approx(sum(norms) / 8, rel=1e-5)


@pytest.mark.parametrize("optimizer_class", [torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD])
def test_fused_optimizer_under_grad_scaler_is_reported_unscaled(optimizer_class):
    """Adam(fused=True) unscales inside its own step: the monitor reports the unscaled gradient
    (oracle: the gradient with the scale divided out), and the overflow step counts as skipped,
    not averaged in."""
    model = _model(4)
    try:
        optimizer = optimizer_class(model.parameters(), lr=1e-3, fused=True)
    except (RuntimeError, TypeError) as error:
        pytest.skip(f"no fused {optimizer_class.__name__} here: {error}")
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    x, y = _batch(4)
    norms = []
    with GradientMonitor(model, activations=False) as monitor:
        for i in range(4):
            optimizer.zero_grad()
            scaler.scale(nn.functional.mse_loss(model(x), y)).backward()
            if i == 2:                                   # an overflow: the scaler skips this step
                model[0].weight.grad[0, 0] = float("inf")
            else:
                norms.append(model[0].weight.grad.double().norm().item() / scaler.get_scale())
            scaler.step(optimizer)
            scaler.update()
        rows = monitor.log(0)
    row = rows["0.weight"]
    assert row["steps"] == 3 and row["skipped_steps"] == 1 and row["nonfinite"] == 0
    assert monitor.history[-1].overall["skipped_steps"] == 1
    assert row["norm"] == pytest.approx(sum(norms) / 3, rel=1e-5)


class _Refuses(nn.Module):
    """A module whose forward hooks cannot be registered (as some scripted or proxy modules)."""

    def register_forward_hook(self, *args, **kwargs):
        raise RuntimeError("no hooks here")

    def forward(self, x):
        return torch.relu(x)


def _hook_counts(model):
    return {name: (len(m._forward_hooks), len(m._forward_pre_hooks)) for name, m in model.named_modules()}


def test_a_failed_attach_leaves_the_model_as_it_was():
    """Attaching is all or nothing: a part failing halfway leaves no hook, no watch of torch's
    functions and no registration behind, however many times it is retried."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), _Refuses(), nn.Linear(4, 1))
    before = _hook_counts(model)
    clip = torch.nn.utils.clip_grad_norm_
    for _ in range(3):
        with pytest.raises(RuntimeError, match="no hooks here"):
            GradientMonitor(model, activations=lambda name, m: isinstance(m, (nn.Tanh, _Refuses)))
        assert _hook_counts(model) == before
        assert torch.nn.utils.clip_grad_norm_ is clip
    assert list(_global_optimizer_pre_hooks.values()) in ([], [_dispatch])
    GradientMonitor(model, activations=False).remove()       # the model takes a monitor afterwards


def test_remove_never_raises_after_a_failed_log(tmp_path):
    """log() raising (a parameter resized after attaching) leaves a monitor that remove() and
    leaving ``with`` take down without raising."""
    model = _model(5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    from gradflow.monitor import MonitorError
    with GradientMonitor(model) as monitor:
        _train(model, optimizer, 2)
        model[0].weight = nn.Parameter(torch.zeros(3, 4))     # another shape: cannot be followed
        with pytest.raises(MonitorError):
            monitor.log(0)
    monitor.remove()
    assert not monitor.attached and _hook_counts(model) == {name: (0, 0) for name, _ in model.named_modules()}


class _BrokenSink(Sink):
    """A sink whose writes fail (a closed writer, a full disk)."""

    def log(self, scalars, histograms, step):
        raise OSError("disk full")


def test_leaving_with_after_a_failed_write_raises_nothing_more():
    """log() raising from its sink leaves a monitor whose remove() (leaving ``with``, with
    histograms still pooled to write) takes every hook down and only warns."""
    model = _model(6)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    from gradflow.monitor import MonitorError
    with (pytest.warns(UserWarning, match="hooks are removed, but writing what was pending failed: MonitorError: "
                                          r"flush\(\): writing the window to _BrokenSink failed: OSError: disk full"),
          GradientMonitor(model, _BrokenSink(), histograms=3) as monitor):
        _train(model, optimizer, 2)
        with pytest.raises(MonitorError, match="_BrokenSink failed: OSError: disk full"):   # chained to the OSError
            monitor.log(0)
    assert not monitor.attached and _hook_counts(model) == {name: (0, 0) for name, _ in model.named_modules()}
    monitor.remove()                                          # again: nothing to do, nothing raised


def test_an_empty_parameter_is_recorded_without_error():
    """A zero-size parameter (a DTensor's empty shard on some ranks looks the same locally): the
    weights part adds nothing for it and the window still closes."""
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1))
    model.register_parameter("empty", nn.Parameter(torch.zeros(0)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with GradientMonitor(model, None) as monitor:
        optimizer.zero_grad()
        (model(torch.ones(4, 3)).sum() + model.empty.sum()).backward()
        optimizer.step()
        rows = monitor.log(0)
    assert monitor.history[-1].weights["empty"]["norm"] == 0.0 and rows["0.weight"]["steps"] == 1


def test_a_new_optimizer_at_a_dead_ones_id_records_its_own_parameters():
    """An optimizer made and dropped at each step, over the body and over the head by turns
    (two parameters each): the new one mostly takes the dead one's id, which keys the
    per-optimizer caches. Every parameter has a gradient at every step: a mask kept from the
    dead optimizer records the wrong layer (a cache keyed by id alone: the body 20 steps, the
    head none). Oracle: each layer's steps and the head's gradient norm taken straight from p.grad."""
    model = _model(7)
    x, y = _batch(7)
    head = model[2].weight
    norms, ids, reused = [], {}, 0
    with GradientMonitor(model, activations=False) as monitor:
        for step in range(20):
            body = step % 2 == 0
            optimizer = torch.optim.SGD(model[0 if body else 2].parameters(), lr=0.01)
            reused += ids.get(id(optimizer), body) != body
            ids[id(optimizer)] = body
            model.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            if not body:
                norms.append(head.grad.double().norm().item())
            optimizer.step()
            del optimizer
        logged = monitor.log(0)
    assert reused > 0                                     # else this run did not test a reused id
    assert all(row["steps"] == 10 for row in logged.values()), {name: row["steps"] for name, row in logged.items()}
    assert logged["2.weight"]["norm"] == pytest.approx(sum(norms) / len(norms), rel=1e-6)


def test_a_group_added_by_a_users_pre_hook_is_recorded_in_that_step():
    """A step pre-hook of the user's (it runs before the monitor's, which is kept last) adds the
    head as a param group at the third step: that step applies the head's gradient, so the
    monitor records it there, not from the step after (a mask found before the user's pre-hook
    ran left it out). Oracle: the head's steps and its mean gradient norm taken from p.grad."""
    model = _model(3)
    x, y = _batch(3)
    optimizer = torch.optim.SGD(model[0].parameters(), lr=0.01)
    head = model[2].weight
    steps = [0]

    def add_head(opt, args, kwargs):
        steps[0] += 1
        if steps[0] == 3:
            opt.add_param_group({"params": list(model[2].parameters())})

    with GradientMonitor(model, activations=False) as monitor:
        optimizer.register_step_pre_hook(add_head)
        norms = []
        for step in range(5):
            optimizer.zero_grad()
            model.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            if step >= 2:
                norms.append(head.grad.double().norm().item())
            optimizer.step()
        logged = monitor.log(0)
    assert logged["2.weight"]["steps"] == 3 and logged["0.weight"]["steps"] == 5
    assert logged["2.weight"]["norm"] == pytest.approx(sum(norms) / len(norms), rel=1e-6)
