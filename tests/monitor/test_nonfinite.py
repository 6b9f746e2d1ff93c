"""The first non-finite part (nonfinite.py) on planted values: the module, the pass and the step.

Each test plants a NaN or inf at a chosen step in a known place and checks that the part names
that module, that pass and that step; a clean window says None. The oracle is the plant itself.
"""

from __future__ import annotations

import os
import socket
import sys
from collections import OrderedDict

import pytest
import torch
from torch import nn

from gradflow.monitor.interception import found_inf
from gradflow.monitor.nonfinite import LOSS, FirstNonFinite, Source, all_ranks_max


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    layers = OrderedDict()
    for i in range(1, 5):
        layers[f"dense_{i}"], layers[f"relu_{i}"] = nn.Linear(4, 4), nn.ReLU()
    layers["dense_5"] = nn.Linear(4, 1)
    return nn.Sequential(layers)


def train(model, part, steps, plant=None, loss_fn=None, optimizer=None):
    """``steps`` SGD steps on a fixed batch; ``plant(step)`` runs before each step's forward."""
    optimizer = optimizer or torch.optim.SGD(model.parameters(), lr=1e-3)
    x, y = torch.randn(8, 4, generator=torch.Generator().manual_seed(1)), torch.randn(8, 1)
    for step in range(steps):
        if plant is not None:
            plant(step)
        optimizer.zero_grad()
        out = model(x)
        loss = loss_fn(out, y) if loss_fn else nn.functional.mse_loss(out, y)
        loss.backward()
        part.record()
        optimizer.step()


def attached(model, device="cpu") -> FirstNonFinite:
    part = FirstNonFinite(model, device)
    part.hook(model)
    return part


def plant_bias(layer: nn.Linear, at: int, value: float):
    def plant(step):
        if step == at:
            with torch.no_grad():
                layer.bias[1] = value
    return plant


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_forward_plant_in_a_middle_module_is_named_with_its_step(value):
    model = mlp()
    part = attached(model)
    try:
        train(model, part, 6, plant_bias(model.dense_3, 4, value))
        first, overflow = part.read_now()
    finally:
        part.remove()
    assert first == Source("dense_3", "forward", 4)
    assert overflow is None


def test_a_clean_window_says_none_and_the_next_window_counts_steps_on():
    model = mlp()
    part = attached(model)
    try:
        train(model, part, 3)
        assert part.read_now() == (None, None)
        part.reset()
        train(model, part, 3, plant_bias(model.dense_2, 1, float("nan")))
        assert part.read_now()[0] == Source("dense_2", "forward", 4)      # steps since attach: 3 + 1
    finally:
        part.remove()


class NaNGradient(torch.autograd.Function):
    """Identity forward; its backward returns NaN at the chosen step (a custom Function)."""

    @staticmethod
    def forward(ctx, x, poison):
        ctx.poison = poison
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return (grad * float("nan") if ctx.poison else grad), None


class Poisoned(nn.Module):
    """A custom op as its own module (no submodules)."""

    def __init__(self) -> None:
        super().__init__()
        self.poison = False

    def forward(self, x):
        return NaNGradient.apply(x, self.poison)


def test_backward_only_plant_through_a_custom_function_is_named_as_backward():
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(dense_1=nn.Linear(4, 4), act_1=nn.Tanh(), dense_2=nn.Linear(4, 4), odd=Poisoned(),
                                      act_2=nn.Tanh(), dense_3=nn.Linear(4, 1)))

    def plant(step):
        model.odd.poison = step == 2

    part = attached(model)
    try:
        train(model, part, 4, plant)
        first, _ = part.read_now()
    finally:
        part.remove()
    # The forward is clean; the first input gradient that is non-finite is odd's (its Function's
    # backward made it); dense_2's and dense_1's come after, from the NaN they were handed.
    assert first == Source("odd", "backward", 2)


def test_a_loss_whose_gradient_is_non_finite_is_named_the_loss():
    model = mlp()
    part = attached(model)
    state = {"step": 0}

    def loss_fn(out, y):
        state["step"] += 1
        shift = 1e3 if state["step"] == 3 else 0.0         # sqrt of a negative at step 2
        return (out - y + 1e-2).pow(2).add(1.0 - shift).sqrt().mean()

    try:
        train(model, part, 4, loss_fn=loss_fn)
        first, _ = part.read_now()
    finally:
        part.remove()
    assert first == Source(LOSS, "backward", 2)
    assert "loss" in first.where()


def test_the_first_call_is_found_when_a_module_runs_several_times_per_forward():
    torch.manual_seed(0)

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.shared, self.middle, self.head = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 1)

        def forward(self, x):
            return self.head(self.shared(self.middle(self.shared(x))))   # shared runs before and after middle

    found = {}
    for planted in ("middle", "shared"):                 # middle: shared's second call is NaN too
        model = Twice()
        part = attached(model)
        try:
            train(model, part, 3, plant_bias(getattr(model, planted), 1, float("nan")))
            found[planted] = part.read_now()[0]
        finally:
            part.remove()
    assert found["middle"] == Source("middle", "forward", 1)
    assert found["shared"] == Source("shared", "forward", 1)


def test_evaluation_passes_are_not_counted():
    model = mlp()
    part = attached(model)
    try:
        train(model, part, 2)
        with torch.no_grad():
            model.dense_1.bias[0] = float("nan")
        model.eval()
        with torch.no_grad():
            model(torch.randn(2, 4))
        part.record()
        assert part.read_now() == (None, None)
    finally:
        part.remove()


def test_amp_overflow_that_the_scaler_skips_is_an_overflow_not_a_source():
    """CPU autocast in float16 with GradScaler("cpu"): a forward overflow (a float16 output
    past 65504) makes the scaler skip the step: it is reported as the first overflow."""
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu")
    part = attached(model)
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    try:
        for step in range(4):
            with torch.no_grad():
                model.dense_2.weight.mul_(1e8 if step == 2 else 1.0)      # float16 overflow at step 2
            optimizer.zero_grad()
            with torch.autocast("cpu", dtype=torch.float16):
                loss = nn.functional.mse_loss(model(x).float(), y)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            skipped = found_inf(scaler, optimizer)
            part.skip() if skipped else part.record()
            scaler.step(optimizer)
            scaler.update()
            with torch.no_grad():
                model.dense_2.weight.div_(1e8 if step == 2 else 1.0)
        first, overflow = part.read_now()
    finally:
        part.remove()
    assert first is None
    assert overflow == Source("dense_2", "forward", 2)


def test_torch_compile_sees_the_compiled_model_as_a_whole_without_recompiling():
    """Under torch.compile the hooks stay out of the traced region: the compiled model's output
    is checked as a whole (module "") and no step recompiles."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = mlp()
    compiled = torch.compile(model, backend="eager")
    part = attached(model)
    try:
        train(compiled, part, 5, plant_bias(model.dense_3, 3, float("nan")))
        first, _ = part.read_now()
    finally:
        part.remove()
    assert first == Source("", "forward", 3)
    assert counters["stats"]["unique_graphs"] == 1


def test_remove_leaves_no_hook_and_twice_is_safe():
    model = mlp()
    before = dict(torch.nn.modules.module._global_forward_hooks)
    part = attached(model)
    part.remove()
    part.remove()
    assert dict(torch.nn.modules.module._global_forward_hooks) == before
    assert all(not m._forward_hooks for m in model.modules())


# -- two gloo processes: the earliest occurrence across ranks ---------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_worker(rank: int, port: int, queue) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        model = mlp()
        part = attached(model)
        layer, at = (model.dense_4, 3) if rank == 0 else (model.dense_2, 1)   # rank 1 goes first
        train(model, part, 5, plant_bias(layer, at, float("nan")))
        queue.put((rank, part.read_now(combine=all_ranks_max), part.read_now()))
        part.remove()
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(sys.platform != "linux", reason="gloo process groups are tested on Linux")
def test_two_ranks_report_the_earliest_occurrence_on_either():
    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    port = _free_port()
    processes = [context.Process(target=_rank_worker, args=(rank, port, queue)) for rank in range(2)]
    for process in processes:
        process.start()
    results = {rank: (combined, alone) for rank, combined, alone in (queue.get() for _ in processes)}
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0
    assert results[0][1][0] == Source("dense_4", "forward", 3)           # what rank 0 saw alone
    for rank in range(2):
        assert results[rank][0][0] == Source("dense_2", "forward", 1)    # the earliest on any rank


# -- inside GradientMonitor: the window's field, the verdict's evidence ------------------------

def test_the_monitor_window_carries_the_source_and_the_verdict_names_it():
    from gradflow import GradientMonitor
    from gradflow.analysis.diagnose import diagnose, markdown

    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    with GradientMonitor(model, histograms=False, nonfinite=True) as monitor:
        train(model, _NoPart(), 3, optimizer=optimizer)
        monitor.log(0)
        train(model, _NoPart(), 3, plant_bias(model.dense_3, 1, float("nan")), optimizer=optimizer)
        monitor.log(1)
    clean, planted = monitor.history
    assert clean.first_nonfinite is None and clean.first_overflow is None
    assert planted.first_nonfinite == Source("dense_3", "forward", 4)
    diagnosis = diagnose(monitor.history)
    assert "exploding" in diagnosis.verdicts
    assert "the first non-finite value came from dense_3 (forward) at step 4" in diagnosis.line()
    assert diagnosis.evidence["first_nonfinite"]["module"] == "dense_3"
    assert "dense_3 (forward) at step 4" in markdown(diagnosis)          # the TensorBoard text


def test_a_monitor_with_nonfinite_false_adds_no_hook():
    from gradflow import GradientMonitor

    before = dict(torch.nn.modules.module._global_forward_hooks)
    model = mlp()
    with GradientMonitor(model, nonfinite=False) as monitor:
        assert dict(torch.nn.modules.module._global_forward_hooks) == before
        train(model, _NoPart(), 1)
        monitor.log(0)
    assert monitor.history[0].first_nonfinite is None


class _NoPart:
    """``train``'s part when a monitor records the steps itself."""

    def record(self):
        pass


def test_the_monitor_reports_a_skipped_amp_step_as_an_overflow():
    """Through GradientMonitor: GradScaler.step skips the overflowing step (seen by the monitor's
    interception), so the window has a first overflow, no NaN source, and the verdict's notes say so."""
    from gradflow import GradientMonitor
    from gradflow.analysis.diagnose import diagnose

    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu")
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    with GradientMonitor(model, histograms=False, nonfinite=True) as monitor:
        for step in range(4):
            with torch.no_grad():
                model.dense_2.weight.mul_(1e8 if step == 2 else 1.0)
            optimizer.zero_grad()
            with torch.autocast("cpu", dtype=torch.float16):
                loss = nn.functional.mse_loss(model(x).float(), y)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            with torch.no_grad():
                model.dense_2.weight.div_(1e8 if step == 2 else 1.0)
        monitor.log(0)
    window = monitor.history[0]
    assert window.overall["skipped_steps"] == 1
    assert window.first_nonfinite is None
    assert window.first_overflow == Source("dense_2", "forward", 2)
    notes = diagnose(monitor.history).evidence["notes"]
    assert any("first overflow that a GradScaler skipped came from dense_2 (forward) at step 2" in n for n in notes)


@pytest.mark.parametrize("wrap", ["lookahead", "plain"])
def test_a_wrapper_step_and_its_inner_step_count_as_one_step(wrap):
    """A Lookahead-style optimizer steps its inner optimizer inside its own step: two optimizer
    steps, one training step. The source's step is the training step's, as the monitor's
    window counts it (a NaN planted before the 4th step: step 3, not 6)."""
    from wrapped_optimizers import Lookahead

    from gradflow import GradientMonitor

    model = mlp()
    inner = torch.optim.SGD(model.parameters(), lr=1e-3)
    optimizer = Lookahead(inner) if wrap == "lookahead" else inner
    x, y = torch.randn(8, 4, generator=torch.Generator().manual_seed(1)), torch.randn(8, 1)
    plant = plant_bias(model.dense_3, 3, float("nan"))
    with GradientMonitor(model, None, nonfinite=True, activations=False) as monitor:
        for step in range(5):
            plant(step)
            optimizer.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            optimizer.step()
        monitor.log(0)
    window = monitor.history[-1]
    assert window.steps == 5
    assert window.first_nonfinite == Source("dense_3", "forward", 3)


def test_nonfinite_with_stacked_members_is_refused_at_attach():
    from gradflow import GradientMonitor, MonitorError

    model = nn.Linear(4, 2)             # every parameter has a leading dimension of 2: two stacked members
    with pytest.raises(MonitorError, match="nonfinite=True is not supported with members=2"):
        GradientMonitor(model, None, members=2, nonfinite=True)
    assert not model._forward_hooks and not model._forward_pre_hooks
