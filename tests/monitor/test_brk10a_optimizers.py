"""Break tests of the recording core on optimizers, AMP and wrappers (helper brk10a), cases not
covered elsewhere. The oracle is always the gradient the step applies: ``p.grad`` read inside
the optimizer's own step function (below torch's hook wrapper, so after every step pre-hook),
divided by ``grad_scale`` where a fused optimizer gets the GradScaler's scale, and left out
where the step was skipped (``found_inf``)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn
from wrapped_optimizers import Lookahead

from gradflow import GradientMonitor


def _centralize(optimizer) -> None:
    """Gradient centralization (Yong et al. 2020): each matrix gradient minus its row means, in
    place; the first parameter's norm after it kept in ``optimizer.applied`` (the oracle)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is not None and p.grad.dim() > 1:
                p.grad.sub_(p.grad.mean(dim=1, keepdim=True))
    optimizer.applied.append(optimizer.param_groups[0]["params"][0].grad.double().norm().item())


class Applied:
    """Per parameter name, the statistics of each gradient an optimizer step applied (see the
    module docstring), taken by patching the optimizers' classes' step function."""

    def __init__(self, model: nn.Module, *optimizers: torch.optim.Optimizer) -> None:
        self.model = model                # its parameters as they are at each step (a replaced one's too)
        self.rows: dict[str, list[tuple[float, float, float]]] = {name: [] for name, _ in model.named_parameters()}
        self._patched = []
        for cls in {type(o) for o in optimizers}:
            below = getattr(cls.step, "__wrapped__", cls.step)

            def step(opt, *args, _below=below, **kwargs):
                if any(opt is o for o in optimizers):
                    self._capture(opt)
                return _below(opt, *args, **kwargs)

            self._patched.append((cls, cls.__dict__.get("step")))
            cls.step = torch.optim.Optimizer.profile_hook_step(step)

    def _capture(self, optimizer: torch.optim.Optimizer) -> None:
        scale, found = getattr(optimizer, "grad_scale", None), getattr(optimizer, "found_inf", None)
        if found is not None and float(found):
            return
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        for name, p in self.model.named_parameters():
            if p.grad is not None and id(p) in held:
                g = p.grad.double() if scale is None else p.grad.double() / scale.double()
                self.rows[name].append((g.mean().item(), g.norm().item(), g.abs().max().item()))

    def close(self) -> None:
        for cls, step in self._patched:
            if step is None:
                del cls.step            # inherited (AdamW's step is Adam's)
            else:
                cls.step = step

    def __enter__(self) -> Applied:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def check(self, logged: dict[str, dict[str, float]]) -> None:
        """The monitor's rows are the applied steps' means, and only parameters with one."""
        assert set(logged) == {name for name, rows in self.rows.items() if rows}
        for name, row in logged.items():
            applied = self.rows[name]
            assert row["steps"] == len(applied), name
            for i, key in enumerate(("mean", "norm", "max_abs")):
                expected = sum(r[i] for r in applied) / len(applied)
                assert math.isclose(row[key], expected, rel_tol=1e-5, abs_tol=1e-9), (name, key, row[key], expected)


def _batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, 4, generator=g), torch.randn(16, 1, generator=g)


def _train(model: nn.Module, optimizer, steps: int) -> None:
    """``steps`` plain steps on ``_batch(0)``, ``_batch(1)``, ...: zero_grad, MSE, backward, step."""
    for i in range(steps):
        optimizer.zero_grad()
        x, y = _batch(i)
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()


def _fused(cls, params, **kwargs):
    try:
        return cls(params, lr=1e-3, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError) as error:
        pytest.skip(f"no fused {cls.__name__} here: {error}")


@pytest.mark.parametrize("cls", [torch.optim.Adam, torch.optim.SGD, torch.optim.Adagrad])
def test_a_fused_optimizer_whose_parameters_got_no_gradient_under_a_scaler_steps(cls):
    """Two task heads, a fused optimizer each, one GradScaler; a batch of the first task leaves
    the second head without a gradient. GradScaler then hands that optimizer ``found_inf = 0``,
    a Python int (the sum of an empty list), and its step must run as torch runs it, with the
    first head's figures those applied."""
    torch.manual_seed(0)
    model = nn.ModuleDict({"body": nn.Linear(4, 8), "a": nn.Linear(8, 1), "b": nn.Linear(8, 1)})
    first = _fused(cls, [*model["body"].parameters(), *model["a"].parameters()])
    second = _fused(cls, model["b"].parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    with Applied(model, first, second) as applied, GradientMonitor(model, activations=False) as monitor:
        for i in range(3):
            first.zero_grad()
            second.zero_grad()
            x, y = _batch(i)
            scaler.scale(nn.functional.mse_loss(model["a"](torch.tanh(model["body"](x))), y)).backward()
            scaler.step(first)
            scaler.step(second)
            scaler.update()
        rows = monitor.log(0)
    applied.check(rows)
    assert set(rows) == {"body.weight", "body.bias", "a.weight", "a.bias"}


@pytest.mark.parametrize("edit", ["replaced-parameter-put-in-its-place", "slice-assigned-same-length"])
def test_a_parameter_list_edited_in_place_is_followed_at_the_next_step(edit):
    """The optimizer's ``group["params"]`` edited in place, its length kept: a re-initialised
    weight put where the old one was (``group["params"][0] = model[0].weight``), or the list's
    contents replaced by as many other parameters (``[:] = ...``). Each later step records the
    parameters the optimizer holds now (before: the monitor's cache of which parameters an
    optimizer holds went by the list's identity and length, so it kept recording the old ones,
    a replaced weight's stale gradient included)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    if edit == "replaced-parameter-put-in-its-place":
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    else:
        optimizer = torch.optim.SGD([model[0].weight, model[2].weight], lr=0.01)
    with Applied(model, optimizer) as applied, GradientMonitor(model, activations=False) as monitor:
        for i in range(4):
            if i == 2 and edit == "replaced-parameter-put-in-its-place":
                model[0].weight = nn.Parameter(model[0].weight.detach() * 3.0)
                optimizer.param_groups[0]["params"][0] = model[0].weight
            elif i == 2:
                optimizer.param_groups[0]["params"][:] = [model[0].bias, model[2].bias]
            model.zero_grad()
            x, y = _batch(i)
            nn.functional.mse_loss(model(x), y).backward()
            optimizer.step()
        rows = monitor.log(0)
    applied.check(rows)


def test_parameters_whose_every_step_the_scaler_skipped_are_not_said_unstepped():
    """Two optimizers, one GradScaler; the head's gradients overflow at every step of the window,
    the body's never (a head whose loss term blows up). The head's optimizer stepped and the
    scaler skipped it: its parameters are in the window's ``skipped_nonfinite`` and its overall
    ``skipped_steps``, not in a warning that no monitored optimizer stepped them (before: that
    warning, a wrong cause). The body's rows are the applied gradients'."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    body = torch.optim.Adam(model[0].parameters(), lr=1e-3)
    head = torch.optim.Adam(model[2].parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    with Applied(model, body, head) as applied, GradientMonitor(model, activations=False) as monitor:
        for i in range(3):
            body.zero_grad()
            head.zero_grad()
            x, y = _batch(i)
            scaler.scale(nn.functional.mse_loss(model(x), y)).backward()
            model[2].weight.grad[0, 0] = float("nan")
            scaler.step(body)
            scaler.step(head)
            scaler.update()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            rows = monitor.log(0)
    applied.check(rows)
    window = monitor.history[-1]
    assert set(rows) == {"0.weight", "0.bias"} and window.overall["skipped_steps"] == 3
    assert window.skipped_nonfinite == {"2.weight": 3, "2.bias": 0}


class _CentralizedAdam(torch.optim.Adam):
    """An Adam subclass whose own step changes ``.grad`` (gradient centralization, Yong et al.
    2020), then calls Adam's step: the gradient that step applies is the centralized one, taken
    here as the oracle (``applied``)."""

    def __init__(self, params, **kwargs):
        super().__init__(params, **kwargs)
        self.applied: list[float] = []

    @torch.no_grad()
    def step(self, closure=None):
        _centralize(self)
        return super().step(closure)


@pytest.mark.parametrize("wrapped", [False, True])
def test_a_subclass_step_calling_its_hooked_parents_step_is_one_step_with_the_applied_gradient(wrapped):
    """Once any plain Adam was made in the process, torch hooks ``Adam.step`` too, so the
    subclass's ``super().step()`` runs the optimizer's step pre-hooks a second time, inside the
    step. One training step, recorded where Adam's step begins, after the change (before: 6 steps
    in 3, each counted before and after centralizing; inside a Lookahead, 3 steps but the
    gradients before centralizing, with a warning blaming a pre-hook)."""
    torch.optim.Adam([nn.Parameter(torch.zeros(1))])       # Adam.step gets torch's hook wrapper
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    optimizer = _CentralizedAdam(model.parameters(), lr=1e-3)
    stepped = Lookahead(optimizer) if wrapped else optimizer
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _train_centralized(model, stepped, optimizer)


def _train_centralized(model, stepped, optimizer):
    with GradientMonitor(model, activations=False) as monitor:
        for i in range(3):
            optimizer.zero_grad()
            x, y = _batch(i)
            nn.functional.mse_loss(model(x), y).backward()
            stepped.step()
        rows = monitor.log(0)
    assert monitor.history[-1].overall["steps"] == 3 and rows["0.weight"]["steps"] == 3
    assert rows["0.weight"]["mean"] == pytest.approx(0.0, abs=1e-9)        # centralized rows: mean 0
    assert rows["0.weight"]["norm"] == pytest.approx(sum(optimizer.applied) / 3, rel=1e-6)


class _PlainSGD(torch.optim.Optimizer):
    """Plain SGD, never made by itself here: torch never hooks its step."""

    def __init__(self, params, lr=1e-3):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-group["lr"])


class _CenteredSGD(_PlainSGD):
    def __init__(self, params, center: bool):
        super().__init__(params)
        self.center = center

    @torch.no_grad()
    def step(self, closure=None):
        if self.center:
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None and p.grad.dim() > 1:
                        p.grad.sub_(p.grad.mean(dim=1, keepdim=True))
        return super().step(closure)


@pytest.mark.parametrize("center", [True, False])
def test_a_subclass_step_over_an_unhooked_parents_step_that_changes_the_gradient_is_said(center):
    """Where torch did not hook the parent's step, nothing marks where it begins: the monitor
    records as the subclass's step begins. A change that step makes to ``.grad`` is then said in
    a warning (it was silent); a subclass that changes nothing is not."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    optimizer = _CenteredSGD(model.parameters(), center)
    with warnings.catch_warnings(record=True) as said, GradientMonitor(model, activations=False) as monitor:
        warnings.simplefilter("always")
        _train(model, optimizer, 3)
        rows = monitor.log(0)
    assert rows["0.weight"]["steps"] == 3
    messages = [str(w.message) for w in said if "changed the gradients during the step" in str(w.message)]
    assert len(messages) == (1 if center else 0), [str(w.message) for w in said]


_FOREACH = ["SGD", "Adam", "AdamW", "Adagrad", "RMSprop", "Adamax", "NAdam", "RAdam", "ASGD", "Rprop", "Adadelta"]


@pytest.mark.parametrize("name", _FOREACH)
def test_every_foreach_optimizer_under_a_scaler_that_grows_and_backs_off(name):
    """Each torch.optim optimizer with a foreach variant, float16 autocast, a GradScaler that
    grows its scale after every applied step and halves it on the overflow in each of two
    windows: per window the applied steps' unscaled gradients, the overflow counted as skipped."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    optimizer = getattr(torch.optim, name)(model.parameters(), lr=1e-3, foreach=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=1)
    scales = []
    with GradientMonitor(model, activations=False) as monitor:
        for window in range(2):
            with Applied(model, optimizer) as applied:
                for i in range(3):
                    optimizer.zero_grad()
                    x, y = _batch(10 * window + i)
                    with torch.autocast("cpu", dtype=torch.float16):
                        loss = nn.functional.mse_loss(model(x).float(), y)
                    scaler.scale(loss).backward()
                    if i == window:
                        model[0].weight.grad[1, 1] = float("inf")
                    scaler.step(optimizer)
                    scaler.update()
                    scales.append(scaler.get_scale())
            rows = monitor.log(window)
            applied.check(rows)
            assert {row["skipped_steps"] for row in rows.values()} == {1}
            assert monitor.history[-1].overall["skipped_steps"] == 1
    assert scales == [512.0, 1024.0, 2048.0, 4096.0, 2048.0, 4096.0]


class _CenteringWrapper(torch.optim.Optimizer):
    """A wrapper whose inner SGD has param groups of its own (made from the parameters, not from
    the wrapper's groups); its step centralizes each matrix's gradient rows, then steps the
    inner optimizer, whose gradient is the applied one (``applied``)."""

    def __init__(self, params):
        params = list(params)
        super().__init__(params, {})
        self.inner = torch.optim.SGD(params, lr=0.01)
        self.applied: list[float] = []

    @torch.no_grad()
    def step(self, closure=None):
        _centralize(self)
        return self.inner.step(closure)


@pytest.mark.parametrize("chosen", [False, True])
def test_a_chosen_wrapper_whose_inner_optimizer_has_its_own_groups_records_the_inner_step(chosen):
    """``GradientMonitor(model, optimizer=wrapper)``: the inner optimizer the wrapper holds is
    part of its step even where they share no param group, so its step records, after the
    wrapper's change, as without ``optimizer=`` (before: the wrapper's step recorded the
    gradient before centralizing, silently)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    optimizer = _CenteringWrapper(model.parameters())
    with GradientMonitor(model, activations=False, optimizer=optimizer if chosen else None) as monitor:
        _train(model, optimizer, 3)
        rows = monitor.log(0)
    assert rows["0.weight"]["steps"] == 3
    assert rows["0.weight"]["mean"] == pytest.approx(0.0, abs=1e-9)
    assert rows["0.weight"]["norm"] == pytest.approx(sum(optimizer.applied) / 3, rel=1e-6)


def _zero_amp_rank(rank: int, world: int, path: str, results) -> None:
    """One rank: DDP-free ZeroRedundancyOptimizer(fused Adam) under a GradScaler, the user's
    ``unscale_`` and clipping, an overflow at step 2 on every rank; the rows and the oracle."""
    import torch.distributed as dist
    from torch.distributed.optim import ZeroRedundancyOptimizer

    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))
        optimizer = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.Adam, lr=0.01,
                                            fused=True)
        scaler = torch.amp.GradScaler("cpu", init_scale=64.0)
        with Applied(model, optimizer) as applied, GradientMonitor(model, activations=False) as monitor:
            for i in range(4):
                optimizer.zero_grad()
                x, y = _batch(i)
                scaler.scale(nn.functional.mse_loss(model(x), y)).backward()
                if i == 2:
                    model[4].weight.grad[0, 0] = float("inf")
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
                scaler.step(optimizer)
                scaler.update()
            rows = monitor.log(0)
        results.put((rank, rows, applied.rows, monitor.history[-1].overall))
    except Exception as error:            # the parent's assertion shows it
        results.put((rank, repr(error), None, None))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_zero_redundancy_optimizer_on_two_ranks_under_a_scaler_skips_the_overflow_once():
    """Each rank's inner fused Adam holds its shard; the wrapper's step records every parameter
    (unscaled by ``unscale_``), the overflow step is one skipped step on each rank."""
    import os
    import tempfile

    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    path = os.path.join(tempfile.mkdtemp(), "store")
    context = mp.get_context("spawn")
    results = context.Queue()
    procs = [context.Process(target=_zero_amp_rank, args=(rank, 2, path, results)) for rank in range(2)]
    for proc in procs:
        proc.start()
    try:
        got = {rank: rest for rank, *rest in (results.get(timeout=120) for _ in procs)}
    finally:
        for proc in procs:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
    for rank in (0, 1):
        rows, applied_rows, overall = got[rank]
        assert isinstance(rows, dict), rows
        oracle = Applied.__new__(Applied)
        oracle.rows = applied_rows
        oracle.check(rows)
        assert (overall["steps"], overall["skipped_steps"], overall["clip_calls"]) == (3, 1, 3)   # the skipped step's clip left out


class _OlderContract(torch.optim.Optimizer):
    """An optimizer on GradScaler's older contract (``_step_supports_amp_scaling`` and a
    ``grad_scaler`` argument of ``step``: GradScaler hands itself over and the optimizer checks for
    inf/NaN and unscales itself). ``applied``: the unscaled gradient norm of each applied step."""

    def __init__(self, params):
        super().__init__(params, {"lr": 0.01})
        self._step_supports_amp_scaling = True
        self.applied: list[float] = []

    @torch.no_grad()
    def step(self, closure=None, grad_scaler=None):
        from torch.amp.grad_scaler import OptState

        scale = None
        if grad_scaler is not None:
            state = grad_scaler._per_optimizer_states[id(self)]
            unscaled = state["stage"] is OptState.UNSCALED
            found = state["found_inf_per_device"] if unscaled else grad_scaler._check_inf_per_device(self)
            if sum(v.item() for v in found.values()):
                return None
            scale = None if unscaled else grad_scaler._scale.double()
        weight = self.param_groups[0]["params"][0]
        self.applied.append((weight.grad.double() if scale is None else weight.grad.double() / scale).norm().item())
        for group in self.param_groups:
            for p in group["params"]:
                p.sub_(p.grad if scale is None else p.grad / scale, alpha=group["lr"])


@pytest.mark.parametrize("unscale_first", [False, True])
def test_an_optimizer_on_the_scalers_older_contract_skips_the_overflow_once(unscale_first):
    """GradScaler hands such an optimizer itself, not ``found_inf``: where the user did not call
    ``unscale_``, no inf check ran before the step, and the overflow step was recorded (its inf
    averaged in: mean inf) and also counted skipped (4 steps in 4); after ``unscale_`` the
    gradients are unscaled already and must not be divided by the scale again."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    optimizer = _OlderContract(model.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=64.0)
    with warnings.catch_warnings(), GradientMonitor(model, activations=False) as monitor:
        warnings.simplefilter("ignore", FutureWarning)      # GradScaler's word on the older contract
        for i in range(4):
            optimizer.zero_grad()
            x, y = _batch(i)
            scaler.scale(nn.functional.mse_loss(model(x), y)).backward()
            if i == 1:
                model[0].weight.grad[0, 0] = float("inf")
            if unscale_first:
                scaler.unscale_(optimizer)
            scaler.step(optimizer)
            scaler.update()
        rows = monitor.log(0)
    row = rows["0.weight"]
    assert (row["steps"], row["skipped_steps"], row["nonfinite"]) == (3, 1, 0)
    assert row["norm"] == pytest.approx(sum(optimizer.applied) / 3, rel=1e-6)


class _ExtraGradient(torch.optim.Optimizer):
    """Extra-gradient (Korpelevich 1976) over an inner SGD: a step to the extrapolated point with
    the gradient there is, the closure's gradient at that point, the weights put back, and the
    update with the second gradient; ``applied`` holds both norms of each step."""

    def __init__(self, params):
        super().__init__(list(params), {})
        self.inner = torch.optim.SGD(self.param_groups, lr=0.01)
        self.applied: list[tuple[float, float]] = []

    def step(self, closure):
        params = [p for group in self.param_groups for p in group["params"]]
        start = [p.detach().clone() for p in params]
        first = params[0].grad.double().norm().item()
        self.inner.step()
        closure()
        with torch.no_grad():
            for p, was in zip(params, start):
                p.copy_(was)
        self.applied.append((first, params[0].grad.double().norm().item()))
        self.inner.step()


def test_a_wrapper_that_steps_its_inner_optimizer_twice_counts_one_step_and_says_which():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    optimizer = _ExtraGradient(model.parameters())
    with GradientMonitor(model, activations=False) as monitor:
        with pytest.warns(UserWarning, match="steps its inner optimizer twice"):
            for i in range(3):
                def closure(i=i):
                    optimizer.zero_grad()
                    x, y = _batch(i)
                    nn.functional.mse_loss(model(x), y).backward()

                closure()
                optimizer.step(closure)
        rows = monitor.log(0)
    assert rows["0.weight"]["steps"] == 3
    assert rows["0.weight"]["norm"] == pytest.approx(sum(first for first, _ in optimizer.applied) / 3, rel=1e-6)


def test_a_torch_optimizer_that_inherits_its_step_is_no_subclass_step():
    """torch's hook wraps the step AdamW inherits from Adam into AdamW's own dict when the first
    AdamW is made: that is not a step of its own, so AdamW is not deferred to Adam's step (it was
    read as a subclass over Adam: its gradients' marks taken at every step, and, once a plain Adam
    was made, its record deferred to a post-hook after the update). A real override still is."""
    from gradflow.monitor import steps
    model = nn.Linear(2, 2)
    torch.optim.AdamW(model.parameters())
    torch.optim.Adam(model.parameters())

    class Overriding(torch.optim.Adam):
        def step(self, closure=None):
            return super().step(closure)

    Overriding(model.parameters())
    assert steps._parent_steps(torch.optim.AdamW) == () and not steps._reenters(torch.optim.AdamW)
    assert steps._parent_steps(Overriding) == (torch.optim.Adam,) and steps._reenters(Overriding)
