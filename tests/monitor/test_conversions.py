"""A model moved to another device after the monitor attached is followed (conversions.py, Part.move).

On this CPU-only machine the move itself is driven two ways: every part's ``move`` called by hand
(the buffers re-created on the CPU), and the monitor told that it was bound to another device
(it then follows the parameters to the CPU as it would to a GPU). Oracles: a twin run without the
move (the same seed, the same batches) and statistics taken from ``p.grad``. The real move between
the CPU and CUDA is ``test_model_moved_between_cpu_and_cuda_mid_window_is_followed``, skipped
without a GPU (``benchmarks/gpu.sh`` runs it).
"""

from __future__ import annotations

import dataclasses
import gc
import math
import weakref

import pytest
import torch
from monitor_oracle import GradientOracle, assert_matches_oracle
from torch import nn

from gradflow.monitor import GradientMonitor, MonitorError, model_checks

CPU = torch.device("cpu")


class _Net(nn.Module):
    """Every part has something to hold: an LSTM (gates, through time), tanh and ReLU taps."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(3, 4, batch_first=True)
        self.fc1, self.act1, self.fc2, self.act2, self.out = (nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6), nn.ReLU(),
                                                              nn.Linear(6, 1))

    def forward(self, x):
        h = self.rnn(x)[0][:, -1]
        return self.out(self.act2(self.fc2(self.act1(self.fc1(h)))))


def _batches(n: int, device=CPU) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(5, 7, 3, generator=generator).to(device) for _ in range(n)]


def _step(model, optimizer, x, oracle=None) -> None:
    optimizer.zero_grad()
    model(x).square().mean().backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9)
    if oracle is not None:
        oracle.capture()
    optimizer.step()


def _monitor(model, **kwargs) -> GradientMonitor:
    return GradientMonitor(model, nonfinite=True, activations_every=1, through_time_every=1, histograms=False,
                           **kwargs)


def _buffers(obj, path: str = "", seen: set | None = None) -> dict[str, torch.Tensor]:
    """Every tensor a part holds, by attribute path (``totals``, ``start[0]``, ``recorder.modules[0].sums``),
    leaving out the user's tensors it only refers to (``setup``, ``params``) and torch's objects."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return {}
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return {path: obj}
    if isinstance(obj, dict):
        items = [(f"{path}[{key!r}]", value) for key, value in obj.items()]
    elif isinstance(obj, (list, tuple)):
        items = [(f"{path}[{i}]", value) for i, value in enumerate(obj)]
    elif type(obj).__module__.startswith("gradflow"):
        fields = vars(obj) if hasattr(obj, "__dict__") else {}
        if dataclasses.is_dataclass(obj):
            fields = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
        items = [(f"{path}.{name}".lstrip("."), value) for name, value in fields.items()
                 if name not in ("setup", "params", "handles")]
    else:
        return {}
    found = {}
    for where, value in items:
        found.update(_buffers(value, where, seen))
    return found


def test_every_part_moves_its_buffers_exactly_and_keeps_no_old_one(reduction_path):
    """Each part's ``move`` then ``bind`` (after two steps, mid-window; the weights' start copies
    move in ``bind``): every tensor a part held is gone (no reference left), each one it still has
    at the same place holds exactly the old values, and the window then recorded matches a twin
    run that never moved, part by part."""
    windows = []
    for move in (False, True):
        torch.manual_seed(0)
        model = _Net()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        with _monitor(model) as monitor:
            assert set(monitor.parts) >= {"conversions", "gradients", "weights", "activations", "gates", "clipping",
                                          "nonfinite", "time"}
            for i, x in enumerate(_batches(4)):
                _step(model, optimizer, x)
                if move and i == 1:
                    before = {}
                    for name, part in monitor.parts.items():
                        part.fold()
                        before[name] = _buffers(part)
                    old = [(f"{name}.{path}", weakref.ref(t)) for name, held in before.items() for path, t in held.items()]
                    values = {name: {path: t.clone() for path, t in held.items()} for name, held in before.items()}
                    assert {"totals", "counts", "step_squares"} <= set(values["gradients"])
                    assert any(path.startswith("start[") for path in values["weights"])
                    assert "recorder.modules[0].sums" in values["time"]
                    del before
                    for part in monitor.parts.values():    # as the coordinator follows a move: move, then bind
                        part.move(CPU)
                    for part in monitor.parts.values():
                        part.bind(monitor._setup.params)
                    gc.collect()
                    assert [path for path, ref in old if ref() is not None] == []
                    for name, part in monitor.parts.items():
                        now = _buffers(part)
                        for path, value in values[name].items():
                            if path in now:
                                assert torch.equal(now[path], value), f"{name}.{path} changed in the move"
                    assert {"totals", "counts", "step_squares"} <= set(_buffers(monitor.parts["gradients"]))
            monitor.log(0)
        windows.append(monitor.history[-1])
    _assert_same_window(*windows)


def _assert_same_window(a, b, rel: float = 1e-9) -> None:
    assert a.steps == b.steps
    for field in ("gradients", "weights", "activations", "overall"):
        rows_a, rows_b = getattr(a, field), getattr(b, field)
        assert rows_a.keys() == rows_b.keys(), field
        for key, row in rows_a.items():
            other = rows_b[key] if isinstance(rows_b[key], dict) else {"": rows_b[key]}
            for column, value in (row if isinstance(row, dict) else {"": row}).items():
                assert math.isclose(value, other[column], rel_tol=rel, abs_tol=1e-12) or (
                    math.isnan(value) and math.isnan(other[column])), f"{field}[{key}][{column}]: {value} != {other[column]}"
    for name, gates in a.gates.items():
        for gate, row in gates.items():
            assert row["norm"] == pytest.approx(b.gates[name][gate]["norm"], rel=rel)
    assert a.time.keys() == b.time.keys() and a.time
    for key, profile in a.time.items():
        assert profile == pytest.approx(b.time[key], rel=rel)
    assert (a.first_nonfinite, a.first_overflow) == (b.first_nonfinite, b.first_overflow)


@pytest.mark.parametrize("found_at", ["forward", "record"])
def test_monitor_bound_to_another_device_follows_the_parameters(found_at):
    """The monitor believes it was bound to another device (the parameters' own device, the CPU,
    differs from it): at the start of the next training forward pass, or at a ``record()`` after
    the backward, it moves every part to the CPU mid-window; the window equals a twin run's and
    the oracle's."""
    windows = []
    for move in (False, True):
        torch.manual_seed(0)
        model = _Net()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        oracle = GradientOracle(model.named_parameters())
        with _monitor(model, automatic=found_at == "forward") as monitor:
            for i, x in enumerate(_batches(4)):
                optimizer.zero_grad()
                if move and i == 2 and found_at == "forward":
                    monitor._setup.device = torch.device("meta")
                    totals = weakref.ref(monitor.parts["gradients"].totals)
                loss = model(x).square().mean()
                if move and i == 2 and found_at == "forward":
                    assert totals() is None and monitor._setup.device == CPU     # moved at the forward's start
                loss.backward()
                oracle.capture()
                if found_at == "record":
                    if move and i == 2:
                        monitor._setup.device = torch.device("meta")
                        totals = weakref.ref(monitor.parts["gradients"].totals)
                    monitor.record()
                optimizer.step()
            assert monitor._setup.device == CPU
            gc.collect()
            if move:
                assert totals() is None                                    # the old sums are gone
            rows = monitor.log(0)
        assert_matches_oracle(rows, oracle)
        windows.append(monitor.history[-1])
    _assert_same_window(*windows)


def test_changes_that_cannot_be_followed_are_one_line_errors():
    """Parameters on the meta device, or split over two devices after attach, cannot be followed:
    each is said in one line that names the parameter (the split is built by hand here: a
    CPU-only torch has no second real device)."""
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    with GradientMonitor(model) as monitor:
        model[2].to("meta")
        with pytest.raises(MonitorError, match=r"^2.weight is on the meta device; attach after"):
            monitor.log(0)
    split = [("0.weight", torch.zeros(2)), ("2.weight", torch.zeros(2, device="meta"))]
    with pytest.raises(MonitorError, match=r"^2.weight is on meta but 0.weight on cpu \(the monitor attached on "
                                           r"cpu\); .* move every parameter$"):
        model_checks._one_device(split, CPU)


def test_first_parameter_replaced_on_another_device_is_noticed_at_the_forward_start():
    """The overwrite flag's conversion puts new tensors in the model; the monitor looks up the
    model's own first parameter at each training forward pass's start, so a new one on another
    device is followed there, before any tap sees an output (here the meta device, which cannot
    be followed: the one-line error is found at the forward's start, not at a step or log(); it
    stops the monitor with a warning there, never raising out of the user's forward, and log()
    raises it)."""
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    with GradientMonitor(model) as monitor:
        model[0].weight = nn.Parameter(torch.empty(4, 3, device="meta"))
        with pytest.warns(UserWarning, match=r"stopped recording during training: 0.weight is on the meta device"):
            model(torch.randn(2, 3))
        assert monitor.parts["gradients"].recorded == 0 and not monitor.attached
        with pytest.raises(MonitorError, match=r"^0.weight is on the meta device"):
            monitor.log(0)


def _swap_conversions(on: bool):
    previous = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(on)
    return previous


@pytest.mark.parametrize("then", ["log", "remove"])
def test_swap_conversion_with_gradients_after_log_or_remove(then):
    """Under ``set_swap_module_params_on_conversion(True)`` a conversion swaps each parameter and
    its gradient in place (``torch.utils.swap_tensors``), which refuses tensors that have weak
    references: after ``log()`` or ``remove()`` the monitor holds none to the gradients, so
    ``model.double()`` works with the gradients still set, and the monitor follows it."""
    previous = _swap_conversions(True)
    try:
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        monitor = GradientMonitor(model)
        model(torch.randn(5, 3)).sum().backward()
        optimizer.step()
        monitor.log(0) if then == "log" else monitor.remove()
        model.double()                                          # the gradients are swapped too
        assert model[0].weight.grad.dtype == torch.float64
        if then == "log":
            oracle = GradientOracle(model.named_parameters())
            optimizer.zero_grad()
            model(torch.randn(5, 3, dtype=torch.float64)).sum().backward()
            oracle.capture()
            optimizer.step()
            assert_matches_oracle(monitor.log(1), oracle, rtol=1e-9)
            monitor.remove()
    finally:
        _swap_conversions(previous)


def test_swap_conversion_with_gradients_mid_window():
    """Between a step and the next log() the monitor holds no weak reference to a gradient (its
    wrapper check ends at the step's post-hook): swap_tensors refuses tensors that have one."""
    previous = _swap_conversions(True)
    try:
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        with GradientMonitor(model) as monitor:
            model(torch.randn(5, 3)).sum().backward()
            optimizer.step()
            model.double()
            model(torch.randn(5, 3, dtype=torch.float64)).sum().backward()
            optimizer.step()
            rows = monitor.log(0)
        assert rows["0.weight"]["steps"] == 2
    finally:
        _swap_conversions(previous)


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (benchmarks/gpu.sh runs it)")


@CUDA
@pytest.mark.parametrize("how", ["in-place", "overwrite", "swap"])
@pytest.mark.parametrize("route", [("cpu", "cuda"), ("cuda", "cpu")], ids=["cpu-to-cuda", "cuda-to-cpu"])
def test_model_moved_between_cpu_and_cuda_mid_window_is_followed(how, route):
    """``model.to(other device)`` after two steps of a window (in place; under
    ``set_overwrite_module_params_on_conversion``, with a new optimizer for the new tensors; under
    ``set_swap_module_params_on_conversion``): no error inside training, the window's rows match
    the oracle over all four steps, the weights' update ratio spans the move, the monitor follows
    at the next training forward pass, and the next window is recorded on the new device with
    every part's sums there."""
    first, second = (torch.device(d) for d in route)
    flags = torch.__future__.get_overwrite_module_params_on_conversion(), torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_overwrite_module_params_on_conversion(how == "overwrite")
    torch.__future__.set_swap_module_params_on_conversion(how == "swap")
    try:
        torch.manual_seed(0)
        model = _Net().to(first)
        oracle = GradientOracle(model.named_parameters())
        start = {name: p.detach().clone().double().cpu() for name, p in model.named_parameters()}
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        with _monitor(model) as monitor:
            batches = _batches(5)
            for x in batches[:2]:
                _step(model, optimizer, x.to(first), oracle)
            if how == "swap":             # gradients set mid-window cannot be swapped (the xfail test above)
                optimizer.zero_grad()
            model.to(second)
            if how == "overwrite":                         # the old optimizer holds the old tensors
                optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
                oracle.params = dict(model.named_parameters())
            model(batches[2].to(second))          # a training forward pass: followed at its start, before any step
            assert monitor._setup.device.type == second.type
            for x in batches[2:4]:
                _step(model, optimizer, x.to(second), oracle)
            rows = monitor.log(0)
            assert_matches_oracle(rows, oracle)
            for name, p in model.named_parameters():
                w = p.detach().double().cpu()
                ratio = (w - start[name]).norm() / start[name].norm()
                assert monitor.history[-1].weights[name]["norm"] == pytest.approx(w.norm().item(), rel=1e-5)
                if start[name].norm() > 0:
                    assert monitor.history[-1].weights[name]["update_ratio"] == pytest.approx(ratio.item(), rel=1e-4)
            assert monitor.history[-1].activations["act1"]["mean"] is not None
            assert monitor.history[-1].time
            oracle.reset()
            _step(model, optimizer, batches[4].to(second), oracle)
            for part in monitor.parts.values():
                part.fold()
                for path, tensor in _buffers(part).items():
                    assert tensor.device.type == second.type, f"{part.name}.{path} stayed on {tensor.device}"
            assert_matches_oracle(monitor.log(1), oracle)
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(flags[0])
        torch.__future__.set_swap_module_params_on_conversion(flags[1])


def _tied_and_parametrized() -> list[nn.Module]:
    from torch.nn.utils import parametrizations

    shared = nn.Linear(3, 3)
    parametrized = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 3))
    parametrizations.weight_norm(parametrized[0])
    parametrizations.orthogonal(parametrized[1])
    embedding, head = nn.Embedding(10, 4), nn.Linear(4, 10)
    head.weight = embedding.weight                                         # tied, as GPT-2's head

    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.complex = nn.Parameter(torch.zeros(2, dtype=torch.complex64))
            self.linear = nn.Linear(2, 2)
            self.steps = nn.Parameter(torch.zeros(3, dtype=torch.long), requires_grad=False)
            self.again = self.linear                                       # one module under two names

    return [nn.Sequential(shared, nn.ReLU(), shared, nn.Sequential(shared)), parametrized,
            nn.Sequential(embedding, head), Mixed(), _Net()]


@pytest.mark.parametrize("index", range(5))
def test_the_window_check_walks_the_parameters_as_named_parameters_does(index):
    """``log()``'s check of the parameters (``_floating_parameters``, no names) finds the same
    tensors in the same order as ``named_parameters()`` filtered to floating point: shared
    modules and tied weights once, parametrized weights' originals, complex and integer ones left out."""
    model = _tied_and_parametrized()[index]
    walked = model_checks._floating_parameters(model)
    named = [p for _, p in model.named_parameters() if p.is_floating_point()]
    assert len(walked) == len(named) and all(a is b for a, b in zip(walked, named))
