"""What the monitor did not record is said, and every kind and range of parameter is followed:
hand-written and torch.func training, idle parameters, float64 subnormals, complex parameters,
conversions after attaching, parametrized weights. Oracles: statistics taken from p.grad."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations

from gradflow.monitor import GradientMonitor


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))


def _loss(model, x=None):
    x = torch.randn(8, 3) if x is None else x
    return model(x).square().mean()


def _caught(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn()
    return out, [str(w.message) for w in caught]


def test_hand_written_update_is_said():
    model = _model()
    with GradientMonitor(model, activations=False) as monitor:
        for _ in range(3):
            _loss(model).backward()
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.1 * p.grad
                    p.grad = None
        rows, messages = _caught(lambda: monitor.log(0))
    assert rows == {}
    assert len([m for m in messages if "hand-written update" in m and "record()" in m]) == 1, messages



@pytest.mark.parametrize("with_step", [True, False])
def test_log_after_remove_says_the_monitor_was_removed(with_step):
    """A window after remove() is empty because the monitor was removed, not because of a
    hand-written update: the warning says so, whether or not the loop went on stepping."""
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = GradientMonitor(model, activations=False)
    _loss(model).backward()
    optimizer.step()
    assert monitor.log(0)                                # recorded while attached
    monitor.remove()
    optimizer.zero_grad()
    _loss(model).backward()
    if with_step:
        optimizer.step()
    rows, messages = _caught(lambda: monitor.log(1))
    assert rows == {}
    assert [m for m in messages if "after remove()" in m and "new GradientMonitor" in m], messages
    assert not [m for m in messages if "hand-written update" in m], messages


class _NotTorchOptim:
    """An optimizer that is not a torch.optim.Optimizer (as some libraries' own)."""

    def __init__(self, params, lr):
        self.params, self.lr = list(params), lr

    @torch.no_grad()
    def step(self):
        for p in self.params:
            p.add_(p.grad, alpha=-self.lr)

    def zero_grad(self):
        for p in self.params:
            p.grad = None


def test_optimizer_that_is_not_torch_optim_is_said():
    model = _model(1)
    optimizer = _NotTorchOptim(model.parameters(), 0.1)
    with GradientMonitor(model, activations=False) as monitor:
        for _ in range(2):
            optimizer.zero_grad()
            _loss(model).backward()
            optimizer.step()
        rows, messages = _caught(lambda: monitor.log(0))
    assert rows == {}
    assert len([m for m in messages if "not a torch.optim.Optimizer" in m]) == 1, messages


def test_torch_func_training_is_said():
    from torch.func import functional_call, grad
    model = _model(2)
    params = {k: v.detach() for k, v in model.named_parameters()}
    x = torch.randn(8, 3)

    def loss(p):
        return functional_call(model, p, (x,)).square().mean()

    with GradientMonitor(model, activations=False) as monitor:
        for _ in range(3):
            with torch.enable_grad():
                g = grad(loss)(params)
            params = {k: v - 0.1 * g[k] for k, v in params.items()}
        rows, messages = _caught(lambda: monitor.log(0))
    assert rows == {}
    assert len([m for m in messages if "torch.func" in m]) == 1, messages


def test_a_wholly_frozen_model_is_said_as_frozen_not_as_torch_func():
    """Every monitored parameter frozen, a head outside the model trained: the warning names
    the frozen parameters, once, and not torch.func (a newcomer's try, before)."""
    model, head = _model(3), nn.Linear(1, 1)
    model.requires_grad_(False)
    optimizer = torch.optim.SGD(head.parameters(), lr=0.1)
    with GradientMonitor(model, activations=False) as monitor:
        for _ in range(3):
            optimizer.zero_grad()
            head(model(torch.randn(8, 3))).square().mean().backward()
            optimizer.step()
        rows, messages = _caught(lambda: monitor.log(0))
    assert rows == {}
    said = [m for m in messages if "log(): 3 training forward passes ran" in m]
    assert len(said) == 1 and "every monitored parameter is frozen" in said[0] and "torch.func" not in said[0], messages


def test_idle_parameter_is_listed_not_silently_absent():
    """An expert the router never picks in a window: its optimizer steps, it gets no gradient;
    it is named in Window.idle (and counted in grad/idle_parameters), the others are recorded."""
    torch.manual_seed(3)
    experts = nn.ModuleList([nn.Linear(3, 1), nn.Linear(3, 1)])
    optimizer = torch.optim.SGD(experts.parameters(), lr=0.1)
    with GradientMonitor(experts, activations=False) as monitor:
        for _ in range(2):
            optimizer.zero_grad()
            experts[0](torch.randn(4, 3)).sum().backward()
            optimizer.step()
        rows = monitor.log(0)
        window = monitor.history[-1]
        assert sorted(rows) == ["0.bias", "0.weight"]
        assert window.idle == ["1.weight", "1.bias"]
        experts[1](torch.randn(4, 3)).sum().backward()          # the next window uses it
        optimizer.step()
        monitor.log(1)
        assert monitor.history[-1].idle == []


def test_idle_parameters_are_named_in_the_tensorboard_text(tmp_path):
    """The idle parameters' names reach TensorBoard's Text tab (read back from the event file):
    in each window that has any, and once more when none is idle again; a window with none
    after one with none writes no text. The scalar grad/idle_parameters counts them in every window."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    torch.manual_seed(3)
    experts = nn.ModuleList([nn.Linear(3, 1), nn.Linear(3, 1)])
    optimizer = torch.optim.SGD(experts.parameters(), lr=0.1)
    used = [[0], [0, 1], [0, 1], [0], [0]]          # window by window: the experts the router picks
    with SummaryWriter(tmp_path) as writer, GradientMonitor(experts, writer, activations=False) as monitor:
        for window, picked in enumerate(used):
            for _ in range(2):
                optimizer.zero_grad()
                sum(experts[i](torch.randn(4, 3)).sum() for i in picked).backward()
                optimizer.step()
            monitor.log(window)
    events = EventAccumulator(str(tmp_path), size_guidance={"tensors": 0, "scalars": 0}).Reload()
    texts = {e.step: e.tensor_proto.string_val[0].decode() for e in events.Tensors("grad/idle_parameters/text_summary")}
    assert sorted(texts) == [0, 1, 3, 4]
    for step in (0, 3, 4):
        assert texts[step] == ("2 parameters got no gradient in any of the window's 2 steps although an optimizer "
                               "that stepped holds them: `1.weight`, `1.bias`")
    assert texts[1].startswith("none: every parameter")
    assert [e.value for e in events.Scalars("grad/idle_parameters")] == [2.0, 0.0, 0.0, 2.0, 2.0]


@pytest.mark.parametrize("scale", [1e-51, 1e-310, 1e200])
def test_float64_gradients_keep_their_range(scale):
    """float64 gradients far below (or above) float32's range: zero_fraction counts only exact
    zeros, and the moments match the oracle."""
    torch.manual_seed(4)
    weight = nn.Parameter(torch.zeros(64, dtype=torch.float64))
    holder = nn.Module()
    holder.weight = weight
    optimizer = torch.optim.SGD([weight], lr=0.0)
    values = torch.randn(64, dtype=torch.float64) * scale
    values[:8] = 0.0
    with GradientMonitor(holder, activations=False) as monitor:
        weight.grad = values.clone()
        optimizer.step()
        row = monitor.log(0)["weight"]
    assert row["zero_fraction"] == pytest.approx(8 / 64)
    assert row["mean_abs"] == pytest.approx(values.abs().mean().item(), rel=1e-9)
    assert row["norm"] == pytest.approx(torch.linalg.vector_norm(values / scale).item() * scale, rel=1e-9)
    assert row["max_abs"] == pytest.approx(values.abs().max().item(), rel=1e-12)


def test_complex_parameters_are_named_in_a_warning():
    model = _model(5)
    model.register_parameter("phase", nn.Parameter(torch.randn(3, dtype=torch.complex64)))
    _, messages = _caught(lambda: GradientMonitor(model).remove())
    assert any("complex parameters are not recorded: phase" in m for m in messages), messages


@pytest.mark.parametrize("overwrite", [False, True], ids=["in-place", "overwrite-params"])
def test_double_after_attach_is_followed(overwrite):
    """model.double() after attaching (also with overwrite_module_params_on_conversion): the
    monitor follows the float64 parameters instead of raising inside training."""
    model = _model(6)
    x = torch.randn(8, 3)
    norms = []
    previous = torch.__future__.get_overwrite_module_params_on_conversion()
    torch.__future__.set_overwrite_module_params_on_conversion(overwrite)
    try:
        with GradientMonitor(model, activations=False) as monitor:
            optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
            for _ in range(2):
                optimizer.zero_grad()
                _loss(model, x).backward()
                norms.append(model[0].weight.grad.double().norm().item())
                optimizer.step()
            model.double()
            optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
            for _ in range(2):
                optimizer.zero_grad()
                _loss(model, x.double()).backward()
                norms.append(model[0].weight.grad.norm().item())
                optimizer.step()
            rows = monitor.log(0)
            assert model[0].weight.dtype == torch.float64
            optimizer.zero_grad()
            _loss(model, x.double()).backward()
            expected = model[0].weight.grad.norm().item()
            optimizer.step()
            after = monitor.log(1)
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(previous)
    assert rows["0.weight"]["steps"] == 4
    assert rows["0.weight"]["norm"] == pytest.approx(sum(norms) / 4, rel=1e-5)
    assert after["0.weight"]["norm"] == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("parametrize", ["weight_norm", "spectral_norm", "orthogonal"])
def test_parametrized_weight_is_one_layer_under_its_name(parametrize):
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1))
    getattr(parametrizations, parametrize)(model[0])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with GradientMonitor(model, activations=False) as monitor:
        optimizer.zero_grad()
        model(torch.randn(8, 4)).sum().backward()
        original = dict(model.named_parameters())
        optimizer.step()
        rows = monitor.log(0)
    names = [n for n in rows if n.startswith("0.")]
    assert all(n.startswith("0.weight") or n == "0.bias" for n in names), names
    assert not any("parametrizations" in n for n in rows)
    if parametrize != "weight_norm":
        grad = original["0.parametrizations.weight.original"].grad
        assert rows["0.weight"]["norm"] == pytest.approx(grad.double().norm().item(), rel=1e-5)
    assert all(monitor.kinds[n] == "linear" for n in names)


class _Flaky(nn.Module):
    """A model whose forward can raise ``error`` after its activation ran (a bad batch, an OOM;
    KeyboardInterrupt: Ctrl-C in a notebook)."""

    def __init__(self, error: BaseException | None = None):
        super().__init__()
        self.fc1, self.act, self.fc2, self.fail = nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1), False
        self.error = RuntimeError("bad batch") if error is None else error

    def forward(self, x):
        h = self.act(self.fc1(x))
        if self.fail:
            raise self.error
        return self.fc2(h)


@pytest.mark.parametrize("bad_rows", [64, 2048], ids=["small-output", "direct-output"])
@pytest.mark.parametrize("then", ["forward-again", "step-at-once", "log-at-once", "remove-at-once"])
def test_a_forward_that_raised_halfway_never_leaks_into_the_window(then, bad_rows):
    """The activations a failed forward pass produced are left out (oracle: the tanh output of
    the whole passes only), and the monitor says so; also an output large enough to be reduced
    at the end of its pass (8,192 elements), which that pass never reached."""
    torch.manual_seed(8)
    model = _Flaky()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    x, bad = torch.randn(16, 3), torch.randn(bad_rows, 3) * 10
    with warnings.catch_warnings(record=True) as caught, GradientMonitor(model, activations_every=1) as monitor:
        warnings.simplefilter("always")
        if then == "step-at-once":
            model(x).sum().backward()                        # a whole pass, then the failed one
        model.fail = True
        with pytest.raises(RuntimeError, match="bad batch"):
            model(bad)
        model.fail = False
        if then == "forward-again":
            model(x).sum().backward()
        if then != "log-at-once" and then != "remove-at-once":
            optimizer.step()
        else:                                                # the failed pass is the window's last event
            optimizer.step()
            model(x).sum()                                   # a whole pass, untaken: no step follows it
            model.fail = True
            with pytest.raises(RuntimeError, match="bad batch"):
                model(bad)
            if then == "remove-at-once":
                monitor.remove()
        monitor.log(0)
    messages = [str(w.message) for w in caught]
    halfway = [w for w in caught if "raised halfway" in str(w.message)]
    assert halfway and halfway[0].filename == __file__, [(w.filename, str(w.message)[:40]) for w in halfway]
    expected = torch.tanh(model.fc1(x)).detach()
    row = monitor.history[-1].activations["act"]
    assert row["mean"] == pytest.approx(expected.mean().item(), rel=1e-5)
    assert row["std"] == pytest.approx(expected.std(unbiased=False).item(), rel=1e-4)
    assert any("raised halfway" in m for m in messages), messages


class _CallsItself(nn.Module):
    """A model whose forward calls the model itself (``self(...)``: a batch of one made a batch,
    a list of inputs taken one by one): the root's hooks run again inside its own forward."""

    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2, self.fail_after_inner = nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1), False

    def forward(self, x):
        if x.dim() == 1:                                     # one example: the model on a batch of one
            out = self(x[None])[0]
            if self.fail_after_inner:
                raise RuntimeError("bad example")
            return out
        return self.fc2(self.act(self.fc1(x)))


@pytest.mark.parametrize("every", [1, 3])
def test_a_forward_that_calls_the_model_itself_is_one_whole_pass(every):
    """The inner call's activations are the pass's (oracle: tanh of the inputs, read straight
    from the layers), with no "raised halfway" warning: the outer pass ends whole after the
    inner one. A recursive forward that raises after its inner call ended is still a partial
    pass: left out, and said."""
    torch.manual_seed(3)
    model = _CallsItself()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    inputs = [torch.randn(3) for _ in range(6)]
    with warnings.catch_warnings(record=True) as caught, GradientMonitor(model, activations_every=every) as monitor:
        warnings.simplefilter("always")
        for x in inputs:
            optimizer.zero_grad()
            model(x).sum().backward()
            optimizer.step()
        monitor.log(0)
    assert not [w for w in caught if "halfway" in str(w.message)], [str(w.message)[:60] for w in caught]
    profiled = [x for i, x in enumerate(inputs) if i % every == 0]       # the first pass, then every every-th
    expected = torch.stack([torch.tanh(model.fc1(x)).detach() for x in profiled]).double()
    row = monitor.history[-1].activations["act"]
    assert row["mean"] == pytest.approx(expected.mean().item(), rel=1e-6)
    assert row["std"] == pytest.approx(expected.std(unbiased=False).item(), rel=1e-5)

    with warnings.catch_warnings(record=True) as caught, GradientMonitor(model, activations_every=1) as monitor:
        warnings.simplefilter("always")
        model(inputs[0]).sum().backward()
        optimizer.step()
        model.fail_after_inner = True
        with pytest.raises(RuntimeError, match="bad example"):
            model(inputs[1])
        monitor.log(0)
    assert any("raised halfway" in str(w.message) for w in caught)
    row = monitor.history[-1].activations["act"]
    assert row["mean"] == pytest.approx(torch.tanh(model.fc1(inputs[0])).double().mean().item(), rel=1e-6)


class _KeepsItsOutput(nn.Module):
    """A model whose forward returns None and keeps its output (``self.out``)."""

    def __init__(self):
        super().__init__()
        self.fc, self.act, self.out = nn.Linear(3, 4), nn.Tanh(), None

    def forward(self, x):
        self.out = self.act(self.fc(x)).sum()


def test_a_forward_returning_none_inside_the_users_except_block_is_a_whole_pass():
    """A forward that returns None, called while the user's code handles an exception (a retry
    in an ``except`` block), ended whole: its activations are the window's (oracle: tanh of the
    inputs), with no "raised halfway" warning. The pass-end hook (always_call) read any exception
    being handled as the pass's own, and the window lost every such pass."""
    torch.manual_seed(5)
    model = _KeepsItsOutput()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    inputs = [torch.randn(6, 3) for _ in range(3)]
    with warnings.catch_warnings(record=True) as caught, GradientMonitor(model, activations_every=1) as monitor:
        warnings.simplefilter("always")
        for x in inputs:
            try:
                raise KeyError("the user's own, handled")
            except KeyError:
                model(x)
            model.out.backward()
            optimizer.step()
        monitor.log(0)
    assert not [w for w in caught if "halfway" in str(w.message)], [str(w.message)[:60] for w in caught]
    expected = torch.tanh(model.fc(torch.cat(inputs))).detach().double()
    row = monitor.history[-1].activations["act"]
    assert row["mean"] == pytest.approx(expected.mean().item(), rel=1e-6)


@pytest.mark.parametrize("then", ["step", "log"])
def test_the_pass_after_a_keyboard_interrupt_is_a_whole_pass(then):
    """A KeyboardInterrupt in a forward skips torch's always_call hooks (run on an Exception only),
    so the pass-end hook never ran; the next pass was then taken for a call of the model inside
    that one, and both were dropped at the step. Oracle: tanh of the whole pass's inputs only;
    the interrupted pass is left out and said."""
    torch.manual_seed(6)
    model = _Flaky(KeyboardInterrupt())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    x = torch.randn(5, 3)
    with warnings.catch_warnings(record=True) as caught, GradientMonitor(model, activations_every=1) as monitor:
        warnings.simplefilter("always")
        model.fail = True
        with pytest.raises(KeyboardInterrupt):
            model(torch.randn(5, 3) * 10)
        model.fail = False
        model(x).sum().backward()
        if then == "step":
            optimizer.step()
        monitor.log(0)
    assert any("raised halfway" in str(w.message) for w in caught)
    row = monitor.history[-1].activations["act"]
    assert row["mean"] == pytest.approx(torch.tanh(model.fc1(x)).double().mean().item(), rel=1e-6)


@pytest.mark.parametrize("every", [1, 2, 3])
def test_taps_read_the_module_output_whatever_hooks_the_user_adds(every):
    """The taps come and go with the profiled passes; each is put first among its module's
    hooks, so a user's hook that returns a new output (here 10x, registered after attach) never
    changes what the monitor reads: the sigmoid's own output, at every profiled window."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(3, 4), nn.Sigmoid(), nn.Linear(4, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    x = torch.randn(8, 3)
    expected = torch.sigmoid(model[0](x)).mean().item()
    with GradientMonitor(model, activations_every=every) as monitor:
        model[1].register_forward_hook(lambda module, inputs, output: output * 10)
        means = []
        for step in range(6):
            model(x).sum().backward()
            optimizer.step()
            monitor.log(step)
            means.append(monitor.history[-1].activations.get("1", {}).get("mean"))
    tapped = [m for m in means if m is not None]
    assert len(tapped) == -(-6 // every)
    assert tapped == pytest.approx([expected] * len(tapped), rel=1e-6)


def test_one_optimizer_per_parameter_counts_iterations_for_the_activation_schedule():
    """Steps with no training forward pass between them are one iteration: with one optimizer
    per parameter stepping inside backward (post-accumulate-grad hooks), activations_every=4
    taps 3 of 12 passes, not every pass."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    optimizers = {p: torch.optim.SGD([p], lr=0.01) for p in model.parameters()}
    def step_now(p):
        optimizers[p].step()
        optimizers[p].zero_grad()

    for p in model.parameters():
        p.register_post_accumulate_grad_hook(step_now)
    outputs = []
    with GradientMonitor(model, activations_every=4) as monitor:
        for _ in range(12):
            out = model(torch.randn(5, 3))
            outputs.append(monitor._setup.schedule.active)
            out.sum().backward()
        monitor.log(0)
    assert outputs == [True, False, False, False] * 3
    assert monitor.history[-1].steps == 12


def test_taps_inside_compiled_blocks_are_said_with_their_cause():
    """Per-block compile (Module.compile(), as FSDP2 recipes do): the activations are not tapped
    and the warning names compiled blocks, not function-style activations."""
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(3, 4), nn.Sequential(nn.Linear(4, 4), nn.GELU()), nn.Linear(4, 1))
    model[1].compile()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with GradientMonitor(model, activations_every=1) as monitor:
        model(torch.randn(5, 3)).sum().backward()
        optimizer.step()
        rows, messages = _caught(lambda: monitor.log(0))
    assert rows and monitor.history[-1].activations == {}
    assert any("compiled blocks" in m and "1.1" in m for m in messages), messages
    assert not any("with functions" in m for m in messages), messages


def test_frozen_parameters_an_optimizer_holds_are_not_idle():
    """Fine-tuning with a frozen layer inside an optimizer built over model.parameters(): frozen
    parameters are expected to get no gradient and are not named idle."""
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    model[0].requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    with GradientMonitor(model, activations=False) as monitor:
        model(torch.randn(5, 3)).sum().backward()
        optimizer.step()
        monitor.log(0)
    assert monitor.history[-1].idle == []
    assert sorted(monitor.history[-1].gradients) == ["2.bias", "2.weight"]


class _ChangesItsActivation(nn.Module):
    """A GELU's output changed in place after the GELU ran (``h += shift``), or a ReLU with
    inplace=True whose output nothing changes afterwards (a ReLU changes its input, not its
    output, and the output is what is tapped)."""

    def __init__(self, width: int, shift: float):
        super().__init__()
        self.fc1, self.act, self.fc2, self.relu = nn.Linear(3, width), nn.GELU(), nn.Linear(width, 1), nn.ReLU(inplace=True)
        self.shift = shift

    def forward(self, x):
        h = self.act(self.fc1(x))
        if self.shift:
            h += self.shift
        return self.fc2(self.relu(h * 1.0))


@pytest.mark.parametrize("width", [8, 4096], ids=["small-output", "direct-output"])
@pytest.mark.parametrize("shift", [0.0, 100.0], ids=["untouched", "changed"])
def test_an_activation_output_changed_in_place_after_its_tap_is_said(width, shift):
    """An output read after the pass (small ones at the window's end, large ones at the pass's
    end) and changed in place before that gives statistics of the changed values: said in a
    warning naming the module, never silently; an untouched one (and a ReLU with inplace=True)
    says nothing. Oracle: the GELU's own output, plus the shift."""
    torch.manual_seed(6)
    model = _ChangesItsActivation(width, shift)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    x = torch.randn(16, 3)
    with warnings.catch_warnings(record=True) as caught, GradientMonitor(model, activations_every=1) as monitor:
        warnings.simplefilter("always")
        for _ in range(2):
            optimizer.zero_grad()
            model(x).sum().backward()
            optimizer.step()
        monitor.log(0)
    said = [str(w.message) for w in caught if "changed in place" in str(w.message)]
    assert bool(said) == bool(shift), said
    assert not said or ("act" in said[0] and "relu" not in said[0].split(" ran")[0])
    expected = (torch.nn.functional.gelu(model.fc1(x)) + shift).double()
    assert monitor.history[-1].activations["act"]["mean"] == pytest.approx(expected.mean().item(), rel=1e-5)
