"""The model's root carries the monitor's hooks only for the passes it must see: the profiled
ones (the pass's start and end), a window's passes until its first recorded step, and every pass
after a clipping call until the step; the unprofiled passes of a plain loop run with no hook of the
monitor (torch's fast call path). Which passes are profiled is still the documented rule, whatever
the loop: the first, then the one after every N-th step, where steps with no training forward pass
between them count once. Oracles: the hook dictionaries of the model itself, pass counts made by
the test's own loop, and the activation statistics of the passes the rule profiles, computed from
the outputs the test captured."""

from __future__ import annotations

import warnings

import pytest
import torch
from small_models import relu_mlp, sgd_step
from torch import nn

from gradflow import GradientMonitor


def test_the_root_carries_the_pass_end_hook_on_profiled_passes_only():
    model = relu_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = []

    def note(module, inputs, output):          # the user's own hook on the root, after the monitor's
        seen.append((len(model._forward_pre_hooks), len(model._forward_hooks), len(model[1]._forward_hooks)))

    with GradientMonitor(model, activations_every=3) as monitor:
        model.register_forward_hook(note)
        for _ in range(7):
            sgd_step(model, optimizer)
        monitor.log(0)
        for _ in range(2):
            sgd_step(model, optimizer)
    # passes 1, 4, 7 are profiled (the first, then the one after every 3rd step): the pass start, its end
    # and the ReLU's tap are hooked there; the other passes carry the user's hook alone, but for the
    # second pass (2: until the second step, which shows the loop steps one optimizer) and the first
    # pass of a window (8: after log()), whose start is watched until the window's first step
    profiled, watched, plain = [(1, 2, 1)], [(1, 1, 0)], [(0, 1, 0)]
    assert seen == profiled + watched + plain + profiled + plain * 2 + profiled + watched + plain
    assert not model._forward_pre_hooks and len(model._forward_hooks) == 1 and not model[1]._forward_hooks


def test_every_training_pass_is_counted_per_window():
    """torch.func training (no .grad, no step) after a window of plain steps: the warning names
    the window's training passes, profiled or not, and no evaluation pass."""
    from torch.func import functional_call, grad
    model = relu_mlp()
    params = {k: v.detach() for k, v in model.named_parameters()}
    x = torch.randn(8, 3)

    def loss(p):
        return functional_call(model, p, (x,)).square().mean()

    def train(passes: int) -> None:
        nonlocal params
        for _ in range(passes):
            g = grad(loss)(params)
            params = {k: v - 0.1 * g[k] for k, v in params.items()}
        with torch.no_grad():
            model(x)                               # an evaluation pass: not a training one

    with GradientMonitor(model, activations_every=10) as monitor:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(3):                         # the unprofiled passes of this window are not watched
            sgd_step(model, optimizer)
        optimizer.zero_grad()
        monitor.log(0)
        said = []
        for window, passes in enumerate([5, 3], start=1):
            train(passes)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                monitor.log(window)
            said += [str(w.message) for w in caught if "torch.func" in str(w.message)]
            monitor._warnings.said.discard("unrecorded")      # said once per monitor: hear it again
    assert [m.split(" training forward passes")[0].split()[-1] for m in said] == ["5", "3"]


def _clip_by_norm(params):
    torch.nn.utils.clip_grad_norm_(params, max_norm=1e-3)


def _clip_by_value(params):
    torch.nn.utils.clip_grad_value_(params, clip_value=1e-4)


def _clip_by_total_norm(params):                        # accelerate's way (get_total_norm + clip_grads_with_norm_)
    grads = [p.grad for p in params]
    torch.nn.utils.clip_grads_with_norm_(params, 1e-3, torch.nn.utils.get_total_norm(grads))


@pytest.mark.parametrize("clip", [_clip_by_norm, _clip_by_value, _clip_by_total_norm], ids=["norm", "value", "total"])
def test_a_clip_after_an_unprofiled_pass_of_a_replaced_model_is_counted(clip):
    """``model.double()`` under ``set_overwrite_module_params_on_conversion`` (new tensors, a new
    optimizer for them) on a pass that is not profiled: the monitor follows at the clipping call
    at the latest, so the calls between that pass's backward and its step are of parameters it
    knows, whichever clipping path. Oracle: the L2 norm of the gradients before each call,
    computed in float64 from ``p.grad``."""
    flag = torch.__future__.get_overwrite_module_params_on_conversion()
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        model = relu_mlp()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        with GradientMonitor(model, activations_every=10) as monitor:
            for _ in range(2):
                sgd_step(model, optimizer)
            model.double()
            optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
            norms = []
            for _ in range(3):
                optimizer.zero_grad()
                model(torch.randn(8, 3, dtype=torch.float64)).square().mean().backward()
                params = list(model.parameters())
                norms.append(torch.cat([p.grad.double().flatten() for p in params]).norm().item())
                clip(params)
                optimizer.step()
            monitor.log(0)
        overall = monitor.history[-1].overall
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(flag)
    assert overall["steps"] == 5 and overall["clip_calls"] == 3 and overall["clipped_steps"] == 3
    assert overall["total_norm_before_clip"] == pytest.approx(sum(norms) / 3, rel=1e-6)


def test_another_model_s_clip_does_not_follow_this_monitor():
    """A clipping call is told to every monitor in the process: one over another model's
    parameters leaves this monitor's binding alone (it follows its own model at its own model's
    calls and steps, never from another thread's training), while one over this model's new
    tensors follows it. Oracle: the tensors the monitor is bound to."""
    flag = torch.__future__.get_overwrite_module_params_on_conversion()
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        mine, other = relu_mlp(), relu_mlp()
        with GradientMonitor(mine, activations_every=10) as monitor:
            sgd_step(mine, torch.optim.SGD(mine.parameters(), lr=0.1))
            bound = monitor._setup.params[0]
            mine.double()                                     # new tensors, not followed yet
            other(torch.randn(8, 3)).square().mean().backward()
            torch.nn.utils.clip_grad_norm_(other.parameters(), 1.0)
            assert monitor._setup.params[0] is bound
            mine(torch.randn(8, 3, dtype=torch.float64)).square().mean().backward()
            torch.nn.utils.clip_grad_norm_(list(mine.parameters())[2:], 1.0)   # the head only
            assert monitor._setup.params[0] is mine[0].weight
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(flag)


def test_a_second_optimizer_joining_later_has_its_iterations_counted_by_the_passes():
    """A head's optimizer joins at iteration 3, stepping right after the body's with grad-mode work
    between (no pass of the model): from its first step on every pass is counted, and each later
    iteration counts once (the step that joined is read from autograd, which takes that work for
    a pass: one count too many there, said in ``Schedule``'s docstring). Oracle: the loop's own
    count of iterations."""
    model = relu_mlp()
    body, head = (torch.optim.SGD(model[i].parameters(), lr=0.05) for i in (0, 2))
    with GradientMonitor(model, activations_every=10) as monitor:
        schedule = monitor._setup.schedule
        counted = []
        for i in range(12):
            model(torch.randn(8, 3)).square().mean().backward()
            body.step()
            if i >= 3:
                model[0].weight.norm()                 # autograd nodes, no pass of the model
                head.step()
            body.zero_grad()
            head.zero_grad()
            counted.append(schedule.seen)
    assert counted[:3] == [1, 2, 3] and counted[3] in (4, 5)
    assert [b - a for a, b in zip(counted[3:], counted[4:])] == [1] * 8


class _Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(3, 4, batch_first=True)
        self.head = nn.Linear(4, 1)

    def forward(self, x):
        return self.head(self.lstm(x)[0][:, -1])


@pytest.mark.parametrize("kind", ["nonfinite", "recurrent"])
def test_hooks_that_take_every_pass_s_tensors_keep_every_pass_watched(kind):
    """Non-finite hooks (nonfinite=True) and through-time hooks (recurrent layers) take tensors
    at every pass: there the root hook stays on at every pass, and a model converted to new
    tensors (the overwrite flag) is followed at the start of an unprofiled pass, before those
    hooks see it. Oracle: the root's hook dict and the tensors the monitor is bound to."""
    flag = torch.__future__.get_overwrite_module_params_on_conversion()
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        torch.manual_seed(0)
        model = relu_mlp() if kind == "nonfinite" else _Recurrent()
        shape = (8, 3) if kind == "nonfinite" else (8, 5, 3)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        with GradientMonitor(model, activations_every=10, nonfinite=kind == "nonfinite") as monitor:
            for _ in range(3):
                optimizer.zero_grad()
                model(torch.randn(*shape)).square().mean().backward()
                optimizer.step()
                # the schedule's root hook stays on (nonfinite adds its keyword-input pre-hook beside it)
                assert [type(h).__name__ for h in model._forward_pre_hooks.values()].count("ForwardStarts") == 1
            model.double()
            first = next(model.parameters())
            out = model(torch.randn(*shape, dtype=torch.float64))         # an unprofiled pass
            assert monitor._setup.params[0] is first
            out.square().mean().backward()
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(flag)


def _profiled_by_the_rule(events: list, every: int) -> list[list[torch.Tensor]]:
    """The documented schedule, run over the loop's events: per window, the outputs of the passes
    it profiles: the first training pass, then the one after every ``every``-th counted step; a
    step counts unless no training forward pass came since the last counted one (and every step
    counts where no training pass was ever seen)."""
    windows: list[list[torch.Tensor]] = [[]]
    active, seen, since, ever = True, 0, False, False
    for kind, output in events:
        if kind == "pass":
            if active:
                windows[-1].append(output)
            since = ever = True
        elif kind == "step" and (since or not ever):
            seen += 1
            active, since = seen % every == 0, False
        elif kind == "log":
            windows.append([])
    return windows


def assert_profiled_by_the_rule(events: list, history, every: int, tap: str) -> None:
    """Each window's activation mean and std of ``tap`` are those of the outputs of exactly the
    passes the rule profiles (``_profiled_by_the_rule``; float64 from the captured outputs), and a
    window with none of them has no row for it."""
    expected = _profiled_by_the_rule(events, every)
    assert len(history) == len(expected)
    for window, outputs in zip(history, expected):
        if not outputs:
            assert tap not in window.activations
            continue
        values = torch.cat([o.double().flatten() for o in outputs])
        row = window.activations[tap]
        assert row["mean"] == pytest.approx(values.mean().item(), rel=1e-6, abs=1e-9)
        assert row["std"] == pytest.approx(values.std(unbiased=False).item(), rel=1e-6)


def _run_loop(loop: str, every: int, iterations: int = 9):
    """One of several training loops on Linear, Tanh, Linear; returns the loop's events (each
    training pass with the Tanh output the test captured, each step the monitor records, each
    log()) and the monitor's windows."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 1))
    events: list = []
    captured: list[torch.Tensor] = []
    model[1].register_forward_hook(lambda module, inputs, output: captured.append(output.detach().clone()))
    everything = torch.optim.SGD(model.parameters(), lr=0.05)
    body, head = (torch.optim.SGD(model[i].parameters(), lr=0.05) for i in (0, 2))

    def training_pass():
        captured.clear()
        out = model(torch.randn(8, 3)).square().mean()
        events.append(("pass", captured[0]))
        out.backward()

    def step(optimizer):
        optimizer.step()
        events.append(("step", None))
        optimizer.zero_grad()

    if loop == "per-parameter optimizers inside backward":
        per_parameter = {p: torch.optim.SGD([p], lr=0.05) for p in model.parameters()}
        for p in model.parameters():
            p.register_post_accumulate_grad_hook(lambda p: step(per_parameter[p]))
    monitor = GradientMonitor(model, activations_every=every, automatic=loop != "record() by hand")
    with monitor:
        for i in range(iterations):
            if loop in ("one optimizer", "eval passes under no_grad", "log every 4 iterations"):
                training_pass()
                step(everything)
            elif loop == "gradient accumulation":
                for _ in range(3):
                    training_pass()
                step(everything)
            elif loop == "two optimizers back to back":
                training_pass()
                step(body)
                step(head)
            elif loop == "grad-mode work between two optimizers' steps":
                training_pass()
                step(body)
                model[0].weight.norm()                     # no pass of the model, but autograd nodes
                step(head)
            elif loop == "a pass before each optimizer's step":
                training_pass()
                step(body)
                training_pass()
                step(head)
            elif loop == "per-parameter optimizers inside backward":
                training_pass()
            elif loop == "record() by hand":
                training_pass()
                monitor.record()
                events.append(("step", None))
                everything.step()
                everything.zero_grad()
            if loop == "eval passes under no_grad":
                with torch.no_grad():
                    model(torch.randn(8, 3))
            if loop == "log every 4 iterations" and i % 4 == 3:
                monitor.log(i)
                events.append(("log", None))
        monitor.log(iterations)
    return events, monitor.history


LOOPS = ["one optimizer", "gradient accumulation", "two optimizers back to back",
         "grad-mode work between two optimizers' steps", "a pass before each optimizer's step",
         "per-parameter optimizers inside backward", "eval passes under no_grad", "record() by hand",
         "log every 4 iterations"]


@pytest.mark.parametrize("every", [2, 3])
@pytest.mark.parametrize("loop", LOOPS)
def test_the_profiled_passes_are_the_rule_s_in_every_loop(loop, every):
    """Whether the monitor watches a pass's start or not, the passes it profiles are those of the
    documented rule: each window's activation mean and std are those of the outputs of exactly
    those passes (float64 from the captured outputs)."""
    events, history = _run_loop(loop, every)
    assert_profiled_by_the_rule(events, history, every, "1")
