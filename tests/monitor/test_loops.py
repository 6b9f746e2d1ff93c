"""The right gradient in the loops people write: each case against the p.grad oracle, captured
at the moment the step applies it (issue: closures, several optimizers, AMP overflow, huge values,
a model left alone)."""

from __future__ import annotations

import copy
import io
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monitor_oracle import GradientOracle, assert_matches_oracle, step_statistics
from torch import nn
from torch.utils.checkpoint import checkpoint

from gradflow import GradientMonitor, MonitorError
from gradflow.monitor import interception
from gradflow.monitor.sinks import ScalarSink, Sink, TeeSink


def capture_in_step_pre_hook(optimizer, oracle):
    """The oracle as the optimizer sees it: a step pre-hook registered after the closure ran
    is too early, so closures are captured by wrapping them (what the step really applies)."""
    return optimizer.register_step_pre_hook(lambda *_: oracle.capture())


# -- 1. closures ---------------------------------------------------------------------------

def test_closure_records_the_gradient_the_step_applies():
    """The issue's case: Linear(3, 1), SGD lr 0.1, closures scaling the input by step + 1."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 3), torch.randn(8, 1)
    applied = []
    with GradientMonitor(model) as monitor:
        for step in range(3):
            def closure(step=step):
                optimizer.zero_grad()
                loss = nn.functional.mse_loss(model(x * (step + 1)), y)
                loss.backward()
                applied.append(model.weight.grad.abs().mean().item())
                return loss
            optimizer.step(closure)
            stats = monitor.log(step)
            assert stats["weight"]["mean_abs"] == pytest.approx(applied[-1], rel=1e-6)
            assert stats["weight"]["steps"] == 1
    assert len(set(np.round(applied, 6))) == 3                # three different gradients


@pytest.mark.parametrize("make", [
    lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
    lambda p: torch.optim.Adam(p, lr=0.01),
    lambda p: torch.optim.LBFGS(p, lr=0.5, max_iter=4),
], ids=["sgd", "adam", "lbfgs"])
def test_closure_by_keyword_and_position_with_other_optimizers(make):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    optimizer = make(model.parameters())
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    firsts = []
    with GradientMonitor(model) as monitor:
        for step in range(4):
            calls = []

            def closure(calls=calls, step=step):
                optimizer.zero_grad()
                loss = nn.functional.mse_loss(model(x), y)
                loss.backward()
                if not calls:
                    firsts.append({name: step_statistics(p.grad) for name, p in model.named_parameters()})
                calls.append(1)
                return loss
            optimizer.step(closure=closure) if step % 2 else optimizer.step(closure)
        stats = monitor.log(0)
    for name in ("0.weight", "2.weight"):
        expected = np.mean([f[name]["norm"] for f in firsts])
        assert stats[name]["norm"] == pytest.approx(expected, rel=1e-5)
        assert stats[name]["steps"] == 4


# -- 2. several optimizers, one per parameter -----------------------------------------------

def test_gan_records_each_network_from_its_own_optimizer():
    torch.manual_seed(2)
    nets = nn.ModuleDict({"G": nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4)),
                          "D": nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))})
    opt_g = torch.optim.Adam(nets["G"].parameters(), lr=1e-3)
    opt_d = torch.optim.Adam(nets["D"].parameters(), lr=1e-3)
    oracle_g = GradientOracle(nets["G"].named_parameters(prefix="G"))
    oracle_d = GradientOracle(nets["D"].named_parameters(prefix="D"))
    with GradientMonitor(nets) as monitor:
        for _ in range(4):
            real, z = torch.randn(16, 4), torch.randn(16, 4)
            opt_d.zero_grad()                         # D's step: G's stale gradients stay put
            d_loss = nn.functional.softplus(-nets["D"](real)).mean() + \
                nn.functional.softplus(nets["D"](nets["G"](z).detach())).mean()
            d_loss.backward()
            oracle_d.capture()
            opt_d.step()
            opt_g.zero_grad()
            nn.functional.softplus(-nets["D"](nets["G"](z))).mean().backward()   # also fills D's grads
            oracle_g.capture()
            opt_g.step()
        stats = monitor.log(0)
    assert_matches_oracle({k: v for k, v in stats.items() if k.startswith("D")}, oracle_d)
    assert_matches_oracle({k: v for k, v in stats.items() if k.startswith("G")}, oracle_g)
    assert monitor.history[0].steps == 4


def test_one_optimizer_per_parameter_counts_iterations_not_parameter_steps():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    optimizers = {p: torch.optim.SGD([p], lr=0.01) for p in model.parameters()}
    names = {p: name for name, p in model.named_parameters()}
    norms: dict[str, list[float]] = {name: [] for name in names.values()}

    def step_in_backward(p):                      # the optimizer steps inside backward
        norms[names[p]].append(p.grad.norm().item())
        optimizers[p].step()
        optimizers[p].zero_grad()

    handles = [p.register_post_accumulate_grad_hook(step_in_backward) for p in model.parameters()]
    with GradientMonitor(model) as monitor:
        for _ in range(5):
            model(torch.randn(8, 3)).pow(2).mean().backward()
        stats = monitor.log(0)
    for handle in handles:
        handle.remove()
    assert monitor.history[0].steps == 5
    assert all(row["steps"] == 5 for row in stats.values())
    for name, row in stats.items():
        assert row["norm"] == pytest.approx(np.mean(norms[name]), rel=1e-5)


# -- 3. param groups added later -------------------------------------------------------------

def test_param_group_added_after_the_first_step_is_recorded():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    optimizer = torch.optim.SGD(model[2].parameters(), lr=0.01)      # the head only: backbone frozen
    oracle = GradientOracle(model.named_parameters())
    with GradientMonitor(model) as monitor:
        for step in range(4):
            if step == 2:                                              # unfreeze the backbone
                optimizer.add_param_group({"params": model[0].parameters()})
            optimizer.zero_grad()
            model(torch.randn(8, 3)).pow(2).mean().backward()
            if step >= 2:
                oracle.capture()
            optimizer.step()
            if step == 1:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    first = monitor.log(0)
                assert set(first) == {"2.weight", "2.bias"}
                assert any("no monitored optimizer stepped them" in str(w.message) for w in caught)
        stats = monitor.log(1)
    assert_matches_oracle({k: v for k, v in stats.items() if k.startswith("0.")},
                          _only(oracle, ("0.weight", "0.bias")))


def _only(oracle: GradientOracle, names) -> GradientOracle:
    for name in list(oracle.steps):
        if name not in names:
            oracle.steps[name] = []
    return oracle


# -- 4. AMP overflow -------------------------------------------------------------------------

def test_gradscaler_overflow_steps_are_counted_as_skipped():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    oracle = GradientOracle(model.named_parameters())
    nonfinite = {}
    with GradientMonitor(model) as monitor:
        for step in range(4):
            optimizer.zero_grad()
            x = torch.randn(8, 3)
            if step == 2:
                x[0, 0] = math.inf
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(x).float().pow(2).mean()
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            if step == 2:
                nonfinite = {n: int((~torch.isfinite(p.grad)).sum()) for n, p in model.named_parameters()}
            else:
                oracle.capture()
            scaler.step(optimizer)
            scaler.update()
        stats = monitor.log(0)
    window = monitor.history[0]
    assert window.overall["skipped_steps"] == 1 and window.steps == 3
    assert window.skipped_nonfinite == nonfinite and sum(nonfinite.values()) > 0
    assert all(row["nonfinite"] == 0 and row["skipped_steps"] == 1 for row in stats.values())
    assert_matches_oracle(stats, oracle, rtol=1e-5)


def test_manual_record_of_a_skipped_step():
    model = nn.Linear(2, 1)
    model(torch.tensor([[math.nan, 1.0]])).sum().backward()
    with GradientMonitor(model, automatic=False) as monitor:
        monitor.record(skipped=True)
        stats = monitor.log(0)
    assert stats == {} and monitor.history[0].overall["skipped_steps"] == 1
    assert monitor.history[0].skipped_nonfinite == {"weight": 1, "bias": 0}
    with pytest.warns(DeprecationWarning, match="skipped_nonfinite"):
        assert monitor.history[0].skipped == {"weight": 1, "bias": 0}         # the old name, read-only


# -- 5. huge but finite gradients, every dtype -------------------------------------------------

@pytest.mark.parametrize("dtype, value", [(torch.float32, 1e20), (torch.float32, 3e34), (torch.bfloat16, 3e34),
                                          (torch.float16, 6e4), (torch.float64, 1e100), (torch.float64, 1e200)],
                         ids=["f32-1e20", "f32-3e34", "bf16-3e34", "f16-6e4", "f64-1e100", "f64-1e200"])
@pytest.mark.parametrize("size", [2, 4096, 1 << 17], ids=["tiny", "small", "large"])
def test_huge_finite_gradients_do_not_overflow(dtype, value, size, reduction_path):
    weight = nn.Parameter(torch.zeros(size, dtype=dtype))
    holder = nn.Module()
    holder.weight = weight
    optimizer = torch.optim.SGD([weight], lr=0.0)
    with GradientMonitor(holder, activations=False) as monitor:
        for _ in range(4):
            weight.grad = torch.full((size,), value, dtype=dtype)
            optimizer.step()
        row = monitor.log(0)["weight"]
    exact = float(torch.tensor(value, dtype=dtype))                # as the dtype stores it
    assert row["nonfinite"] == 0
    assert row["mean_abs"] == pytest.approx(exact, rel=1e-6)
    assert row["max_abs"] == pytest.approx(exact, rel=1e-6)
    assert row["norm"] == pytest.approx(exact * math.sqrt(size), rel=1e-6)
    if exact * exact * size < 1e300:          # the total norm sums squares in float64
        assert monitor.history[0].overall["total_norm"] == pytest.approx(exact * math.sqrt(size), rel=1e-6)


# -- 6. the user's model left alone -----------------------------------------------------------

def test_torch_save_and_deepcopy_of_a_monitored_model():
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with GradientMonitor(model) as monitor:
        buffer = io.BytesIO()
        torch.save(model, buffer)
        twin = copy.deepcopy(model)
        loaded = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
        for copy_ in (twin, loaded):
            copy_(torch.randn(5, 3)).sum().backward()
            assert len(copy_[1]._forward_hooks) == 0            # the spent tap removed itself
        model(torch.randn(5, 3)).sum().backward()
        optimizer.step()
        monitor.log(0)
        assert monitor.history[0].activations["1"]["mean"] is not None
        assert sum(a.numel() for _, a in monitor.parts["activations"].pending) == 0


# -- 7. parameters replaced after attaching, meta and lazy parameters ----------------------

def test_parameters_replaced_with_assign_are_followed():
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    with GradientMonitor(model) as monitor:
        fresh = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
        model.load_state_dict(fresh, assign=True)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        oracle = GradientOracle(model.named_parameters())
        model(torch.randn(8, 3)).pow(2).mean().backward()
        oracle.capture()
        optimizer.step()
        stats = monitor.log(0)
    assert_matches_oracle(stats, oracle)
    assert monitor.history[0].weights["0.weight"]["norm"] == pytest.approx(model[0].weight.norm().item(), rel=1e-5)


def test_to_empty_after_attaching_is_followed_and_a_shape_change_is_an_error():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    with GradientMonitor(model) as monitor:
        model.to_empty(device="cpu")
        with torch.no_grad():
            for p in model.parameters():
                p.normal_()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        model(torch.randn(8, 3)).pow(2).mean().backward()
        optimizer.step()
        assert set(monitor.log(0)) == {"0.weight", "0.bias", "2.weight", "2.bias"}
        model[2].weight = nn.Parameter(torch.zeros(1, 5))
        with pytest.raises(MonitorError, match=r"2.weight was replaced by a tensor of another shape"):
            monitor.log(1)


def test_meta_and_lazy_parameters_are_refused_at_attach():
    with torch.device("meta"):
        meta = nn.Linear(3, 4)
    with pytest.raises(MonitorError, match="weight is on the meta device"):
        GradientMonitor(meta)
    with pytest.raises(MonitorError, match="not initialised yet"):
        GradientMonitor(nn.Sequential(nn.LazyLinear(4)), activations=False, weights=False)


# -- 8. backward without a step ----------------------------------------------------------------

def test_log_after_backward_without_a_step_warns_and_says_what_to_do():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    with GradientMonitor(model) as monitor:
        model(torch.randn(8, 3)).sum().backward()
        with pytest.warns(UserWarning, match=r"no optimizer step was recorded.*call monitor.record\(\)"):
            assert monitor.log(0) == {}
        monitor.record()                                       # gradient flow at initialisation
        oracle = GradientOracle(model.named_parameters())
        oracle.capture()
        assert_matches_oracle(monitor.log(1), oracle)


# -- 9. torch.compile ---------------------------------------------------------------------------

def test_compiled_model_causes_no_recompiles_and_says_activations_are_off():
    torch._dynamo.reset()
    torch.manual_seed(9)
    model = nn.Sequential(nn.Linear(4, 16), nn.GELU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    compiled = torch.compile(model)                           # inductor, the default
    oracle = GradientOracle(model.named_parameters())
    compiled(torch.randn(8, 4)).sum().backward()              # first compiled call before attaching
    optimizer.zero_grad()
    counters = torch._dynamo.utils.counters
    counters.clear()
    with GradientMonitor(model) as monitor:
        for _ in range(12):
            optimizer.zero_grad()
            compiled(torch.randn(8, 4)).pow(2).mean().backward()
            oracle.capture()
            optimizer.step()
        with pytest.warns(UserWarning, match=r"the model ran compiled \(torch.compile\)"):
            stats = monitor.log(0)
    assert_matches_oracle(stats, oracle, rtol=1e-4)
    assert sum(counters["graph_break"].values()) == 0
    assert counters["stats"]["unique_graphs"] <= 1            # at most one recompile: the hooks' arrival


def test_a_compiled_model_given_to_the_monitor_compiles_once():
    """The README's order: torch.compile(model), attach to the compiled model, then train. The
    monitor adds no hook that comes or goes inside the compiled forward (forward-order hooks,
    activation taps), so the forward compiles once, whatever activations_every is."""
    torch._dynamo.reset()
    torch.manual_seed(12)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))
    compiled = torch.compile(model, backend="eager")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    counters = torch._dynamo.utils.counters
    counters.clear()
    with GradientMonitor(compiled, activations_every=2) as monitor:
        for _ in range(8):
            optimizer.zero_grad()
            compiled(torch.randn(3, 4)).sum().backward()
            optimizer.step()
        with pytest.warns(UserWarning, match="compiled"):
            rows = monitor.log(0)
    assert rows["0.weight"]["steps"] == 8
    assert counters["stats"]["unique_graphs"] == 1
    assert sum(counters["graph_break"].values()) == 0


# -- 10. activation checkpointing -------------------------------------------------------------

def test_checkpoint_recompute_is_not_counted_twice():
    torch.manual_seed(10)
    block = nn.Sequential(nn.Linear(4, 20), nn.Tanh(), nn.Linear(20, 1))
    optimizer = torch.optim.SGD(block.parameters(), lr=0.01)
    with GradientMonitor(block) as monitor:
        x = torch.randn(8, 4, requires_grad=True)
        expected = torch.tanh(block[0](x)).detach()
        checkpoint(block, x, use_reentrant=False).sum().backward()
        optimizer.step()
        monitor.log(0)
    tanh = monitor.history[0].activations["1"]
    assert tanh["mean"] == pytest.approx(expected.mean().item(), rel=1e-5)
    assert tanh["std"] == pytest.approx(expected.std(unbiased=False).item(), rel=1e-4)


def test_checkpoint_recompute_histogram_counts_one_forward():
    torch.manual_seed(10)
    block = nn.Sequential(nn.Linear(4, 20), nn.Tanh(), nn.Linear(20, 1))
    optimizer = torch.optim.SGD(block.parameters(), lr=0.01)
    seen = []

    class Recorder(Sink):
        def log(self, scalars, histograms, step):
            seen.append(histograms["activation/1"].num)

    with GradientMonitor(block, Recorder()) as monitor:
        checkpoint(block, torch.randn(8, 4), use_reentrant=False).sum().backward()
        optimizer.step()
        monitor.log(0)
    assert seen == [8 * 20]


# -- 11. the writer ---------------------------------------------------------------------------

class NotAWriter:
    def log_metrics(self, metrics, step):
        pass

    experiment = None


@pytest.mark.parametrize("writer", [object(), "runs/mine", NotAWriter()], ids=["object", "path", "lightning-like"])
def test_unknown_writers_are_refused_at_construction(writer):
    with pytest.raises(MonitorError, match="writer must be a torch SummaryWriter, None, a gradflow.monitor.sinks.Sink"):
        GradientMonitor(nn.Linear(2, 1), writer)
    assert not interception._WATCHERS


@pytest.mark.parametrize("writer", ["SummaryWriter", "TensorBoardSink", "ScalarSink"])
def test_a_writer_class_instead_of_a_writer_is_refused_at_construction(writer):
    """The class passed for an instance of it (``writer=SummaryWriter``): its unbound methods look
    like a writer's, and the first log() failed with a TypeError about ``self``."""
    from torch.utils.tensorboard import SummaryWriter

    from gradflow.monitor import sinks
    cls = SummaryWriter if writer == "SummaryWriter" else getattr(sinks, writer)
    with pytest.raises(MonitorError, match=f"writer must be a writer object, got the class .*{writer} itself: "
                                           "pass an instance of it"):
        GradientMonitor(nn.Linear(2, 1), cls)
    assert not interception._WATCHERS


def test_scalar_sink_and_tee_take_the_window():
    model = nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    received = []
    sink = TeeSink(ScalarSink(lambda scalars, step: received.append((step, scalars))),
                   ScalarSink(lambda scalars, step: received.append((step, scalars))))
    with GradientMonitor(model, sink) as monitor:
        model(torch.randn(4, 3)).sum().backward()
        optimizer.step()
        stats = monitor.log(7)
    assert [step for step, _ in received] == [7, 7]
    assert received[0][1]["grad/weight/norm"] == pytest.approx(stats["weight"]["norm"])


# -- 12. total norm, clipping -------------------------------------------------------------------

@pytest.mark.parametrize("max_norm", [0.05, 100.0], ids=["clips", "does-not-clip"])
def test_total_norm_and_the_norm_before_clipping(max_norm, reduction_path):
    torch.manual_seed(12)
    model = nn.Sequential(nn.Linear(300, 300), nn.ReLU(), nn.Linear(300, 1))    # small and large params
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    before, after = [], []
    with GradientMonitor(model) as monitor:
        for _ in range(5):
            optimizer.zero_grad()
            model(torch.randn(16, 300)).pow(2).mean().backward()
            before.append(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm).item())
            after.append(torch.linalg.vector_norm(torch.cat([p.grad.reshape(-1) for p in model.parameters()])).item())
            optimizer.step()
        monitor.log(0)
    overall = monitor.history[0].overall
    assert overall["total_norm"] == pytest.approx(np.mean(after), rel=1e-5)
    assert overall["total_norm_max"] == pytest.approx(max(after), rel=1e-5)
    assert overall["total_norm_before_clip"] == pytest.approx(np.mean(before), rel=1e-5)
    assert overall["clipped_steps"] == sum(b > max_norm for b in before)
    assert overall["clip_calls"] == 5


def test_torch_functions_are_restored_when_the_last_monitor_detaches():
    assert not interception._WATCHERS
    original_clip, original_step = torch.nn.utils.clip_grad_norm_, torch.amp.GradScaler.step
    first = GradientMonitor(nn.Linear(2, 1))
    second = GradientMonitor(nn.Linear(2, 1))
    assert torch.nn.utils.clip_grad_norm_ is not original_clip
    first.remove()
    assert torch.nn.utils.clip_grad_norm_ is not original_clip
    second.remove()
    second.remove()
    assert torch.nn.utils.clip_grad_norm_ is original_clip and torch.amp.GradScaler.step is original_step


# -- activations the monitor cannot tap: said with their true cause ---------------------------------

class _FunctionalGELU(nn.Module):
    """Owns an nn.GELU but computes F.gelu in its forward: the module never runs."""

    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(4, 16), nn.GELU(), nn.Linear(16, 1)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class _Reentrant(nn.Module):
    """The whole body under reentrant activation checkpointing."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1))

    def forward(self, x):
        return checkpoint(self.body, x, use_reentrant=True)


@pytest.mark.parametrize("model, cause", [
    (_FunctionalGELU, "computes its activations with functions"),
    (_Reentrant, "reentrant activation checkpointing"),
], ids=["functional-activation", "reentrant-checkpoint"])
def test_untapped_activations_are_said_with_their_true_cause(model, cause):
    torch.manual_seed(0)
    model = model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with GradientMonitor(model, activations_every=1) as monitor:
        for _ in range(3):
            optimizer.zero_grad()
            model(torch.randn(8, 4, requires_grad=True)).pow(2).mean().backward()
            optimizer.step()
        with pytest.warns(UserWarning) as caught:
            monitor.log(0)
    (message,) = [str(w.message) for w in caught if "no activation output" in str(w.message)]
    assert cause in message and "torch.compile" not in message, message


def test_steps_recorded_by_hand_without_a_forward_are_said_so():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    model(torch.randn(2, 4)).sum().backward()
    with GradientMonitor(model, activations_every=1) as monitor:
        monitor.record()                                          # the gradient of a pass before attaching
        with pytest.warns(UserWarning, match="no training forward pass of the model was seen"):
            monitor.log(0)
